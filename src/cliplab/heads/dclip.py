"""Classification by description (DCLIP; Menon & Vondrick, paper 7 in ../shared/papers.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..data.descriptions import load_descriptions
from ..data.prompts import check_class_names, descriptor_clause, descriptor_sentence, load_templates
from ..features.text import embed_prompts
from ..models.backbone import Backbone
from .base import ZEROSHOT_SKIPS, TextWeightsHead
from .registry import register

__all__ = ["DescriptionClassifier", "descriptor_clause", "descriptor_sentence"]  # phrasing lives in data.prompts

@register("dclip", family="zeroshot", paper=7, needs_train=False, needs=("descriptions",), default_templates=("{c}",),
          gives=("class_weights", "sentences"))
class DescriptionClassifier(TextWeightsHead):
    """DCLIP: class score = mean over the class's descriptors d of cos(x, "{c}, which (is/has) {d}").

    As the authors' ``classify_by_description`` code: each descriptor becomes a sentence
    (:func:`descriptor_sentence`), every sentence is embedded and L2-normalised, and the class score is the
    plain mean of the per-sentence similarities, i.e. ``x . mean_d e_d`` (``features.text.ensemble`` with
    ``renormalize=False``; no renormalisation, unlike CLIP's ensembling). ``descriptions`` is a file
    (``.json``/``.json.gz``, ``{class: [descriptors]}``) or a mapping, matched to ``class_names`` loosely;
    ``subset`` lets the file describe more classes than ``class_names``. None means one "" descriptor per
    class: with one template exactly the template classifier; with several, the plain mean of the per-template
    embeddings without renormalisation (the mean of per-prompt scores, not CLIP's renormalised ensemble).
    ``templates`` give the class-name part (their ``label_before_text`` + class name); with several, the mean
    runs over templates x descriptors. A template ending in "." takes the clause before its full stop
    ("a photo of a {c}." -> "a photo of a cat, which has whiskers.", their ``label_after_text='.'``);
    ``suffix`` is appended after the sentence.

    Departures from the authors' code: descriptor phrasing matches whole first words (see
    :func:`descriptor_clause`); an empty descriptor adds no clause; the class name is the label as given
    (theirs is the file's key with "_" -> " "); a class without descriptors is an error (they use [""]);
    logits are ``logit_scale`` times the mean similarity (theirs are unscaled; the argmax is the same).
    """

    # The scikit-learn estimator checks this head cannot pass, with the reason (heads/base.py, end).
    _contract_skips = ZEROSHOT_SKIPS

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        descriptions: str | Path | Mapping[str, Sequence[str]] | None = None,
        templates: str | Sequence[str] = ("{c}",),
        phrase: bool = True,
        suffix: str = "",
        subset: bool = False,
        logit_scale: float | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.descriptions = descriptions
        self.templates = templates
        self.phrase = phrase
        self.suffix = suffix
        self.subset = subset
        self.logit_scale = logit_scale
        self.cache_dir = cache_dir

    def sentences(self) -> list[list[str]]:
        """Per class (in ``class_names`` order), the sentences that are embedded."""
        names = check_class_names(list(self.class_names), "class names")
        templates = load_templates(self.templates)
        if self.descriptions is None:
            per_class = {name: [""] for name in names}
        else:
            per_class = load_descriptions(self.descriptions, names, subset=self.subset)
        return [[descriptor_sentence(t, name, d, self.phrase, self.suffix) for t in templates for d in per_class[name]]
                for name in names]

    def fit(self, X=None, y=None):
        """Embed every class's sentences; ``weights_`` (d, C) is each class's plain mean sentence embedding."""
        sentences = self.sentences()
        embedded = embed_prompts(self.backbone, sentences, self.cache_dir)
        self.sentences_ = sentences
        self.sentence_embeddings_ = np.concatenate(embedded).astype(np.float32)
        self.sentence_class_ = np.repeat(np.arange(len(sentences)), [len(s) for s in sentences])
        return self._fit_weights(embedded, False, X, y)  # DCLIP: the plain mean of per-sentence similarities

    def sentence_scores(self, X, c: int) -> np.ndarray:
        """(n, m_c) similarities of ``X`` to class ``c``'s sentences (``sentences_[c]``): the explanation data;
        their mean is ``logits[:, c] / logit_scale_``."""
        X = self._checked(X)
        return X @ self.sentence_embeddings_[self.sentence_class_ == c].T

    def fit_summary(self) -> dict:
        counts = sorted({len(s) for s in self.sentences_})
        return {"sentences_per_class": [counts[0], counts[-1]], "logit_scale": self.logit_scale_}
