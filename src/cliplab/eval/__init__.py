"""Metrics (CLIP_benchmark definitions), one evaluation for every head, results JSON and plots."""

from .evaluate import EvaluationReport, evaluate, fit_head, head_params
from .metrics import (
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    mean_per_class_recall,
    normalized_confusion,
    topk_accuracy,
)
from .results import RANDOM_WEIGHTS_NOTE, results_record, write_json
from .zeroshot import evaluate_zeroshot

ZeroShotReport = EvaluationReport  # the name before every head shared one evaluation

__all__ = [
    "RANDOM_WEIGHTS_NOTE", "EvaluationReport", "ZeroShotReport", "calibration_bins", "classification_metrics",
    "evaluate", "evaluate_zeroshot", "fit_head", "expected_calibration_error", "head_params", "mean_per_class_recall",
    "normalized_confusion", "results_record", "topk_accuracy", "write_json",
]
