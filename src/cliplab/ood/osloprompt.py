"""OSLoPrompt's rejection as an OOD score (paper 39): the head's unknown prompt against its best known class.

``cliplab ood --method osloprompt --scores osloprompt`` (or ``--head DIR`` of a saved OSLoPrompt head): the head
(``heads/osloprompt.py``) is fitted on the ID train split with its pseudo-open samples (``--param open_data=...``);
the score is ``unknown_margin`` = max known logit - unknown logit (higher = more in-distribution), and a sample is
rejected when it is below 0 (the unknown logit wins: the authors' arg-max over the known classes and "unknown").
Having that decision (``threshold = 0``), the evaluation also reports the known accuracy, the unknown accuracy and
their harmonic mean, the H-score (``cliplab.ood.metrics.open_set_metrics``).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..errors import CliplabError
from .base import OODScore, ScoreContext, ScoreInputs
from .registry import register_score


@register_score("osloprompt", paper=39, needs=("features", "head"))
class OSLoPromptScore(OODScore):
    """OSLoPrompt's unknown prompt: max known logit minus the unknown logit, rejected below 0"""

    threshold: ClassVar[float | None] = 0.0

    def setup(self, context: ScoreContext) -> None:
        """The head must be an OSLoPrompt (it has the unknown prompt); refused in one line before any embedding."""
        super().setup(context)
        head = self._needs(context.head, "head")
        if not callable(getattr(head, "unknown_margin", None)):
            raise CliplabError(f"OOD score 'osloprompt' reads an OSLoPrompt head's unknown prompt, not a "
                               f"{type(head).__name__}: run it with --method osloprompt (and --param open_data=...) "
                               "or --head of a saved OSLoPrompt head")
        fitted = hasattr(head, "unknown_weights_")
        if (head.unknown_weights_ is None) if fitted else head.get_params().get("open_data") is None:
            raise CliplabError("OOD score 'osloprompt': the OSLoPrompt head has no unknown prompt without pseudo-open "
                               "samples; fit it with --param open_data=FOLDER_OR_DATASET (and open_classes=...)")

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        return np.asarray(self.context_.head.unknown_margin(np.asarray(inputs.features)), dtype=np.float64)
