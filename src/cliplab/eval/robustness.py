"""Accuracy, calibration and OOD detection under common corruptions (paper 11: Hendrycks & Dietterich, ImageNet-C).

Every cell (clean, and each corruption x severity of :mod:`cliplab.data.corruptions`) is the same seeded subset
of test images, embedded through the feature cache and classified by a head: any registered method (fitted on the
clean ID train split where it needs data) or a fitted head; by default the zero-shot head (CLIP prompt
ensembling). Per cell: top-1, ECE (15 bins, Guo et al. 2017) and, with an OOD dataset, one registered OOD score's
AUROC and FPR@95 (default MCM; ID = the test images of the cell, OOD = the OOD images; by default the OOD images
get the same corruption, as a degraded camera would degrade both, ``ood_corrupted=False`` keeps them clean).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import softmax

from ..data.base import ImageDataset, Subset, has_labels
from ..data.corruptions import CORRUPTIONS, CorruptedDataset, corruption_parameter
from ..errors import CliplabError, DatasetError
from ..features.embed import embed_images
from ..models.backbone import Backbone
from ..ood.metrics import ood_metrics
from .evaluate import head_params as head_params_of
from .metrics import expected_calibration_error, topk_accuracy
from .naming import run_stem
from .ood import (
    FIT_DATA_HINT,
    build_scores,
    fit_ood_head,
    head_name,
    head_needs_fit_data,
    head_view,
    resolve_head,
)
from .results import results_record, write_json

DEFAULT_SEVERITIES = (1, 3, 5)
DEFAULT_LIMIT = 1000
DEFAULT_SCORE = "mcm"  # the OOD score of the AUROC column when none is chosen


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
    head=None,
    head_params: Mapping | None = None,
    score: str = DEFAULT_SCORE,
    params: Mapping[str, object] | None = None,
    fit_datasets: tuple[ImageDataset, ImageDataset] | None = None,
    artefact=None,
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
    """Measure every cell; write ``<stem>.json`` and ``<stem>.png`` under ``output_dir`` if given, ``<stem>`` =
    ``robustness_<method>_<dataset>_<split>_<model>_<settings hash>`` (another run never overwrites this one).

    ``head``: None (the zero-shot head on ``templates``), a registered method (built with ``head_params``, its own
    default templates unless they are in ``head_params``; fitted on ``fit_datasets`` = ID train and val when it
    needs data) or a head, fitted or not. ``templates`` are also the text of a score that reads text weights.
    ``score`` is any registered OOD score (``params`` as :func:`cliplab.eval.ood.score_params`), used with ``ood``.
    """
    start = time.perf_counter()
    if not has_labels(dataset):
        raise DatasetError(f"{dataset.name}: no labelled images to evaluate")
    for name in corruptions:
        for severity in severities:
            corruption_parameter(name, severity)  # unknown names or severities fail before any work
    class_names = list(dataset.class_names)
    head = resolve_head(head, backbone, dataset, templates=templates, params=head_params, cache_dir=cache_dir)
    head_fits = head_needs_fit_data(head)
    if head_fits and fit_datasets is None:
        raise CliplabError(f"method {head_name(head)!r} fits on the ID train split: {FIT_DATA_HINT}")
    scorer = None
    if ood is not None:
        scorer = build_scores([score], backbone, class_names, templates=templates, params=params, head=head,
                              artefact=artefact, fit_data=fit_datasets is not None, cache_dir=cache_dir,
                              batch_size=batch_size, workers=num_workers, progress=progress)
    test = seeded_subset(dataset, limit, seed)
    ood_data = seeded_subset(ood, limit, seed) if ood is not None else None

    def embed(data: ImageDataset):
        return embed_images(backbone, data, cache_dir, batch_size=batch_size, num_workers=num_workers,
                            progress=progress)

    fits = head_fits or (scorer is not None and "fit_data" in scorer.needs)
    fit_data = tuple(embed(d).labelled() for d in fit_datasets) if fits else None
    if fit_data is not None:
        test_ids = set(test.item_ids())
        shared = [i for f in fit_data for i in f.item_ids if i in test_ids]
        if shared:
            raise CliplabError(f"the fit data (train/val) shares {len(shared)} images with the test images, "
                               f"e.g. {shared[0]}")
    options = dict(cache_dir=cache_dir, batch_size=batch_size, workers=num_workers, progress=progress, shared={})
    inputs = fit_ood_head(head, backbone, fit_datasets, **options)
    head_rows = head_view(head, backbone, inputs, **options)
    if scorer is not None:
        scorer.bind_head(head, head_rows)
        if "fit_data" in scorer.needs:
            scorer.fit(*fit_data)
    clean_ood = embed(ood_data) if ood_data is not None and not ood_corrupted else None
    cells = [("clean", 0)] + [(name, int(s)) for name in corruptions for s in severities]
    rows, failures = [], {}
    for name, severity in cells:
        view = test if name == "clean" else CorruptedDataset(test, name, severity, seed)
        features = embed(view)
        labelled = features.labelled()
        y = labelled.labels
        if len(y) == 0:
            raise DatasetError(f"{dataset.name}: no labelled image could be read")
        logits = np.asarray(head.logits((labelled if head_rows is None else head_rows(view, labelled)).features))
        row = {"corruption": name, "severity": severity,
               "parameter": None if name == "clean" else corruption_parameter(name, severity),
               "num_images": int(len(y)), "acc1": topk_accuracy(y, logits, 1),
               "ece": expected_calibration_error(y, softmax(logits, axis=1)), "auroc": None, "fpr95": None}
        if scorer is not None:
            ood_view = ood_data if name == "clean" or not ood_corrupted else CorruptedDataset(ood_data, name,
                                                                                              severity, seed)
            ood_features = clean_ood if clean_ood is not None else embed(ood_view)
            if len(ood_features) == 0:
                raise DatasetError(f"{ood.name}: no OOD image could be read")
            cell = f"{name}:{severity}"
            scorer.memo[("logits", f"id:{cell}")] = logits
            id_scores = scorer.run(scorer.inputs(f"id:{cell}", view, labelled))[score]
            ood_scores = scorer.run(scorer.inputs(f"ood:{cell}", ood_view, ood_features))[score]
            scores = ood_metrics(id_scores, ood_scores)
            row["auroc"], row["fpr95"] = scores["auroc"], scores["fpr95"]
            failures.update({f"ood:{name}:{severity}:{item}": reason for item, reason in ood_features.failures})
        failures.update({f"{name}:{severity}:{item}": reason for item, reason in features.failures})
        rows.append(row)
    extra = {
        "method": head_name(head),
        "head_params": head_params_of(head),
        "paper": 11,
        "templates": templates if isinstance(templates, str) else list(templates),
        "seed": seed,
        "limit": limit,
        "num_images": len(test),
        "subset": "seeded" if len(test) < len(dataset) else "whole split",
        "split": dataset.split,
        "ood_dataset": None if ood is None else ood.name,
        "num_ood_images": None if ood_data is None else len(ood_data),
        "ood_score": None if scorer is None else score,
        "ood_score_params": None if scorer is None else scorer.params()[score],
        "text_weights": None if scorer is None else scorer.memo.get("text_weights"),
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
        stem = run_stem("robustness", record, method=extra["method"], dataset=dataset.name, split=dataset.split,
                        keys=[features.cache_key])
        report.files["json"] = write_json(record, out / f"{stem}.json")
        title = (f"{dataset.name} ({len(test)} images) · {features.model_id}"
                 + (f" · OOD {ood.name}" if ood is not None else ""))
        report.files["plot"] = plot_robustness(rows, out / f"{stem}.png", title)
    return report
