"""The few-shot protocol: k shots per class drawn with a seed from the train split (plus a disjoint
validation part of min(k, 4) per class, CoOp's protocol), every method fitted and tuned on those only,
scored on the test split; mean and standard deviation over seeds, a curve, a results JSON per run.

Base-to-new (``base_to_new=True``, CoCoOp's protocol, the authors' ``subsample_classes``): the classes in the
dataset's order are split into base = the first ceil(C/2) and new = the rest; each method is drawn, fitted and
tuned on the base classes of the train split only and scored on the test images of the base classes among the
base classes (base accuracy), then on the test images of the new classes among the new classes (new accuracy)
through ``head.with_classes(new_names)`` (prompt heads: what was learned with the new names); a method that needs
no training is simply built for the new names; a head without ``with_classes`` gets no new accuracy ("n/a").
Per run the harmonic mean H = 2 B N / (B + N); the table gives mean ± std of B and N over seeds and H of those
means (as the paper's tables).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.base import ImageDataset, Subset
from ..errors import CliplabError
from ..features.embed import model_record
from ..features.views import DEFAULT_VIEWS
from ..fileio import atomic_write_text
from ..heads.registry import head_entry
from ..models.backbone import Backbone
from .inputs import (
    VIEW_SEED,
    caption_features,
    image_size,
    run_method,
    shot_views,
    test_features,
    train_split,
    with_aux,
)
from .results import results_model_name

__all__ = ["FewShotResult", "VIEW_SEED", "base_new_classes", "caption_features", "class_subset", "harmonic_mean",
           "image_size", "run_fewshot", "shot_views", "with_aux"]


@dataclass
class FewShotResult:
    """Every run (method, shots, seed) and the mean/std table."""

    runs: list[dict] = field(default_factory=list)
    table: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    # base-to-new only: method -> shots -> {"base": (mean, std), "new": (mean, std) or None, "harmonic_mean": H of
    # the means or None}
    base_to_new: dict[str, dict[int, dict]] = field(default_factory=dict)


def base_new_classes(n_classes: int) -> tuple[list[int], list[int]]:
    """The authors' split (``subsample_classes``): base = the first ceil(n/2) class indices, new = the rest."""
    m = math.ceil(n_classes / 2)
    return list(range(m)), list(range(m, n_classes))


