"""Classification metrics with CLIP_benchmark's definitions, plus expected calibration error."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix


def topk_accuracy(y_true: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Fraction of samples whose true class is among the ``k`` highest scores (k capped at #classes).

    Ties are broken by class index, as ``argmax`` does, so acc1 equals argmax accuracy; a row with a
    non-finite score counts as wrong.
    """
    y_true = np.asarray(y_true)
    true_scores = scores[np.arange(len(y_true)), y_true][:, None]
    classes = np.arange(scores.shape[1])[None, :]
    ahead = (scores > true_scores) | ((scores == true_scores) & (classes < y_true[:, None]))
    correct = (ahead.sum(axis=1) < min(k, scores.shape[1])) & np.isfinite(scores).all(axis=1)
    return float(np.mean(correct))


def mean_per_class_recall(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Balanced accuracy: the mean over classes present in ``y_true`` of per-class recall."""
    return float(balanced_accuracy_score(y_true, y_pred))


def calibration_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width confidence bins on max probability: count, mean confidence and accuracy per bin."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins).astype(np.float64)
    safe = np.maximum(counts, 1)
    return {
        "edges": edges,
        "count": counts,
        "confidence": np.bincount(which, weights=confidence, minlength=n_bins) / safe,
        "accuracy": np.bincount(which, weights=correct, minlength=n_bins) / safe,
    }


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over bins of |bin| / n * |accuracy(bin) - confidence(bin)|."""
    bins = calibration_bins(y_true, probs, n_bins)
    weights = bins["count"] / max(1.0, bins["count"].sum())
    return float(np.sum(weights * np.abs(bins["accuracy"] - bins["confidence"])))


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """acc1, acc5, mean_per_class_recall (CLIP_benchmark keys) and ece.

    As CLIP_benchmark, acc5 is NaN with fewer than 5 classes (top-5 would be trivially 1).
    """
    y_true = np.asarray(y_true)
    y_pred = scores.argmax(axis=1)
    return {
        "acc1": topk_accuracy(y_true, scores, 1),
        "acc5": topk_accuracy(y_true, scores, 5) if scores.shape[1] >= 5 else float("nan"),
        "mean_per_class_recall": mean_per_class_recall(y_true, y_pred),
        "ece": expected_calibration_error(y_true, probs),
    }


def normalized_confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix with rows (true classes) normalised to sum to 1 (empty rows stay 0)."""
    matrix = confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).astype(np.float64)
    return matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
