"""REAL-Linear (paper 36, "The Neglected Tails of Vision-Language Models", sec. 4): a linear head trained on images
retrieved from an image-text corpus by their captions naming a class, never on the evaluation data."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..data.base import Subset
from ..data.prompts import check_class_names, fill_template, load_templates
from ..data.synonyms import (
    count_synonyms,
    load_image_text_corpus,
    most_frequent_names,
    resolve_synonyms,
    retrieve,
)
from ..errors import DatasetError
from ..features.embed import embed_images
from ..features.text import embed_prompts, embed_texts, ensemble
from ..models.backbone import Backbone
from .base import ZEROSHOT_SKIPS, TextWeightsHead
from .registry import register


def lr_at(step: int, lr: float, steps: int, warmup: int = 50) -> float:
    """The authors' schedule (cross-modal adaptation's): ``warmup_lr`` (1e-5 if lr > 5e-5, else 5e-6) at step 0,
    ``lr * step / warmup`` up to ``warmup``, then cosine annealing from ``lr`` over ``steps`` steps."""
    if step == 0:
        return 1e-5 if lr > 5e-5 else 5e-6
    if step < warmup:
        return lr * step / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / steps))


def train_linear(features: np.ndarray, labels: np.ndarray, text_features: np.ndarray, text_labels: np.ndarray,
                 init: np.ndarray, *, steps: int, batch_size: int, lr: float, weight_decay: float,
                 train_scale: float, seed: int) -> np.ndarray:
    """Cross-modal training of a bias-free linear layer (C, d) initialised with ``init``: each step one shuffled
    batch of image features and one of prompt embeddings (each cycled, last short batch dropped), logits
    ``train_scale * f @ W.T``, cross-entropy, AdamW. Returns the trained (C, d) weights."""
    import torch

    weight = torch.nn.Parameter(torch.tensor(init, dtype=torch.float32))
    if steps <= 0:
        return weight.detach().numpy().copy()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([weight], lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    sources = [(torch.tensor(f, dtype=torch.float32), torch.tensor(y, dtype=torch.long))
               for f, y in ((features, labels), (text_features, text_labels)) if len(y)]
    queues: list[list[torch.Tensor]] = [[] for _ in sources]

    def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sources[k]
        size = min(batch_size, len(y))
        if not queues[k]:
            order = torch.randperm(len(y), generator=generator)
            queues[k] = list(order[: len(y) - len(y) % size].split(size))
        index = queues[k].pop(0)
        return x[index], y[index]

    for step in range(steps):
        parts = [batch(k) for k in range(len(sources))]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        x = x / x.norm(dim=-1, keepdim=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, steps)
        loss = torch.nn.functional.cross_entropy(train_scale * x @ weight.T, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight.detach().numpy().copy()


@register("real-linear", family="zeroshot", paper=36, needs_train=False, needs=("llm",),
          default_templates="generic", gives=("class_weights",),
          fit_problems=("empty_classes", "llm_failures", "failed_images"))
class RealLinearClassifier(TextWeightsHead):
    """REAL-Linear: a linear head initialised with REAL-Prompt's text weights and trained on retrieved images.

    As the authors' ``real-linear.py`` and ``clip_cross_modal.py``:

    1. Names: each class's candidates (its name plus ``synonyms`` from a file/mapping or the ``llm``) are counted
       in the captions (``caption_corpus``, else the image corpus's own) and the most frequent name is chosen
       (``data.synonyms.most_frequent_names``).
    2. Retrieval: the items of ``corpus`` (an image-text corpus, ``data.synonyms.load_image_text_corpus``) with a
       caption naming one of the class's candidates, ranked by the similarity of that caption's embedding to the
       class's text embeddings (templates filled with each candidate, renormalised mean per candidate, similarity
       averaged over candidates); the top ``max_images`` with similarity >= 0 are kept (``retrieved_``).
    3. Training: a bias-free linear layer initialised with the zero-shot weights (templates x chosen name),
       trained with cross-entropy on logits ``exp(4.60517) * f @ W.T`` over batches of retrieved image features
       plus batches of the prompt embeddings (cross-modal), AdamW (``lr`` 1e-4, ``weight_decay`` 0.01,
       ``batch_size`` 32), 50 warm-up steps then cosine; ``steps`` defaults to their
       ``min(32000, max_images * C * 10 / 32)``.
    4. WiSE-FT: ``W = wise_alpha * W_trained + (1 - wise_alpha) * W_zeroshot`` (their alpha 0.5); logits
       ``logit_scale_ * x @ W.T``.

    Classes with no retrieved images are listed in ``empty_classes_`` and keep their text weight (their only
    training signal is their prompts; with ``wise_alpha`` their row moves only through the shared softmax). Without
    ``corpus`` the head is the zero-shot template classifier. ``X``/``y`` given to ``fit`` are only validated:
    nothing of the evaluation data is trained on.

    Departures: exact phrase matching instead of their SQLite FTS5 index; all matching items are ranked (they first
    draw a random subset of the matches); an item with several captions is ranked by its first caption naming the
    class; a batch is ``min(batch_size, n)`` so that sets smaller than a batch still train; the final
    weights are not renormalised (as theirs). Images that fail to decode are skipped and reported.
    """

    # The scikit-learn estimator checks this head cannot pass, with the reason (heads/base.py, end).
    _contract_skips = ZEROSHOT_SKIPS

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        templates: str | Sequence[str] = "generic",
        corpus: str | Path | None = None,
        caption_corpus: str | Path | None = None,
        synonyms: str | Path | Mapping[str, Sequence[str]] | None = None,
        llm: str | None = None,
        strategy: str = "relaxed",
        max_images: int = 100,
        steps: int | None = None,
        batch_size: int = 32,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        wise_alpha: float = 0.5,
        seed: int = 0,
        logit_scale: float | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.templates = templates
        self.corpus = corpus
        self.caption_corpus = caption_corpus
        self.synonyms = synonyms
        self.llm = llm
        self.strategy = strategy
        self.max_images = max_images
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.wise_alpha = wise_alpha
        self.seed = seed
        self.logit_scale = logit_scale
        self.cache_dir = cache_dir

    def fit(self, X=None, y=None):
        """Choose names, retrieve and embed corpus images, train the linear head (see the class docstring)."""
        names = check_class_names(list(self.class_names), "class names")
        templates = load_templates(self.templates)
        self.retrieved_ = {name: [] for name in names}
        self.empty_classes_: list[str] = []
        self.llm_failures_: dict[str, str] = {}
        self.failed_images_: list[tuple[str, str]] = []
        self.steps_ = 0
        if self.corpus is None:
            if self.synonyms is not None or self.llm is not None or self.caption_corpus is not None:
                raise DatasetError("real-linear: synonyms need an image-text corpus to retrieve from (corpus=...)")
            self.chosen_names_ = names
            prompts = [[fill_template(t, n) for t in templates] for n in names]
            return self._fit_weights(embed_prompts(self.backbone, prompts, self.cache_dir), True, X, y)

        candidates, self.llm_failures_ = resolve_synonyms(names, self.synonyms, self.llm)
        dataset = load_image_text_corpus(self.corpus)
        problems: list[str] = []
        count_source = (self.caption_corpus if self.caption_corpus is not None
                        else (c for captions in dataset.captions for c in captions))
        chosen = most_frequent_names(count_synonyms(count_source, candidates, problems), self.strategy)
        for line in problems[:5]:
            warnings.warn(f"real-linear: skipped {line}", stacklevel=2)
        self.chosen_names_ = [chosen[n] for n in names]
        prompts = [[fill_template(t, n) for t in templates] for n in self.chosen_names_]
        embedded = embed_prompts(self.backbone, prompts, self.cache_dir)
        self._fit_weights(embedded, True, X, y)  # the zero-shot weights, classes_, n_features_in_
        zeroshot = self.weights_.T.astype(np.float64)  # (C, d)

        chosen_items = self._rank(dataset, names, candidates, templates)
        unique = sorted({i for items in chosen_items.values() for i in items})
        features = (embed_images(self.backbone, Subset(dataset, unique), self.cache_dir, progress=False)
                    if unique else None)
        row: dict[int, int] = {}  # dataset index -> row of ``features`` (undecodable images have none)
        if features is not None:
            self.failed_images_ = list(features.failures)
            row = {int(index): k for k, index in enumerate(np.asarray(unique)[features.indices])}
        train_rows, train_labels = [], []
        for c, name in enumerate(names):
            kept = [i for i in chosen_items[name] if i in row]
            self.retrieved_[name] = [dataset.item_id(i) for i in kept]
            if not kept:
                self.empty_classes_.append(name)
            train_rows += [row[i] for i in kept]
            train_labels += [c] * len(kept)
        for name in self.empty_classes_[:5]:
            warnings.warn(f"real-linear: no corpus image names class {name!r}; it keeps its text weight",
                          stacklevel=2)
        image_x = (np.asarray(features.features)[train_rows] if train_rows
                   else np.zeros((0, zeroshot.shape[1]), np.float32))
        text_x = np.concatenate(embedded)
        text_y = np.repeat(np.arange(len(names)), [len(group) for group in embedded])
        steps = (self.steps if self.steps is not None
                 else int(min(32000, self.max_images * len(names) * 10 / 32)))
        trained = train_linear(image_x, np.asarray(train_labels, dtype=np.int64), text_x, text_y,
                               zeroshot.astype(np.float32), steps=steps, batch_size=self.batch_size, lr=self.lr,
                               weight_decay=self.weight_decay, train_scale=math.exp(4.60517), seed=self.seed)
        self.steps_ = steps
        weights = self.wise_alpha * trained.astype(np.float64) + (1 - self.wise_alpha) * zeroshot
        self.weights_ = np.ascontiguousarray(weights.T, dtype=np.float32)
        return self

    def _rank(self, dataset, names: list[str], candidates: dict[str, list[str]], templates: list[str]
              ) -> dict[str, list[int]]:
        """Per class, the dataset indices kept for training: matches ranked by caption-to-class similarity."""
        matches = retrieve(dataset.captions, candidates)
        kept: dict[str, list[int]] = {}
        for name in names:
            found = matches[name]
            if not found:
                kept[name] = []
                continue
            alternates = list(dict.fromkeys([name, *candidates[name]]))
            per_alternate = embed_prompts(self.backbone, [[fill_template(t, a) for t in templates]
                                                          for a in alternates], self.cache_dir)
            class_text = ensemble(per_alternate, True)  # (d, A)
            captions = embed_texts(self.backbone, [caption for _, caption in found], self.cache_dir)
            similarity = (captions @ class_text).mean(axis=1)
            order = np.argsort(-similarity, kind="stable")
            kept[name] = [found[k][0] for k in order if similarity[k] >= 0][: self.max_images]
        return kept

    def fit_summary(self) -> dict:
        return {"logit_scale": self.logit_scale_, "steps": self.steps_,
                "renamed": {n: c for n, c in zip(self.class_names, self.chosen_names_) if n != c},
                "retrieved_per_class": {n: len(ids) for n, ids in self.retrieved_.items()},
                "empty_classes": self.empty_classes_, "llm_failures": self.llm_failures_,
                "failed_images": len(self.failed_images_)}
