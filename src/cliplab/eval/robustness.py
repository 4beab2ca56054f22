"""Accuracy, calibration and OOD detection under common corruptions (paper 11: Hendrycks & Dietterich, ImageNet-C).

Every cell (clean, and each corruption x severity of :mod:`cliplab.data.corruptions`) is the same seeded subset
of test images, embedded through the feature cache and classified by the zero-shot head (CLIP prompt
ensembling). Per cell: top-1, ECE (15 bins, Guo et al. 2017) and, with an OOD dataset, the MCM score's
AUROC and FPR@95 (ID = the test images of the cell, OOD = the OOD images; by default the OOD images get the
same corruption, as a degraded camera would degrade both, ``ood_corrupted=False`` keeps them clean).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import softmax

from ..data.base import NO_LABEL, ImageDataset, Subset, has_labels
from ..data.corruptions import CORRUPTIONS, CorruptedDataset, corruption_parameter
from ..errors import CliplabError, DatasetError
from ..features.embed import embed_images
from ..heads.registry import create_head
from ..models.backbone import Backbone
from ..ood.metrics import ood_metrics
from ..ood.scores import mcm
from .metrics import expected_calibration_error, topk_accuracy
from .results import results_record, write_json

DEFAULT_SEVERITIES = (1, 3, 5)
DEFAULT_LIMIT = 1000


@dataclass
class RobustnessReport:
    """The cells measured (``rows``), the JSON record and the files written."""

    rows: list[dict]
    record: dict
    num_images: int
    num_ood: int | None
    files: dict[str, Path] = field(default_factory=dict)


def seeded_subset(dataset: ImageDataset, limit: int | None, seed: int) -> ImageDataset:
    """``limit`` items drawn without replacement with ``numpy.random.default_rng(seed)``, kept in dataset order;
    the dataset itself when it has at most ``limit`` items (or ``limit`` is None)."""
    if limit is None or len(dataset) <= limit:
        return dataset
    if limit < 1:
        raise CliplabError(f"--limit must be at least 1, got {limit}")
    indices = np.sort(np.random.default_rng(seed).choice(len(dataset), size=int(limit), replace=False))
    return Subset(dataset, indices)


def evaluate_robustness(
    backbone: Backbone,
    dataset: ImageDataset,
    templates: str | list[str],
    *,
    ood: ImageDataset | None = None,
    corruptions: Sequence[str] = tuple(CORRUPTIONS),
    severities: Sequence[int] = DEFAULT_SEVERITIES,
    limit: int | None = DEFAULT_LIMIT,
    seed: int = 0,
    ood_corrupted: bool = True,
    output_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
) -> RobustnessReport:
    """Measure every cell; write ``robustness_<dataset>.json`` and ``.png`` under ``output_dir`` if given."""
    start = time.perf_counter()
    if not has_labels(dataset):
        raise DatasetError(f"{dataset.name}: no labelled images to evaluate")
    for name in corruptions:
        for severity in severities:
            corruption_parameter(name, severity)  # unknown names or severities fail before any work
    head = create_head("zeroshot", backbone=backbone, class_names=dataset.class_names, templates=templates,
                       cache_dir=cache_dir)
    head.fit()
    test = seeded_subset(dataset, limit, seed)
    ood_data = seeded_subset(ood, limit, seed) if ood is not None else None

    def embed(data: ImageDataset):
        return embed_images(backbone, data, cache_dir, batch_size=batch_size, num_workers=num_workers,
                            progress=progress)

    clean_ood = embed(ood_data) if ood_data is not None and not ood_corrupted else None
    cells = [("clean", 0)] + [(name, int(s)) for name in corruptions for s in severities]
    rows, failures = [], {}
    for name, severity in cells:
        view = test if name == "clean" else CorruptedDataset(test, name, severity, seed)
        features = embed(view)
        keep = features.labels != NO_LABEL
        x, y = np.asarray(features.features)[keep], features.labels[keep]
        if len(y) == 0:
            raise DatasetError(f"{dataset.name}: no labelled image could be read")
        logits = head.logits(x)
        row = {"corruption": name, "severity": severity,
               "parameter": None if name == "clean" else corruption_parameter(name, severity),
               "num_images": int(len(y)), "acc1": topk_accuracy(y, logits, 1),
               "ece": expected_calibration_error(y, softmax(logits, axis=1)), "auroc": None, "fpr95": None}
        if ood_data is not None:
            if clean_ood is not None:
                ood_features = clean_ood
            else:
                ood_features = embed(ood_data if name == "clean" else CorruptedDataset(ood_data, name, severity, seed))
            if len(ood_features) == 0:
                raise DatasetError(f"{ood.name}: no OOD image could be read")
            scores = ood_metrics(mcm(x, head.weights_), mcm(np.asarray(ood_features.features), head.weights_))
            row["auroc"], row["fpr95"] = scores["auroc"], scores["fpr95"]
            failures.update({f"ood:{name}:{severity}:{item}": reason for item, reason in ood_features.failures})
        failures.update({f"{name}:{severity}:{item}": reason for item, reason in features.failures})
        rows.append(row)
    extra = {
        "method": "zeroshot",
        "paper": 11,
        "templates": templates if isinstance(templates, str) else list(templates),
        "seed": seed,
        "limit": limit,
        "num_images": len(test),
        "subset": "seeded" if len(test) < len(dataset) else "whole split",
        "split": dataset.split,
        "ood_dataset": None if ood is None else ood.name,
        "num_ood_images": None if ood_data is None else len(ood_data),
        "ood_score": None if ood is None else "mcm (T=1)",
        "ood_corrupted": None if ood is None else ood_corrupted,
        "corruptions": {name: list(CORRUPTIONS[name]) for name in corruptions},
        "severities": [int(s) for s in severities],
        "cells": rows,
        "failed_images": [{"item": item, "reason": reason} for item, reason in failures.items()],
        "elapsed_seconds": round(time.perf_counter() - start, 3),
    }
    clean = rows[0]
    corrupted = rows[1:]
    metrics = {"acc1_clean": clean["acc1"], "ece_clean": clean["ece"],
               "acc1_mean_corrupted": float(np.mean([r["acc1"] for r in corrupted])) if corrupted else None}
    record = results_record(dataset=dataset.name, model=features.model, task="robustness_corruptions",
                            metrics=metrics, extra=extra)
    report = RobustnessReport(rows, record, len(test), None if ood_data is None else len(ood_data))
    if output_dir is not None:
        from .plots import plot_robustness

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"robustness_{dataset.name}"
        report.files["json"] = write_json(record, out / f"{stem}.json")
        title = (f"{dataset.name} ({len(test)} images) · {features.model_id}"
                 + (f" · OOD {ood.name}" if ood is not None else ""))
        report.files["plot"] = plot_robustness(rows, out / f"{stem}.png", title)
    return report
