"""OpenOOD's metrics for OOD detection from scores where higher = more in-distribution.

AUROC, AUPR-in and AUPR-out follow OpenOOD (``openood/evaluators/metrics.py``): AUPR is the trapezoidal area
under scikit-learn's precision-recall curve (``auc(recall, precision)``), with ID as positive (in) or OOD as
positive on negated scores (out). Average precision (scikit-learn's step-wise AUPR, what the MCM code reports)
is given beside it as ``ap_in``/``ap_out``. FPR@95%TPR has three conventions, named in the result; the first two
equal their source's code on every input, ties included:

- ``"id-positive"`` (the default; MCM's ``get_measures`` in ``utils/detection_util.py``, the CLIP OOD literature):
  ID is positive; among the ROC points of every distinct score threshold, down to the one that keeps all of ID,
  the point whose TPR is closest to 0.95, the lowest threshold among ties; the fraction of OOD scored at or
  above it.
- ``"ood-positive"`` (OpenOOD's ``compute_all_metrics``): OOD is positive on negated scores; the first point with
  TPR >= 0.95 of scikit-learn's ``roc_curve`` as OpenOOD calls it (``drop_intermediate=True``: points collinear
  with their neighbours are dropped, so with ties the next corner of the curve is read).
- ``"id-positive-at-least"`` (cliplab's own, not any paper's): ID is positive; the highest threshold that keeps
  at least 95% of ID (:func:`threshold_at_tpr`), the fraction of OOD scored at or above it.

Open-set recognition (a score with a decision threshold, e.g. OSLoPrompt's unknown prompt): :func:`h_score` is the
harmonic mean of the known-class accuracy (an ID sample counts when it is accepted and correctly classified) and the
unknown accuracy (the fraction of OOD samples rejected), as OSLoPrompt's ``pacs.py`` and the open-set domain
generalisation papers report it; :func:`open_set_metrics` computes all three from predictions and scores.
"""

from __future__ import annotations

from numbers import Real

import numpy as np
from scipy.stats import rankdata

from ..errors import CliplabError, FeatureError

FPR_CONVENTIONS = ("id-positive", "ood-positive", "id-positive-at-least")


def _scores(name: str, values) -> np.ndarray:
    """``values`` as a finite, non-empty 1-D float64 array, else a FeatureError naming ``name``."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise FeatureError(f"{name} must be a non-empty 1-D array of scores, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise FeatureError(f"{name} holds NaN or infinite values")
    return array


def _n_kept(n: int, tpr: float) -> int:
    """The smallest k with k / n >= tpr, compared in floating point as scikit-learn's ``tpr >= 0.95`` is."""
    k = min(max(int(np.ceil(tpr * n)), 1), n)
    while k > 1 and (k - 1) / n >= tpr:
        k -= 1
    while k < n and k / n < tpr:
        k += 1
    return k


def threshold_at_tpr(id_scores, tpr: float = 0.95) -> float:
    """The highest score threshold ``t`` with at least ``tpr`` of ``id_scores >= t``: the ceil(tpr * n)-th
    highest ID score (with ties at ``t``, more than that are kept)."""
    if not (isinstance(tpr, Real) and 0 < tpr < 1):
        raise CliplabError(f"tpr must be strictly between 0 and 1, got {tpr!r}")
    scores = _scores("id_scores", id_scores)
    return float(np.sort(scores)[::-1][_n_kept(scores.size, tpr) - 1])


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95, convention: str = "id-positive") -> float:
    """False-positive rate at ``tpr`` true-positive rate under ``convention`` (see the module docstring)."""
    id_s, ood_s = _scores("id_scores", id_scores), _scores("ood_scores", ood_scores)
    if not (isinstance(tpr, Real) and 0 < tpr < 1):
        raise CliplabError(f"tpr must be strictly between 0 and 1, got {tpr!r}")
    if convention == "id-positive":
        return _closest_recall_fpr(id_s, ood_s, tpr)
    if convention == "ood-positive":
        return _first_corner_fpr(-ood_s, -id_s, tpr)
    if convention == "id-positive-at-least":
        return float(np.mean(ood_s >= threshold_at_tpr(id_s, tpr)))
    raise CliplabError(f"unknown FPR convention {convention!r}; known: {', '.join(FPR_CONVENTIONS)}")


