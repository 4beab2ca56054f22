"""The few-shot protocol: k shots per class drawn with a seed from the train split (plus a disjoint
validation part of min(k, 4) per class, CoOp's protocol), every method fitted and tuned on those only,
scored on the test split; mean and standard deviation over seeds, a curve, a results JSON per run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.base import ImageDataset
from ..features.embed import model_record
from ..features.views import DEFAULT_VIEWS
from ..fileio import atomic_write_text
from ..heads.registry import head_entry
from ..models.backbone import Backbone
from .inputs import VIEW_SEED, caption_features, image_size, run_method, shot_views, train_split, with_aux
from .results import results_model_name

__all__ = ["FewShotResult", "VIEW_SEED", "caption_features", "image_size", "run_fewshot", "shot_views", "with_aux"]


@dataclass
class FewShotResult:
    """Every run (method, shots, seed) and the mean/std table."""

    runs: list[dict] = field(default_factory=list)
    table: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


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
) -> FewShotResult:
    """Run every method for every shot count and seed; write per-run JSON, split files, a summary and a curve.

    Each run is :func:`cliplab.eval.inputs.run_method` (what ``cliplab evaluate --shots k --seed s`` runs), with
    one ``shared`` store so that features, draws, views, captions and auxiliary features are computed once;
    ``templates=None`` gives every method its declared default. A method that needs no training data is scored
    once and its result repeated for every shot count and seed."""
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