def harmonic_mean(base: float, new: float) -> float:
    """H = 2 B N / (B + N) (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def class_subset(dataset: ImageDataset, classes: list[int], part: str) -> Subset:
    """The items of ``dataset`` labelled with one of ``classes``, relabelled 0..len(classes)-1 in that order, with
    those class names (as the authors' relabeler); ``split_info`` records the ``part`` ("base"/"new")."""
    labels = np.asarray(dataset.labels)
    subset = Subset(dataset, np.flatnonzero(np.isin(labels, classes)))
    relabel = np.full(max(len(dataset.class_names), 1), -1, dtype=np.int64)
    relabel[np.asarray(classes, dtype=np.int64)] = np.arange(len(classes))
    subset.labels = relabel[labels[subset.indices]]
    subset.class_names = [dataset.class_names[c] for c in classes]
    subset.split_info = {**dict(dataset.split_info), "classes": part,
                         "class_indices": [int(c) for c in classes]}
    return subset


def run_fewshot(
    backbone: Backbone,
    train: ImageDataset,
    test: ImageDataset,
    methods: list[str],
    shots: list[int],
    seeds: list[int],
    *,
    templates: str | list[str] | None = None,
    params: dict[str, dict] | None = None,
    views: int = DEFAULT_VIEWS,
    output_dir: str | Path = "results",
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    on_run=None,
    base_to_new: bool = False,
) -> FewShotResult:
    """Run every method for every shot count and seed; write per-run JSON, split files, a summary and a curve.

    Each run is :func:`cliplab.eval.inputs.run_method` (what ``cliplab evaluate --shots k --seed s`` runs), with
    one ``shared`` store so that features, draws, views, captions and auxiliary features are computed once;
    ``templates=None`` gives every method its declared default. A method that needs no training data is scored
    once and its result repeated for every shot count and seed. ``base_to_new``: the base-to-new protocol (module
    docstring); each run then also has ``base_acc1`` (= ``acc1``), ``new_acc1`` and ``harmonic_mean`` (None: the
    head has no ``with_classes``)."""
    if base_to_new:
        return _run_base_to_new(backbone, train, test, methods, shots, seeds, templates=templates, params=params,
                                views=views, output_dir=output_dir, cache_dir=cache_dir, batch_size=batch_size,
                                workers=workers, progress=progress, on_run=on_run)
    out = Path(output_dir)
    entries = {m: head_entry(m) for m in methods}
    options = {"cache_dir": cache_dir, "batch_size": batch_size, "workers": workers, "progress": progress}
    shared: dict = {}
    result = FewShotResult()
    zeroshot_reports: dict[str, dict] = {}
    for seed in seeds:
        for k in shots:
            split_file = out / "splits" / f"{test.name}_{k}shot_seed{seed}.json"
            train_split(backbone, train, shots=k, seed=seed, save_as=split_file, shared=shared, **options)
            for method in methods:
                entry = entries[method]
                if not entry.needs_train and method in zeroshot_reports:
                    run = {**zeroshot_reports[method], "shots": k, "seed": seed}
                else:
                    start = time.perf_counter()
                    done = run_method(method, backbone, test, train if entry.needs_train else None,
                                      templates=templates, params=(params or {}).get(method, {}),
                                      shots=k if entry.needs_train else None, seed=seed, output_dir=out / "runs",
                                      views=views, save_split_as=split_file, shared=shared, **options)
                    report = done.report
                    run = {"method": entry.name, "shots": k, "seed": seed, "acc1": report.metrics["acc1"],
                           "mean_per_class_recall": report.metrics["mean_per_class_recall"],
                           "chosen": done.head.fit_summary(), "seconds": round(time.perf_counter() - start, 3),
                           "json": str(report.files.get("json", "")), "split_file": str(split_file)}
                    if not entry.needs_train:
                        zeroshot_reports[method] = run
                result.runs.append(run)
                if on_run is not None:
                    on_run(run)
    result.table = _table(result.runs)
    result.files = _write_summary(result, out, test.name, backbone, methods, shots, seeds, views)
    return result


def _run_base_to_new(backbone, train, test, methods, shots, seeds, *, templates, params, views, output_dir,
                      cache_dir, batch_size, workers, progress, on_run) -> FewShotResult:
    from .evaluate import evaluate

    out = Path(output_dir)
    if len(train.class_names) < 2 or list(train.class_names) != list(test.class_names):
        raise CliplabError("base-to-new needs at least 2 classes, the same in the train and test splits")
    base, new = base_new_classes(len(train.class_names))
    train_base = class_subset(train, base, "base")
    test_base, test_new = class_subset(test, base, "base"), class_subset(test, new, "new")
    entries = {m: head_entry(m) for m in methods}
    options = {"cache_dir": cache_dir, "batch_size": batch_size, "workers": workers, "progress": progress}
    shared: dict = {}
    result = FewShotResult()
    once: dict[str, dict] = {}  # methods that need no training: scored once
    for seed in seeds:
        for k in shots:
            split_file = out / "splits" / f"{test.name}_base_{k}shot_seed{seed}.json"
            train_split(backbone, train_base, shots=k, seed=seed, save_as=split_file, shared=shared, **options)
            for method in methods:
                entry = entries[method]
                if not entry.needs_train and method in once:
                    result.runs.append({**once[method], "shots": k, "seed": seed})
                    if on_run is not None:
                        on_run(result.runs[-1])
                    continue
                start = time.perf_counter()
                common = dict(templates=templates, params=(params or {}).get(method, {}), seed=seed,
                              output_dir=out / "runs", views=views, shared=shared, **options)
                done = run_method(method, backbone, test_base, train_base if entry.needs_train else None,
                                  shots=k if entry.needs_train else None, save_split_as=split_file, **common)
                base_acc = float(done.report.metrics["acc1"])
                new_report = None
                if not entry.needs_train:  # built for the new names: what it does for any classes
                    new_report = run_method(method, backbone, test_new, None, **common).report
                elif hasattr(done.head, "with_classes"):
                    moved = done.head.with_classes(list(test_new.class_names))
                    new_test = test_features(moved, backbone, test_new, done.inputs, shared=shared, **options)
                    new_report = evaluate(moved, new_test, done.inputs.train, val=done.inputs.val, fitted=True,
                                          output_dir=out / "runs", seed=seed, shots=k,
                                          split_file=done.inputs.split_file)
                new_acc = None if new_report is None else float(new_report.metrics["acc1"])
                run = {"method": entry.name, "shots": k, "seed": seed, "acc1": base_acc, "base_acc1": base_acc,
                       "new_acc1": new_acc, "harmonic_mean": None if new_acc is None else harmonic_mean(base_acc,
                                                                                                        new_acc),
                       "mean_per_class_recall": done.report.metrics["mean_per_class_recall"],
                       "chosen": done.head.fit_summary(), "seconds": round(time.perf_counter() - start, 3),
                       "json": str(done.report.files.get("json", "")),
                       "new_json": "" if new_report is None else str(new_report.files.get("json", "")),
                       "split_file": str(split_file) if entry.needs_train else None}
                if not entry.needs_train:
                    once[method] = run
                result.runs.append(run)
                if on_run is not None:
                    on_run(run)
    result.table = _table(result.runs)
    result.base_to_new = _base_new_table(result.runs)
    result.files = _write_base_to_new(result, out, test.name, backbone, methods, shots, seeds, views,
                                      [train.class_names[c] for c in base], [train.class_names[c] for c in new])
    return result


def _base_new_table(runs: list[dict]) -> dict[str, dict[int, dict]]:
    grouped: dict[str, dict[int, list[dict]]] = {}
    for run in runs:
        grouped.setdefault(run["method"], {}).setdefault(run["shots"], []).append(run)
    table: dict[str, dict[int, dict]] = {}
    for method, by_k in grouped.items():
        for k, group in by_k.items():
            base = [r["base_acc1"] for r in group]
            new = [r["new_acc1"] for r in group]
            cell = {"base": (float(np.mean(base)), float(np.std(base))), "new": None, "harmonic_mean": None}
            if all(v is not None for v in new):
                cell["new"] = (float(np.mean(new)), float(np.std(new)))
                cell["harmonic_mean"] = harmonic_mean(cell["base"][0], cell["new"][0])
            table.setdefault(method, {})[k] = cell
    return table


def base_new_cell(cell: dict) -> str:
    """``base / new / H`` in percent (new and H "n/a" for a head without ``with_classes``)."""
    base = f"{100 * cell['base'][0]:.2f} ± {100 * cell['base'][1]:.2f}"
    if cell["new"] is None:
        return f"{base} / n/a / n/a"
    return f"{base} / {100 * cell['new'][0]:.2f} ± {100 * cell['new'][1]:.2f} / {100 * cell['harmonic_mean']:.2f}"


def _write_base_to_new(result: FewShotResult, out: Path, dataset: str, backbone: Backbone, methods, shots, seeds,
                       views, base_names, new_names) -> dict[str, Path]:
    from .plots import plot_fewshot_curve
    out.mkdir(parents=True, exist_ok=True)
    record = model_record(backbone)
    model, pretrained, weights = results_model_name(record), record["pretrained"], record["weights"]
    table = {m: {str(k): cell for k, cell in by_k.items()} for m, by_k in result.base_to_new.items()}
    summary = {"protocol": "base-to-new", "dataset": dataset, "model": model, "pretrained": pretrained,
               "model_id": backbone.model_id, "weights": weights, "methods": methods, "shots": shots,
               "seeds": seeds, "views": views, "base_classes": list(base_names), "new_classes": list(new_names),
               "table_base_new_h": table, "runs": result.runs}
    stem = f"base2new_{dataset}_{Path(model).name}".replace("/", "-").replace(":", "-")
    files = {"json": atomic_write_text(out / f"{stem}.json", json.dumps(summary, indent=1))}
    lines = [f"# Base-to-new top-1 on {dataset} ({model} {pretrained}; {weights})", "",
             f"Base classes ({len(base_names)}): {', '.join(base_names)}. New classes ({len(new_names)}): "
             f"{', '.join(new_names)}.", "",
             "| method | " + " | ".join(f"{k} shots: base / new / H" for k in shots) + " |",
             "|---|" + "---|" * len(shots)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(base_new_cell(result.base_to_new[method][k]) for k in shots)
                     + " |")
    lines += ["", f"mean ± std over seeds {', '.join(map(str, seeds))}; H = harmonic mean of the mean base and new "
              "accuracies. Trained on the base classes of the train split only; base accuracy on the test images "
              "of the base classes among the base classes, new accuracy on those of the new classes among the new "
              "classes; n/a: the method cannot score classes it was not trained on."]
    files["markdown"] = atomic_write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    files["curve"] = plot_fewshot_curve(result.table, out / f"{stem}_base_curve.png",
                                        f"Base-class top-1 · {dataset} · {Path(model).name}\n{weights}")
    return files


def _table(runs: list[dict]) -> dict[str, dict[int, tuple[float, float]]]:
    grouped: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        grouped.setdefault(run["method"], {}).setdefault(run["shots"], []).append(run["acc1"])
    return {m: {k: (float(np.mean(v)), float(np.std(v))) for k, v in by_k.items()} for m, by_k in grouped.items()}


def _write_summary(result: FewShotResult, out: Path, dataset: str, backbone: Backbone, methods, shots, seeds,
                   views) -> dict[str, Path]:
    from .plots import plot_fewshot_curve
    out.mkdir(parents=True, exist_ok=True)
    record = model_record(backbone)
    model, pretrained, weights = results_model_name(record), record["pretrained"], record["weights"]
    summary = {"dataset": dataset, "model": model, "pretrained": pretrained, "model_id": backbone.model_id,
               "weights": weights, "methods": methods, "shots": shots, "seeds": seeds, "views": views,
               "table_acc1_mean_std": {m: {str(k): v for k, v in by_k.items()} for m, by_k in result.table.items()},
               "runs": result.runs}
    stem = f"fewshot_{dataset}_{Path(model).name}".replace("/", "-").replace(":", "-")
    files = {"json": atomic_write_text(out / f"{stem}.json", json.dumps(summary, indent=1))}
    lines = [f"# Few-shot top-1 on {dataset} ({model} {pretrained}; {weights})", "",
             "| method | " + " | ".join(f"{k} shots" for k in shots) + " |",
             "|---|" + "---|" * len(shots)]
    for method in methods:
        cells = [f"{100 * result.table[method][k][0]:.2f} ± {100 * result.table[method][k][1]:.2f}" for k in shots]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", f"mean ± std over seeds {', '.join(map(str, seeds))}; shots drawn from the train split, "
              "hyperparameters chosen on a disjoint validation part of it; test split never used for fitting."]
    files["markdown"] = atomic_write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    files["curve"] = plot_fewshot_curve(result.table, out / f"{stem}_curve.png",
                                        f"Few-shot top-1 · {dataset} · {Path(model).name}\n{weights}")
    return files
