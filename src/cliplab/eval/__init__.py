"""Metrics (CLIP_benchmark definitions), results JSON and plots."""

from .metrics import (
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    mean_per_class_recall,
    normalized_confusion,
    topk_accuracy,
)
from .results import results_record, write_json
from .zeroshot import ZeroShotReport, evaluate_zeroshot

__all__ = [
    "ZeroShotReport", "calibration_bins", "classification_metrics", "evaluate_zeroshot",
    "expected_calibration_error", "mean_per_class_recall", "normalized_confusion", "results_record",
    "topk_accuracy", "write_json",
]
