"""Zero-shot classification with prompt ensembling (CLIP, Radford et al. 2021, sec. 3.1.4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..data.prompts import class_prompts
from ..features.text import embed_prompts
from ..models.backbone import Backbone
from .base import ZEROSHOT_SKIPS, TextWeightsHead
from .registry import register


@register("zeroshot", family="zeroshot", needs_train=False, default_templates="dataset",
          gives=("class_weights", "sentences"))
class ZeroShotClassifier(TextWeightsHead):
    """Zero-shot CLIP: logits = logit_scale * x . w_c, w_c the ensembled prompt embedding of class c.

    ``templates`` is a template set (name, file or list, filled with each class name) or a class ->
    prompts mapping (CuPL sentences). ``renormalize`` scales each class's mean prompt embedding back to
    unit length (CLIP's ensembling); without it ``x . w_c`` is the mean per-prompt similarity.
    ``logit_scale`` defaults to the model's learned one (100 for trained OpenAI/LAION models).
    Zero-shot needs no training data: ``fit()`` embeds the prompts; ``X``, if given, is only validated
    and ``y`` is ignored. Labels are class indices into ``class_names``.
    """

    # The scikit-learn estimator checks this head cannot pass, with the reason (heads/base.py, end).
    _contract_skips = ZEROSHOT_SKIPS

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        templates: str | Sequence[str] | Mapping[str, Sequence[str]] = "generic",
        logit_scale: float | None = None,
        renormalize: bool = True,
        cache_dir: str | Path | None = None,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.templates = templates
        self.logit_scale = logit_scale
        self.renormalize = renormalize
        self.cache_dir = cache_dir

    def sentences(self) -> list[list[str]]:
        """Per class (in ``class_names`` order), the prompts that are embedded."""
        return class_prompts(self.class_names, self.templates)

    def fit(self, X=None, y=None):
        """Embed the prompts and build ``weights_`` (d, C)."""
        return self._fit_weights(embed_prompts(self.backbone, self.sentences(), self.cache_dir), self.renormalize,
                                 X, y)

    def fit_summary(self) -> dict:
        return {"prompts_per_class": sorted(set(self.prompts_per_class_)), "logit_scale": self.logit_scale_}
