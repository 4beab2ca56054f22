"""Follow-up Differential Descriptions (FuDD; paper 10 in ../shared/papers.md).

Per image: the ambiguous set is the top-k classes of the zero-shot (template) classifier; a language model
describes, for every pair of classes in that set, the visual features that tell them apart; each class of the
set is re-scored with the similarity to its differential descriptions. The LLM is asked once per class pair
(the pair's answer serves every set that contains it); a set's class weights are built once and shared by
every image with the same set; the LLM's disk cache keeps answers across runs. An answer without usable
sentence pairs is rejected inside the LLM's retry loop (``validate=``), so it is retried and never cached.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.prompts import check_class_names, class_prompts
from ..errors import LabelError, LLMError
from ..features.text import embed_prompts, ensemble
from ..llm.base import not_asked
from ..models.backbone import Backbone
from .base import ZEROSHOT_SKIPS, ClipHead
from .registry import register

PAIR_SYSTEM = "You are an expert in visual recognition who writes short, concrete descriptions of photos."
# Our own wording of the paper's pairwise question (their exact prompt is not in their code release).
PAIR_PROMPT = (
    "What visual features distinguish a photo of a {a} from a photo of a {b}? Give up to {n} features that can be "
    "seen in a photo (shape, colour, texture, parts, size, typical surroundings). For each feature write one "
    "sentence describing a photo of each class with that feature: the first starts with \"a photo of a {a}\", "
    "the second with \"a photo of a {b}\". Answer as JSON: "
    "{{\"differences\": [{{\"attribute\": \"...\", \"first\": \"...\", \"second\": \"...\"}}]}}"
)
_SCHEMA = {"type": "object"}


def pair_prompt(a: str, b: str, n: int = 4) -> str:
    """The question asked for the class pair (a, b); ``a`` is the class with the lower index."""
    return PAIR_PROMPT.format(a=a, b=b, n=n)


def parse_pair_answer(answer: Any) -> tuple[list[str], list[str]]:
    """The (first, second) sentence lists of a pair's JSON answer; ValueError when it holds none."""
    items = answer.get("differences") if isinstance(answer, dict) else None
    if not isinstance(items, list):
        raise ValueError("answer has no 'differences' list")
    first: list[str] = []
    second: list[str] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        a, b = item.get("first"), item.get("second")
        if isinstance(a, str) and isinstance(b, str) and a.strip() and b.strip():
            first.append(" ".join(a.split()))
            second.append(" ".join(b.split()))
    if not first:
        raise ValueError("answer has no difference with two non-empty sentences")
    return first, second


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


@register("fudd", family="zeroshot", paper=10, needs_train=False, needs=("llm",),
          default_templates=("a photo of a {c}.",), gives=("class_weights",),
          fit_problems=("class_sets_failed", "failures"))