def _curve(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) scored at or above each distinct score, highest score first."""
    scores = np.concatenate([positive, negative])
    labels = np.concatenate([np.ones(positive.size), np.zeros(negative.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # last index of each distinct score
    tps = np.cumsum(labels, dtype=np.float64)[last]
    return tps, (last + 1) - tps


def _closest_recall_fpr(positive: np.ndarray, negative: np.ndarray, tpr: float) -> float:
    """MCM's rule: the point (down to the first threshold reaching full recall) whose recall is closest to
    ``tpr``; ``argmin`` over the points ordered from the lowest threshold up takes the lowest among ties.
    (MCM's code also appends a point (recall 1, 0 false positives) after the highest threshold; it never wins:
    the lowest kept threshold has recall exactly 1 and comes first.)"""
    tps, fps = _curve(positive, negative)
    full = int(np.searchsorted(tps, tps[-1]))  # first threshold at which every positive is kept
    recall = (tps / tps[-1])[full::-1]
    return float(fps[full::-1][np.argmin(np.abs(recall - tpr))] / negative.size)


def _first_corner_fpr(positive: np.ndarray, negative: np.ndarray, tpr: float) -> float:
    """OpenOOD's rule: scikit-learn's ``roc_curve`` (collinear intermediate points dropped, a (0, 0) point
    prepended), read at the first point with TPR >= ``tpr``."""
    tps, fps = _curve(positive, negative)
    if fps.size > 2:
        corner = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        tps, fps = tps[corner], fps[corner]
    tpr_list = np.r_[0.0, tps] / tps[-1]
    fpr_list = np.r_[0.0, fps] / fps[-1] if fps[-1] > 0 else np.full(tps.size + 1, np.nan)
    return float(fpr_list[np.argmax(tpr_list >= tpr)])


def _auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(positive > negative) + 0.5 P(tie): the Mann-Whitney U statistic, equal to the ROC area."""
    ranks = rankdata(np.concatenate([positive, negative]))
    u = ranks[: positive.size].sum() - positive.size * (positive.size + 1) / 2
    return float(u / (positive.size * negative.size))


def _precision_recall(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's precision-recall points at each distinct threshold, highest threshold first."""
    tps, fps = _curve(positive, negative)
    return tps / (tps + fps), tps / positive.size


def _aupr(positive: np.ndarray, negative: np.ndarray) -> tuple[float, float]:
    """(trapezoidal AUPR as OpenOOD, average precision as scikit-learn) with ``positive`` as the positive class."""
    precision, recall = _precision_recall(positive, negative)
    r = np.r_[0.0, recall]
    p = np.r_[1.0, precision]
    trapezoid = float(np.sum(np.diff(r) * (p[1:] + p[:-1]) / 2))
    average_precision = float(np.sum(np.diff(r) * p[1:]))
    return trapezoid, average_precision


def ood_metrics(id_scores, ood_scores, fpr_convention: str = "id-positive") -> dict:
    """AUROC, FPR@95%TPR, AUPR-in and AUPR-out (OpenOOD) plus average precision, for scores where higher =
    more in-distribution. ``fpr95_convention`` in the result says which FPR@95 convention was used."""
    id_s, ood_s = _scores("id_scores", id_scores), _scores("ood_scores", ood_scores)
    fpr95 = fpr_at_tpr(id_s, ood_s, 0.95, fpr_convention)
    aupr_in, ap_in = _aupr(id_s, ood_s)
    aupr_out, ap_out = _aupr(-ood_s, -id_s)
    return {
        "auroc": _auroc(id_s, ood_s),
        "fpr95": fpr95,
        "fpr95_convention": fpr_convention,
        "aupr_in": aupr_in,
        "aupr_out": aupr_out,
        "ap_in": ap_in,
        "ap_out": ap_out,
        "n_id": int(id_s.size),
        "n_ood": int(ood_s.size),
    }


def h_score(acc_known: float, acc_unknown: float) -> float:
    """Harmonic mean ``2 a_k a_u / (a_k + a_u)`` of the known and unknown accuracies (0 when both are 0)."""
    a, b = float(acc_known), float(acc_unknown)
    if not (0 <= a <= 1 and 0 <= b <= 1):
        raise CliplabError(f"accuracies must lie in [0, 1], got {acc_known!r} and {acc_unknown!r}")
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def open_set_metrics(id_predictions, id_labels, id_scores, ood_scores, threshold: float = 0.0) -> dict:
    """Known accuracy (ID samples accepted, ``score >= threshold``, and predicted as their label), unknown accuracy
    (OOD samples rejected, ``score < threshold``) and their :func:`h_score`."""
    id_s, ood_s = _scores("id_scores", id_scores), _scores("ood_scores", ood_scores)
    predictions, labels = np.asarray(id_predictions), np.asarray(id_labels)
    if predictions.shape != id_s.shape or labels.shape != id_s.shape:
        raise FeatureError(f"id_predictions {predictions.shape} and id_labels {labels.shape} must match id_scores "
                           f"{id_s.shape}")
    if not np.isfinite(float(threshold)):
        raise CliplabError(f"threshold must be finite, got {threshold!r}")
    known = float(np.mean((id_s >= threshold) & (predictions == labels)))
    unknown = float(np.mean(ood_s < threshold))
    return {"threshold": float(threshold), "acc_known": known, "acc_unknown": unknown,
            "h_score": h_score(known, unknown), "n_id": int(id_s.size), "n_ood": int(ood_s.size)}
