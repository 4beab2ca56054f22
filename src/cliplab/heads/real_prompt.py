"""REAL-Prompt (paper 36, "The Neglected Tails of Vision-Language Models", sec. 4): prompt with each class's
most frequent synonym in the pretraining captions instead of its official name."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..data.prompts import check_class_names, fill_template, load_templates
from ..data.synonyms import count_synonyms, most_frequent_names, resolve_synonyms
from ..errors import DatasetError
from ..features.text import embed_prompts
from ..models.backbone import Backbone
from .base import ZEROSHOT_SKIPS, TextWeightsHead
from .registry import register


@register("real", family="zeroshot", paper=36, needs_train=False, needs=("llm",), default_templates="generic",
          gives=("class_weights",), fit_problems=("llm_failures", "corpus_problems"))
class RealPromptClassifier(TextWeightsHead):
    """REAL-Prompt: the template classifier filled with each class's most frequent synonym.

    ``synonyms`` (JSON file or ``{class: [synonyms]}``) or ``llm`` (a ``cliplab.llm.load_llm`` spec, asked once per
    class; a failed class keeps its own name and is reported in ``llm_failures_``) give the candidates; their
    captions are counted in ``corpus`` (a caption file, ``data.synonyms.load_caption_corpus``; unreadable rows are
    skipped and kept in ``corpus_problems_``) and ``data.synonyms.most_frequent_names`` picks each class's name
    (``strategy``: the authors' "relaxed" or "strict"). As the authors' code (``prompt_maker`` with
    ``name_type='most_common_name'``), only the chosen name fills the templates (the official name is not
    ensembled in) and the class weight is CLIP's renormalised mean. Without ``corpus`` the head is the template
    classifier (``synonyms``/``llm`` without a corpus is an error). Departures: exact phrase matching in one pass
    instead of their SQLite FTS5 index (same matching rules, see ``data/synonyms.py``); the corpus is read on
    every ``fit`` (counts are not cached).
    """

    # The scikit-learn estimator checks this head cannot pass, with the reason (heads/base.py, end).
    _contract_skips = ZEROSHOT_SKIPS

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        templates: str | Sequence[str] = "generic",
        corpus: str | Path | None = None,
        synonyms: str | Path | Mapping[str, Sequence[str]] | None = None,
        llm: str | None = None,
        strategy: str = "relaxed",
        logit_scale: float | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.templates = templates
        self.corpus = corpus
        self.synonyms = synonyms
        self.llm = llm
        self.strategy = strategy
        self.logit_scale = logit_scale
        self.cache_dir = cache_dir

    def choose_names(self) -> tuple[list[str], dict]:
        """The name each class is prompted with (``class_names`` order) and the facts behind it."""
        names = check_class_names(list(self.class_names), "class names")
        if self.corpus is None:
            if self.synonyms is not None or self.llm is not None:
                raise DatasetError("real: synonyms need a caption corpus to count them in (corpus=...)")
            return names, {"counts": {}, "llm_failures": {}, "corpus_problems": []}
        candidates, failures = resolve_synonyms(names, self.synonyms, self.llm)
        problems: list[str] = []
        counts = count_synonyms(self.corpus, candidates, problems)
        for line in problems[:5]:
            warnings.warn(f"real: skipped {line}", stacklevel=2)
        chosen = most_frequent_names(counts, self.strategy)
        return [chosen[n] for n in names], {"counts": counts, "llm_failures": failures, "corpus_problems": problems}

    def fit(self, X=None, y=None):
        """Count the synonyms, choose the names, embed the filled templates and build ``weights_`` (d, C)."""
        chosen, facts = self.choose_names()
        self.chosen_names_ = chosen
        self.synonym_counts_ = facts["counts"]
        self.llm_failures_ = facts["llm_failures"]
        self.corpus_problems_ = facts["corpus_problems"]
        templates = load_templates(self.templates)  # two classes may choose the same name: no uniqueness check
        prompts = [[fill_template(t, name) for t in templates] for name in chosen]
        return self._fit_weights(embed_prompts(self.backbone, prompts, self.cache_dir), True, X, y)

    def fit_summary(self) -> dict:
        renamed = {n: c for n, c in zip(self.class_names, self.chosen_names_) if n != c}
        return {"prompts_per_class": sorted(set(self.prompts_per_class_)), "logit_scale": self.logit_scale_,
                "renamed": renamed, "synonym_counts": self.synonym_counts_, "llm_failures": self.llm_failures_,
                "corpus_problems": len(self.corpus_problems_)}
