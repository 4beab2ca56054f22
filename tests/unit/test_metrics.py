"""Metrics against hand-computed values."""

import numpy as np
import pytest

from cliplab.eval import (
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    mean_per_class_recall,
    topk_accuracy,
)

Y = np.array([0, 0, 1, 2])
SCORES = np.array([
    [0.9, 0.05, 0.05, 0.0, 0.0, 0.0],  # right
    [0.15, 0.6, 0.2, 0.05, 0.0, 0.0],  # wrong; true class 0 ranked 3rd
    [0.2, 0.7, 0.1, 0.0, 0.0, 0.0],    # right
    [0.5, 0.1, 0.05, 0.03, 0.2, 0.12],  # wrong; true class 2 ranked 5th
])


def test_topk_by_hand_and_against_sklearn():
    from sklearn.metrics import top_k_accuracy_score

    for k in (1, 2, 3, 4, 5):
        assert topk_accuracy(Y, SCORES, k) == top_k_accuracy_score(Y, SCORES, k=k, labels=range(6))
    assert topk_accuracy(Y, SCORES, 1) == 0.5
    assert topk_accuracy(Y, SCORES, 3) == 0.75
    assert topk_accuracy(Y, SCORES, 5) == 1.0


def test_topk_caps_k_at_number_of_classes():
    two = np.array([[0.2, 0.8], [0.6, 0.4]])
    assert topk_accuracy(np.array([1, 1]), two, 5) == 1.0
    assert topk_accuracy(np.array([1, 1]), two, 1) == 0.5


def test_mean_per_class_recall_by_hand():
    # class 0: 1/2 right, class 1: 1/1, class 2: 0/1 -> mean 0.5
    assert mean_per_class_recall(Y, SCORES.argmax(1)) == pytest.approx((0.5 + 1 + 0) / 3)


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    y = np.array([0, 1, 1, 1])
    # confidences .9 (right), .8 (wrong), .7 (right), .6 (wrong); 10 bins of width .1
    # bins: (.8,.9]: conf .9 acc 1 -> |.1|; (.7,.8]: .8 acc 0 -> .8; (.6,.7]: .7 acc 1 -> .3; (.5,.6]: .6 acc 0 -> .6
    assert expected_calibration_error(y, probs, n_bins=10) == pytest.approx((0.1 + 0.8 + 0.3 + 0.6) / 4)
    bins = calibration_bins(y, probs, n_bins=10)
    assert bins["count"].sum() == 4 and bins["count"][8] == 1


def test_perfectly_calibrated_gives_zero_ece():
    probs = np.array([[1.0, 0.0]] * 5)
    assert expected_calibration_error(np.zeros(5, int), probs) == 0.0


def test_classification_metrics_keys():
    probs = SCORES / SCORES.sum(1, keepdims=True)
    metrics = classification_metrics(Y, SCORES, probs)
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall", "ece"}
    assert metrics["acc5"] == 1.0 and metrics["acc1"] == 0.5


def test_ties_follow_argmax_and_nan_rows_are_wrong():
    scores = np.array([[1.0, 1.0, 0.0], [np.nan, np.nan, np.nan], [0.0, 0.0, 0.0], [0.0, 2.0, 2.0]])
    y = np.array([1, 1, 0, 2])
    # argmax picks class 0 on row 0 (wrong), NaN row wrong, class 0 on row 2 (right), class 1 on row 3 (wrong)
    assert topk_accuracy(y, scores, 1) == 0.25
    assert topk_accuracy(y, scores, 2) == 0.75  # rows 0, 2 and 3 have the true class within 2