class FuDDClassifier(ClipHead):
    """FuDD: re-score each image among its ambiguous top-k classes with LLM-written differential descriptions.

    Step one is the template classifier: ``z = logit_scale * x . w`` with ``w`` the renormalised mean of the
    ``templates`` embeddings (their code: the single template "a photo of a {}."). The ambiguous set S of a row is
    its ``top_k`` classes by ``z`` (ties: the lower class index). For every pair (a, b) in S (a the lower index)
    the LLM (``llm``: a spec for :func:`cliplab.llm.load_llm`, e.g. "replay:FILE" or "http://...") answers
    :func:`pair_prompt` with sentence pairs; class c's descriptions are the union of its sentences over the pairs
    of S that contain c. Their embeddings give ``d_c``, the renormalised mean (as the authors' code). The logits
    of a row whose set got descriptions are

    - ``logit_scale * x . d_c`` for c in S;
    - ``z_c - shift`` for c outside S, with ``shift = max(0, max_{c not in S} z_c - min_{c in S} new_c + margin)``:
      the zero-shot logits, moved down (only if needed) so the best of them sits ``margin`` below the weakest
      class of S. The prediction therefore always lies in S; the authors' code returns scores over S only.

    Rows keep the zero-shot logits exactly when ``llm`` is None, ``top_k`` <= 1, or any pair of their set failed
    (LLM error, or an answer without usable sentences after the LLM's retries); failed sets are listed in
    ``failures_`` (set -> reason) with one warning per ``logits`` call. When the first ``give_up_after`` pairs
    asked all failed (none worked), the endpoint is taken to be down: no further pair is asked in this fit and
    the remaining sets fail as "not asked" (0 or None: never give up). ``llm_calls_`` counts the requests sent to
    the LLM backend (disk-cache hits excluded: ``llm_cache_hits_``), ``text_embeddings_`` the distinct strings
    embedded (through the text cache).

    Departures from the authors' code: their pairwise descriptions were generated offline and read from a file,
    here they are asked on demand; a pair without descriptions there falls back to the class's template prompt,
    here the whole set keeps zero-shot logits (reported); they capitalise each sentence (CLIP's tokenizer lowercases
    anyway), here sentences are embedded as written; duplicate sentences are removed keeping their order (theirs:
    a Python ``set``; the mean is the same); ``top_k`` defaults to 5, theirs (``--topk``) to 10: a smaller
    ambiguous set asks the LLM k(k-1)/2 = 10 pairs per set instead of 45 (pass ``top_k=10`` for their setting).
    """

    # The scikit-learn estimator checks this head cannot pass, with the reason (heads/base.py, end).
    _contract_skips = ZEROSHOT_SKIPS

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        llm: Any = None,
        top_k: int = 5,
        templates: str | Sequence[str] = ("a photo of a {c}.",),
        n_differences: int = 4,
        margin: float = 1.0,
        logit_scale: float | None = None,
        cache_dir: str | Path | None = None,
        give_up_after: int | None = 3,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.llm = llm
        self.top_k = top_k
        self.templates = templates
        self.n_differences = n_differences
        self.margin = margin
        self.logit_scale = logit_scale
        self.cache_dir = cache_dir
        self.give_up_after = give_up_after

    def fit(self, X=None, y=None):
        """Embed the template prompts (step one) and resolve the LLM spec; no LLM call is made here."""
        from ..llm import load_llm

        names = check_class_names(list(self.class_names), "class names")
        if int(self.top_k) < 1:
            raise LabelError(f"{type(self).__name__}: top_k must be at least 1, got {self.top_k}")
        prompts = class_prompts(names, self.templates)
        self.names_ = names
        self.weights_ = ensemble(embed_prompts(self.backbone, prompts, self.cache_dir), True)
        self.classes_ = np.arange(len(names))
        self.logit_scale_ = float(self.logit_scale if self.logit_scale is not None else self.backbone.logit_scale)
        self.n_features_in_ = self.weights_.shape[0]
        self.text_embeddings_ = len({p for group in prompts for p in group})
        self.llm_calls_ = 0
        self.llm_cache_hits_ = 0
        self.failures_: dict[str, str] = {}
        self.descriptions_: dict[str, dict[str, list[str]]] = {}
        self._llm = load_llm(self.llm) if self.llm is not None else None
        self._pairs: dict[tuple[int, int], tuple[list[str], list[str]] | str] = {}
        self._set_weights: dict[tuple[int, ...], np.ndarray | None] = {}
        self._embedded: set[str] = set()
        self._failed_in_row: list[str] = []  # reasons of the pairs failed since the last success
        self._pair_worked = False
        if X is not None:
            self._validate(X)
        if y is not None and len(np.asarray(y)) and not np.isin(np.asarray(y), self.classes_).all():
            raise LabelError(f"labels must be class indices 0..{len(self.classes_) - 1} into class_names")
        return self

    def zeroshot_logits(self, X) -> np.ndarray:
        """Step one: the template classifier's logits (n, C)."""
        X = self._checked(X)
        return self.logit_scale_ * (X @ self.weights_)

    def ambiguous_sets(self, zeroshot: np.ndarray) -> np.ndarray:
        """(n, k) the top-k classes of each row, best first (ties: the lower class index)."""
        k = min(int(self.top_k), zeroshot.shape[1])
        return np.argsort(-zeroshot, axis=1, kind="stable")[:, :k]

    def set_key(self, classes: Sequence[int]) -> str:
        """The name of a class set in ``failures_``/``descriptions_``: its class names in index order, " | "-joined."""
        return " | ".join(self.names_[c] for c in sorted(classes))

    def _pair(self, a: int, b: int) -> tuple[list[str], list[str]] | str:
        """The sentences of pair (a, b), a < b, or the reason it failed; asked at most once per fitted head."""
        if (a, b) in self._pairs:
            return self._pairs[(a, b)]
        limit = int(self.give_up_after or 0)
        if limit and not self._pair_worked and len(self._failed_in_row) >= limit:
            # Not stored in _pairs: the reason is the same for every pair, and a refit asks again.
            return not_asked(limit, self._failed_in_row[-1])
        llm = self._llm
        requests, hits = llm.requests, llm.cache_hits
        prompt = pair_prompt(self.names_[a], self.names_[b], self.n_differences)
        try:
            result: tuple[list[str], list[str]] | str = parse_pair_answer(
                llm.complete(prompt, system=PAIR_SYSTEM, json_schema=_SCHEMA, validate=parse_pair_answer))
        except (LLMError, ValueError) as error:
            result = f"{self.names_[a]} vs {self.names_[b]}: {error}"
        self.llm_calls_ += llm.requests - requests
        self.llm_cache_hits_ += llm.cache_hits - hits
        if isinstance(result, str):
            self._failed_in_row.append(result)
        else:
            self._pair_worked = True
            self._failed_in_row.clear()
        self._pairs[(a, b)] = result
        return result

    def _weights_for(self, classes: tuple[int, ...]) -> np.ndarray | None:
        """(d, |S|) differential class weights of the sorted set, or None if a pair failed (recorded)."""
        if classes not in self._set_weights:
            per_class: dict[int, list[str]] = {c: [] for c in classes}
            reason = None
            for i, a in enumerate(classes):
                for b in classes[i + 1:]:
                    result = self._pair(a, b)
                    if isinstance(result, str):
                        reason = reason or result
                        continue
                    per_class[a] += result[0]
                    per_class[b] += result[1]
            key = self.set_key(classes)
            if reason is not None:
                self.failures_[key] = reason
                self._set_weights[classes] = None
            else:
                sentences = [_unique(per_class[c]) for c in classes]
                self.descriptions_[key] = {self.names_[c]: s for c, s in zip(classes, sentences)}
                new = {s for group in sentences for s in group} - self._embedded
                self._embedded |= new
                self.text_embeddings_ += len(new)
                self._set_weights[classes] = ensemble(embed_prompts(self.backbone, sentences, self.cache_dir), True)
        return self._set_weights[classes]

    def logits(self, X) -> np.ndarray:
        """Logits (n, C) as described in the class docstring (zero-shot rows where no descriptions apply)."""
        X = self._checked(X)
        zeroshot = self.logit_scale_ * (X @ self.weights_)
        out = zeroshot.copy()
        if self._llm is None or int(self.top_k) <= 1 or zeroshot.shape[1] < 2:
            return out
        top = np.sort(self.ambiguous_sets(zeroshot), axis=1)
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, classes in enumerate(map(tuple, top.tolist())):
            groups.setdefault(classes, []).append(row)
        failed = []
        for classes, rows in groups.items():
            weights = self._weights_for(classes)
            if weights is None:
                failed.append(self.set_key(classes))
                continue
            inside = np.array(classes)
            outside = np.setdiff1d(self.classes_, inside)
            new = self.logit_scale_ * (X[rows] @ weights)
            out[np.ix_(rows, inside)] = new
            if len(outside):
                old = zeroshot[np.ix_(rows, outside)]
                shift = np.maximum(0.0, old.max(axis=1) - new.min(axis=1) + self.margin)
                out[np.ix_(rows, outside)] = old - shift[:, None]
        if failed:
            warnings.warn(f"fudd: the LLM gave no descriptions for {len(failed)} class set(s), whose images keep "
                          f"their zero-shot logits; first: {self.failures_[failed[0]]}", RuntimeWarning, stacklevel=2)
        return out

    def fit_summary(self) -> dict:
        return {"top_k": int(self.top_k), "logit_scale": self.logit_scale_, "llm_calls": self.llm_calls_,
                "llm_cache_hits": self.llm_cache_hits_, "text_embeddings": self.text_embeddings_,
                "class_sets_described": len(self.descriptions_), "class_sets_failed": len(self.failures_),
                "class_sets_not_asked": sum(r.startswith("not asked:") for r in self.failures_.values()),
                "failures": dict(self.failures_)}
