"""CLIPN decision rules (paper 18, "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No").

Pure numpy on given probabilities (the "no" model is trained in ``cliplab.train.clipn``).
``p_yes`` (n, C) is CLIP's softmax over classes; ``p_no`` (n, C) is, per class, the "no" probability
softmax([l_yes_i, l_no_i])[1] (paper eq. 6). Scores follow the authors' ``zero_shot_infer.py``
(higher = more in-distribution); the boolean decisions follow the paper (section 3.3):

* CTW (competing-to-win): score = 1 - p_no of the predicted class argmax_i p_yes_i; OOD if p_no > 0.5
  (the paper's "p_no_y > p_yes_y" of the binary yes/no pair).
* ATD (agreeing-to-differ): score = sum_i p_yes_i (1 - p_no_i); p_ood = 1 - score;
  OOD if p_ood > max_i p_yes_i (1 - p_no_i) (paper eq. 8).

Registered as the OOD scores ``clipn-ctw`` and ``clipn-atd``: they need the image features and an artefact, the
folder of a trained CLIPN (``ClipnModel.save``) or a loaded ``ClipnModel``; p_yes and p_no come from
``cliplab.train.clipn.clipn_probabilities`` with the evaluation's templates, computed once per dataset for both.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .base import OODScore, ScoreContext, ScoreInputs
from .registry import register_score


def _check(p_yes, p_no) -> tuple[np.ndarray, np.ndarray]:
    p_yes = np.asarray(p_yes, dtype=np.float64)
    p_no = np.asarray(p_no, dtype=np.float64)
    if p_yes.ndim != 2 or p_yes.shape != p_no.shape or p_yes.shape[1] == 0:
        raise ValueError(f"p_yes {p_yes.shape} and p_no {p_no.shape} must both be (n, C) with C >= 1")
    return p_yes, p_no


def ctw(p_yes, p_no) -> tuple[np.ndarray, np.ndarray]:
    """Competing-to-win: (score = 1 - p_no[predicted class], is_ood = p_no[predicted] > 0.5)."""
    p_yes, p_no = _check(p_yes, p_no)
    pred = p_yes.argmax(axis=1)
    p_no_pred = p_no[np.arange(len(pred)), pred]
    return 1.0 - p_no_pred, p_no_pred > 0.5


def atd(p_yes, p_no) -> tuple[np.ndarray, np.ndarray]:
    """Agreeing-to-differ: (score = sum_i p_yes_i (1 - p_no_i), is_ood = 1 - score > max_i p_yes_i (1 - p_no_i))."""
    p_yes, p_no = _check(p_yes, p_no)
    joint = p_yes * (1.0 - p_no)
    score = joint.sum(axis=1)
    return score, (1.0 - score) > joint.max(axis=1)


def ctw_score(p_yes, p_no) -> np.ndarray:
    """CTW score only (higher = more in-distribution)."""
    return ctw(p_yes, p_no)[0]


def atd_score(p_yes, p_no) -> np.ndarray:
    """ATD score only (higher = more in-distribution)."""
    return atd(p_yes, p_no)[0]


class _Clipn(OODScore):
    """A CLIPN decision rule's score on the trained model's yes/no probabilities (paper 18)."""

    artefact_help: ClassVar[str] = "the folder of a trained CLIPN, from cliplab train-clipn"

    def rule(self, p_yes: np.ndarray, p_no: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def setup(self, context: ScoreContext) -> None:
        """Load the CLIPN folder once per evaluation (shared by both rules); it must belong to this model."""
        super().setup(context)
        if "clipn-model" not in context.memo:
            model = self._needs(context.artefact, "artefact (a trained CLIPN)")
            if not hasattr(model, "encode_no_texts"):
                from ..train.clipn import ClipnModel

                model = ClipnModel.load(model, context.backbone)
            context.memo["clipn-model"] = model

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        from ..train.clipn import clipn_probabilities

        memo = self.context_.memo
        key = ("clipn", inputs.name)
        if key not in memo:
            features = np.array(inputs.features)  # a writable copy: torch warns on read-only arrays
            memo[key] = clipn_probabilities(memo["clipn-model"], features, self.context_.class_names,
                                            self.context_.templates)
        return self.rule(*memo[key])


@register_score("clipn-ctw", paper=18, needs=("features", "artefact"))
class ClipnCTW(_Clipn):
    """CLIPN competing-to-win with a trained 'no' text encoder"""

    def rule(self, p_yes: np.ndarray, p_no: np.ndarray) -> np.ndarray:
        return ctw_score(p_yes, p_no)


@register_score("clipn-atd", paper=18, needs=("features", "artefact"))
class ClipnATD(_Clipn):
    """CLIPN agreeing-to-differ with a trained 'no' text encoder"""

    def rule(self, p_yes: np.ndarray, p_no: np.ndarray) -> np.ndarray:
        return atd_score(p_yes, p_no)
