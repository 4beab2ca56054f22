"""Open-set recognition: OOD scores (higher = more in-distribution) as registered plugins, and OpenOOD's metrics.

Every module of this package but ``base``, ``registry`` and ``metrics`` holds scores registered with
``@register_score`` (``registry.load_all`` imports them on first lookup). The functions and classes are
imported on first use (PEP 562), so ``cliplab.ood`` and its registry load without scipy or torch, and
``describe_scores`` lists the scores without importing them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .registry import (
    NEEDS,
    ScoreEntry,
    ScoreSummary,
    create_score,
    describe_scores,
    list_scores,
    load_all,
    register_score,
    score_entry,
)

_LAZY = {
    "atd": "clipn", "atd_score": "clipn", "ctw": "clipn", "ctw_score": "clipn",
    "glmcm": "gl_mcm", "local_mcm": "gl_mcm",
    "FPR_CONVENTIONS": "metrics", "fpr_at_tpr": "metrics", "ood_metrics": "metrics", "threshold_at_tpr": "metrics",
    "energy": "scores", "max_logit": "scores", "mcm": "scores", "msp": "scores",
    "OODScore": "base", "ScoreContext": "base", "ScoreInputs": "base",
}

__all__ = [
    "FPR_CONVENTIONS", "NEEDS", "OODScore", "ScoreContext", "ScoreEntry", "ScoreInputs", "ScoreSummary",
    "atd", "atd_score", "create_score", "ctw", "ctw_score", "describe_scores", "energy", "fpr_at_tpr", "glmcm",
    "list_scores", "load_all", "local_mcm", "max_logit", "mcm", "msp", "ood_metrics", "register_score",
    "score_entry", "threshold_at_tpr",
]

if TYPE_CHECKING:
    from .base import OODScore, ScoreContext, ScoreInputs
    from .clipn import atd, atd_score, ctw, ctw_score
    from .gl_mcm import glmcm, local_mcm
    from .metrics import FPR_CONVENTIONS, fpr_at_tpr, ood_metrics, threshold_at_tpr
    from .scores import energy, max_logit, mcm, msp


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
