"""COOkeD's OOD score (paper 1) as a plugin: the ensemble head (``heads/cooked.py``) fitted on the ID data.

The score fits its own COOkeD head once per evaluation on the ID train split, choosing the probe's C on the
val split (``fit_data``; the ID test set never reaches the fit), then gives ``cooked_scores(head, X)``: the
authors' headline ``entropy`` (minus the entropy of the probe + zero-shot CLIP ensemble) or its ``msp``.
It does not read the evaluation's head: the ensemble is the method.
"""

from __future__ import annotations

import numpy as np

from ..errors import CliplabError
from .base import OODScore, ScoreInputs
from .registry import register_score

STATISTICS = ("entropy", "msp")


@register_score("cooked", paper=1, needs=("features", "fit_data"))
class COOkeDScore(OODScore):
    """ensemble of closed-world classifier, zero-shot CLIP and a linear probe (fit on ID train/val)"""

    def __init__(self, statistic: str = "entropy"):
        self.statistic = statistic

    def fit(self, train, val) -> None:
        from ..heads.registry import create_head

        if self.statistic not in STATISTICS:
            raise CliplabError(f"cooked: statistic {self.statistic!r}; use one of {', '.join(STATISTICS)}")
        head = create_head("cooked", backbone=self.context_.backbone, class_names=self.context_.class_names)
        self.head_ = head.fit(train.features, train.labels, X_val=val.features, y_val=val.labels)

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        from ..heads.cooked import cooked_scores

        return cooked_scores(self.head_, inputs.features)[self.statistic]
