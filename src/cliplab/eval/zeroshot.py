"""Zero-shot evaluation of a backbone on a labelled dataset: metrics, results JSON, plots."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import softmax

from ..data.base import ImageDataset
from ..errors import DatasetError
from ..features.cache import digest
from ..features.embed import ImageFeatures, embed_images
from ..heads.zeroshot import ZeroShotClassifier
from ..models.backbone import Backbone
from .metrics import classification_metrics
from .plots import plot_confusion, plot_reliability
from .results import results_record, weights_note, write_json

CLIP_BENCHMARK_KEYS = ("acc1", "acc5", "mean_per_class_recall")


@dataclass
class ZeroShotReport:
    """What ``evaluate_zeroshot`` measured and wrote."""

    metrics: dict[str, float]
    record: dict
    features: ImageFeatures
    files: dict[str, Path] = field(default_factory=dict)


def evaluate_zeroshot(
    backbone: Backbone,
    dataset: ImageDataset,
    templates: str | list[str],
    output_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> ZeroShotReport:
    """Embed ``dataset``, classify zero-shot, compute metrics; write JSON + PNGs to ``output_dir``."""
    start = time.perf_counter()
    if not (dataset.labels >= 0).any():
        raise DatasetError(f"{dataset.name}: no labelled images to evaluate")
    head = ZeroShotClassifier(backbone, dataset.class_names, templates, cache_dir=cache_dir).fit()
    features = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=num_workers,
                            progress=progress)
    labelled = features.labels >= 0
    X, y = np.asarray(features.features)[labelled], features.labels[labelled]
    scores = head.decision_function(X)
    probs = softmax(scores, axis=1)
    metrics = classification_metrics(y, scores, probs)
    extra = {
        "method": "zeroshot",
        "params": {"templates": templates if isinstance(templates, str) else list(templates),
                   "num_templates": len(head.templates_), "logit_scale": head.logit_scale_},
        "seed": seed,
        "num_images": int(labelled.sum()),
        "failed_images": [{"item": item, "reason": reason} for item, reason in features.failures],
        "feature_cache_key": features.cache_key,
        "calibration": {"ece": metrics["ece"], "bins": 15},
        "elapsed_seconds": round(time.perf_counter() - start, 3),
    }
    record = results_record(dataset=dataset.name, backbone=backbone, task="zeroshot_classification",
                            metrics={k: metrics[k] for k in CLIP_BENCHMARK_KEYS}, extra=extra)
    report = ZeroShotReport(metrics, record, features)
    if output_dir is not None:
        report.files = _write(record, y, scores, probs, dataset, backbone, Path(output_dir), features.cache_key)
    return report


def _write(record, y, scores, probs, dataset, backbone, out: Path, cache_key: str) -> dict[str, Path]:
    """JSON + PNGs named by dataset, model and a short hash of model id and data, so runs never overwrite."""
    model = Path(backbone.info.name).name + (f"-{backbone.info.pretrained}" if backbone.info.pretrained else "")
    tag = digest(backbone.model_id, cache_key)[:8]
    stem = f"zeroshot_{dataset.name}_{model}_{tag}".replace("/", "-").replace(":", "-")
    title = f"{dataset.name} · {Path(backbone.info.name).name}"
    if backbone.info.random_weights:
        title += " (random weights)"
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": write_json(record, out / f"{stem}.json")}
    files["confusion"] = plot_confusion(y, scores.argmax(1), dataset.class_names, out / f"{stem}_confusion.png",
                                        f"Confusion · {title}")
    files["reliability"] = plot_reliability(y, probs, out / f"{stem}_reliability.png",
                                            f"Reliability · {title}\n{weights_note(backbone)}")
    return files
