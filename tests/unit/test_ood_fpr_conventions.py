"""Each named FPR@95 convention equals its source's code, ties included (issue 21, item 13).

The references below are written out from the authors' code, step by step:
MCM (deeplearning-wisc/MCM, utils/detection_util.py: get_measures -> fpr_and_fdr_at_recall) and OpenOOD
(Jingkang50/OpenOOD, openood/evaluators/metrics.py: compute_all_metrics -> auc_and_fpr_recall).
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from cliplab.ood.metrics import FPR_CONVENTIONS, fpr_at_tpr, ood_metrics

ISSUE_MCM = (np.arange(1.0, 21.0), np.array([1.5, -5.0, -6.0, -7.0]))
ISSUE_OPENOOD = (np.array([0, 3, 0, 0, 0, 0, 2], dtype=float),
                 np.array([3, 0, 0, 0, 2, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1], dtype=float))


def mcm_get_measures_fpr(pos: np.ndarray, neg: np.ndarray, recall_level: float = 0.95) -> float:
    """MCM's FPR: ID (``pos``) labelled 1, the ROC traced over distinct thresholds from the highest down to the
    first that recovers every positive, then reversed (lowest threshold first) with a (recall 1, fps 0) point
    appended; the cutoff is the argmin of |recall - level| (first = lowest threshold among ties)."""
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(pos.size, dtype=bool), np.zeros(neg.size, dtype=bool)])
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    idx = np.r_[np.where(np.diff(scores))[0], labels.size - 1]
    tps = np.cumsum(labels, dtype=np.float64)[idx]
    fps = 1 + idx - tps
    recall = tps / tps[-1]
    stop = tps.searchsorted(tps[-1])
    recall = np.r_[recall[stop::-1], 1]
    fps = np.r_[fps[stop::-1], 0]
    cutoff = np.argmin(np.abs(recall - recall_level))
    return float(fps[cutoff] / np.sum(~labels))


def openood_compute_all_metrics_fpr(id_conf: np.ndarray, ood_conf: np.ndarray, tpr_th: float = 0.95) -> float:
    """OpenOOD's FPR: label -1 marks OOD, OOD is the positive class on negated confidences, scikit-learn's
    ``roc_curve`` with its defaults (drop_intermediate=True), the first point with TPR >= 0.95."""
    conf = np.concatenate([id_conf, ood_conf])
    label = np.concatenate([np.zeros(id_conf.size), -np.ones(ood_conf.size)])
    ood_indicator = np.zeros_like(label)
    ood_indicator[label == -1] = 1
    fpr_list, tpr_list, _ = roc_curve(ood_indicator, -conf)
    return float(fpr_list[np.argmax(tpr_list >= tpr_th)])


def test_issue_inputs():
    id_s, ood_s = ISSUE_MCM
    assert mcm_get_measures_fpr(id_s, ood_s) == 0.25
    assert fpr_at_tpr(id_s, ood_s) == 0.25  # the default is MCM's
    assert fpr_at_tpr(id_s, ood_s, convention="id-positive") == 0.25
    assert fpr_at_tpr(id_s, ood_s, convention="id-positive-at-least") == 0.0  # cliplab's own, named apart
    id_s, ood_s = ISSUE_OPENOOD
    assert openood_compute_all_metrics_fpr(id_s, ood_s) == 1.0
    assert fpr_at_tpr(id_s, ood_s, convention="ood-positive") == 1.0
    assert ood_metrics(id_s, ood_s, "ood-positive")["fpr95"] == 1.0


def _draw(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n_id, n_ood = (int(v) for v in rng.integers(1, 60, size=2))
    if rng.random() < 0.75:  # heavy ties: a few integer levels, shifted
        levels = int(rng.integers(1, 7))
        return (rng.integers(0, levels, n_id).astype(float),
                rng.integers(0, levels, n_ood).astype(float) - float(rng.integers(0, 2)))
    return np.round(rng.normal(1.0, 1.0, n_id), 1), np.round(rng.normal(0.0, 1.0, n_ood), 1)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_random_ties_equal_the_sources():
    rng = np.random.default_rng(21)
    for _ in range(600):
        id_s, ood_s = _draw(rng)
        tpr = float(rng.choice([0.95, 0.9, 0.5]))
        assert fpr_at_tpr(id_s, ood_s, tpr, "id-positive") == mcm_get_measures_fpr(id_s, ood_s, tpr), (id_s, ood_s)
        expected = openood_compute_all_metrics_fpr(id_s, ood_s, tpr)
        got = fpr_at_tpr(id_s, ood_s, tpr, "ood-positive")
        assert got == expected or (np.isnan(got) and np.isnan(expected)), (id_s, ood_s)


def test_real_sized_scores_equal_the_sources():
    rng = np.random.default_rng(5)
    id_s = np.round(rng.normal(0.6, 0.15, 10_000), 3)  # MCM-like scores, rounded: many ties
    ood_s = np.round(rng.normal(0.4, 0.15, 8_000), 3)
    assert fpr_at_tpr(id_s, ood_s) == mcm_get_measures_fpr(id_s, ood_s)
    assert fpr_at_tpr(id_s, ood_s, convention="ood-positive") == openood_compute_all_metrics_fpr(id_s, ood_s)


def test_conventions_are_named():
    assert FPR_CONVENTIONS[0] == "id-positive" and set(FPR_CONVENTIONS) == {
        "id-positive", "ood-positive", "id-positive-at-least"}
