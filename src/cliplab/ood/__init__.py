"""Open-set recognition: OOD scores (higher = more in-distribution) and OpenOOD's metrics."""

from __future__ import annotations

from .clipn import atd, atd_score, ctw, ctw_score
from .glmcm import glmcm, local_mcm
from .metrics import FPR_CONVENTIONS, fpr_at_tpr, ood_metrics, threshold_at_tpr
from .scores import SCORES, energy, max_logit, mcm, msp, score

__all__ = [
    "atd", "atd_score", "ctw", "ctw_score",
    "FPR_CONVENTIONS",
    "SCORES",
    "energy",
    "fpr_at_tpr",
    "glmcm",
    "local_mcm",
    "max_logit",
    "mcm",
    "msp",
    "ood_metrics",
    "score",
    "threshold_at_tpr",
]
