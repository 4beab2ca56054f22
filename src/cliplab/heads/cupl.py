"""CuPL: customised prompts via language models (Pratt et al., "What does a platypus look like?", ICCV 2023).

Not in ../shared/papers.md, so registered without a paper number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..data.descriptions import load_descriptions
from ..data.prompts import check_class_names, fill_template, load_templates
from ..features.text import embed_prompts
from ..models.backbone import Backbone
from .base import ZEROSHOT_SKIPS, TextWeightsHead
from .registry import register


@register("cupl", family="zeroshot", needs_train=False, needs=("descriptions",), default_templates=(),
          gives=("class_weights", "sentences"))
class CuPLClassifier(TextWeightsHead):
    """CuPL: w_c = the renormalised mean of the embeddings of class c's LLM-written sentences (CLIP's ensembling).

    ``descriptions`` is a CuPL file (``.json``/``.json.gz``, ``{class: [full sentences]}``) or a mapping, matched
    to ``class_names`` loosely (``subset`` allows a file covering more classes); the sentences are embedded as they
    stand. ``templates`` (optional) are filled with each class name and ensembled together with the sentences:
    the paper's "CuPL + e" combination with hand-written templates. With no descriptions the head is the template
    classifier (``templates``, else the "generic" set). As the authors' code, each sentence embedding is
    normalised, the class mean renormalised, and logits are ``logit_scale * x . w_c``.
    """

    # The scikit-learn estimator checks this head cannot pass, with the reason (heads/base.py, end).
    _contract_skips = ZEROSHOT_SKIPS

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        descriptions: str | Path | Mapping[str, Sequence[str]] | None = None,
        templates: str | Sequence[str] | None = None,
        subset: bool = False,
        logit_scale: float | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.descriptions = descriptions
        self.templates = templates
        self.subset = subset
        self.logit_scale = logit_scale
        self.cache_dir = cache_dir

    def sentences(self) -> list[list[str]]:
        """Per class (in ``class_names`` order), the prompts that are embedded: sentences, then filled templates."""
        names = check_class_names(list(self.class_names), "class names")
        templates = self.templates if self.templates is not None or self.descriptions is not None else "generic"
        filled = load_templates(templates) if templates is not None else []
        sentences = ({name: [] for name in names} if self.descriptions is None
                     else load_descriptions(self.descriptions, names, subset=self.subset))
        return [sentences[name] + [fill_template(t, name) for t in filled] for name in names]

    def fit(self, X=None, y=None):
        """Embed the prompts and build ``weights_`` (d, C)."""
        return self._fit_weights(embed_prompts(self.backbone, self.sentences(), self.cache_dir), True, X, y)

    def fit_summary(self) -> dict:
        counts = sorted(set(self.prompts_per_class_))
        return {"prompts_per_class": [counts[0], counts[-1]], "logit_scale": self.logit_scale_}
