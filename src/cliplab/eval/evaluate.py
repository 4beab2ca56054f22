"""One evaluation for every head: fit on train features when the head needs them, score test features,
write the results JSON (CLIP_benchmark layout) and plots."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import softmax

from ..errors import CliplabError, DatasetError
from ..features.values import ImageFeatures
from ..fileio import digest
from ..heads.registry import head_entry
from .metrics import classification_metrics
from .plots import plot_confusion, plot_reliability
from .results import results_record, write_json

CLIP_BENCHMARK_KEYS = ("acc1", "acc5", "mean_per_class_recall")
SIMPLE = (str, int, float, bool, type(None))


@dataclass
class EvaluationReport:
    """What ``evaluate`` measured and wrote."""

    metrics: dict[str, float]
    record: dict
    features: ImageFeatures
    scores: np.ndarray
    files: dict[str, Path] = field(default_factory=dict)


def head_params(head) -> dict:
    """The head's hyperparameters that belong in a results file (no backbone, class list or cache folder; a file
    parameter such as a description set is recorded as its path)."""
    out = {}
    for key, value in head.get_params(deep=False).items():
        if key in ("backbone", "class_names", "cache_dir"):
            continue
        if isinstance(value, Path):  # a description file, a corpus: which one belongs in the record
            value = str(value)
        listed = isinstance(value, (list, tuple)) and all(isinstance(v, SIMPLE) for v in value)
        if isinstance(value, SIMPLE) or listed:
            out[key] = list(value) if isinstance(value, tuple) else value
        else:
            out[key] = f"<{type(value).__name__}>"
    return out


def _check_disjoint(test: ImageFeatures, other: ImageFeatures, role: str) -> None:
    if other.dataset == test.dataset:
        shared = set(other.item_ids) & set(test.item_ids)
        if shared:
            raise DatasetError(f"{test.dataset}: test item {next(iter(shared))!r} is also a {role} item; "
                               "test data must never reach fitting or tuning")


FIT_INPUTS = ("views", "caption_features", "images", "unlabelled")  # declared needs passed to fit by that keyword
WITH_NEED = {"unlabelled_images": "unlabelled"}  # fit inputs passed to a head that declares the need named


def fit_head(head, train: ImageFeatures | None = None, val: ImageFeatures | None = None, **fit_params):
    """Fit ``head`` as its registration declares: without data, or on ``train`` (with ``val`` as ``X_val``/``y_val``
    if it needs "val", and each of ``fit_params`` it declares in ``needs``, e.g. augmented ``views``)."""
    entry = head_entry(head)
    if entry.needs_train and train is None:
        raise CliplabError(f"method {entry.name!r} needs training features (pass train=...)")
    if train is None:
        return head.fit()
    extra = {key: value for key, value in fit_params.items() if value is not None and (
             key in FIT_INPUTS and key in entry.needs or WITH_NEED.get(key) in entry.needs)}
    if val is not None and "val" in entry.needs:
        extra.update(X_val=val.features, y_val=val.labels)
    return head.fit(train.features, train.labels, **extra)


def evaluate(
    head,
    test: ImageFeatures,
    train: ImageFeatures | None = None,
    *,
    val: ImageFeatures | None = None,
    fit_params: dict | None = None,
    output_dir: str | Path | None = None,
    seed: int = 0,
    shots: int | None = None,
    split_file: str | Path | None = None,
    fitted: bool = False,
) -> EvaluationReport:
    """Fit ``head`` (on ``train``'s labelled rows if it needs training data, tuning on ``val`` if it declares
    "val"; else without data), score the labelled rows of ``test``, and write
    ``<method>_<dataset>_<split>_<model>_<hash>.json`` plus confusion and reliability PNGs to ``output_dir``.
    Test rows never reach fitting or tuning: sharing an item with ``train`` or ``val`` is an error. ``fitted``: the
    head was already fitted on ``train``/``val`` (a head whose test features come from the Backbone it trained).
    """
    start = time.perf_counter()
    entry = head_entry(head)
    test = test.labelled()
    if len(test) == 0:
        raise DatasetError(f"{test.dataset} ({test.split}): no labelled images to evaluate")
    train = train.labelled() if train is not None else None
    val = val.labelled() if val is not None else None
    for other, role in ((train, "training"), (val, "validation")):
        if other is not None:
            _check_disjoint(test, other, role)
    if not fitted:
        fit_head(head, train, val, **(fit_params or {}))
    scores = _scores_per_class(head, test)
    probs = softmax(scores, axis=1)
    metrics = classification_metrics(test.labels, scores, probs)
    extra = {
        "method": entry.name,
        "family": entry.family,
        "paper": entry.paper,
        "params": head_params(head),
        "fit": head.fit_summary(),
        "seed": seed,
        "shots": shots,
        "split": test.split,
        "split_info": test.split_info,
        "train_split": None if train is None else {"split": train.split, "num_images": len(train)},
        "val_split": None if val is None else {"split": val.split, "num_images": len(val)},
        "split_file": None if split_file is None else str(split_file),
        "num_images": len(test),
        "failed_images": [{"item": item, "reason": reason} for item, reason in test.failures],
        "feature_cache_keys": {"test": test.cache_key, "train": None if train is None else train.cache_key},
        "calibration": {"ece": metrics["ece"], "bins": 15},
        "elapsed_seconds": round(time.perf_counter() - start, 3),
    }
    record = results_record(dataset=test.dataset, model=test.model, task="zeroshot_classification"
                            if entry.family == "zeroshot" else f"{entry.family}_classification",
                            metrics={k: metrics[k] for k in CLIP_BENCHMARK_KEYS}, extra=extra)
    report = EvaluationReport(metrics, record, test, scores)
    if output_dir is not None:
        report.files = _write(record, test, scores, probs, Path(output_dir), entry.name)
    return report


def _scores_per_class(head, test: ImageFeatures) -> np.ndarray:
    """Logits with one column per class of ``test.class_names`` (classes the head never saw: -inf)."""
    raw = np.asarray(head.logits(test.features), dtype=np.float64)
    n_classes = len(test.class_names) or raw.shape[1]
    classes = np.asarray(head.classes_)
    if raw.shape[1] == n_classes and np.array_equal(classes, np.arange(n_classes)):
        return raw
    if not np.issubdtype(classes.dtype, np.integer) or classes.min() < 0 or classes.max() >= n_classes:
        raise CliplabError(f"the head's classes {classes[:5].tolist()}... are not indices into the dataset's "
                           f"{n_classes} classes")
    full = np.full((len(raw), n_classes), -np.inf)
    full[:, classes] = raw
    return full


def _write(record, test: ImageFeatures, scores, probs, out: Path, method: str) -> dict[str, Path]:
    """JSON + PNGs named by method, dataset, model and a short hash of the run, so runs never overwrite."""
    model = Path(str(record["model"])).name
    tag = digest(test.model_id, str(test.cache_key), method, repr(record["cliplab"]["params"]),
                 str(record["cliplab"]["shots"]), str(record["cliplab"]["seed"]),
                 str(record["cliplab"]["feature_cache_keys"]))[:8]
    stem = f"{method}_{test.dataset}_{test.split}_{model}_{tag}".replace("/", "-").replace(":", "-")
    title = f"{method} · {test.dataset} ({test.split}) · {model}"
    weights = record["cliplab"]["weights"]
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": write_json(record, out / f"{stem}.json")}
    files["confusion"] = plot_confusion(test.labels, scores.argmax(1), test.class_names, out / f"{stem}_confusion.png",
                                        f"Confusion · {title}\n{weights}")
    files["reliability"] = plot_reliability(test.labels, probs, out / f"{stem}_reliability.png",
                                            f"Reliability · {title}\n{weights}")
    return files
