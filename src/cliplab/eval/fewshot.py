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

from ..data.base import ImageDataset, Subset
from ..errors import DatasetError
from ..features.embed import embed_images, model_record
from ..features.text import embed_texts
from ..features.values import FewShotSplit, ImageFeatures
from ..features.views import DEFAULT_VIEWS, Augmentation, AugmentedViews, stack_views
from ..fileio import atomic_write_text
from ..heads.registry import create_head, head_entry
from ..models.backbone import Backbone
from .evaluate import evaluate

VIEW_SEED = 0  # one set of augmented views per image, shared by every seed and shot count (and cached)


@dataclass
class FewShotResult:
    """Every run (method, shots, seed) and the mean/std table."""

    runs: list[dict] = field(default_factory=list)
    table: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def image_size(backbone: Backbone) -> int:
    """The model's input side in pixels (augmented views are cropped to it)."""
    size = backbone.preprocess_config.get("size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def shot_views(backbone: Backbone, train: ImageDataset, split: FewShotSplit, views: int, cache_dir,
               batch_size: int, workers: int | None, progress: bool) -> np.ndarray:
    """(views, n, d) augmented-view features of the shot items, rows aligned with ``split.train``."""
    subset = Subset(train, split.train.indices)
    augmented = AugmentedViews(subset, views, seed=VIEW_SEED, augmentation=Augmentation(size=image_size(backbone)))
    feats = embed_images(backbone, augmented, cache_dir, batch_size=batch_size, num_workers=workers,
                         progress=progress)
    if feats.failures:
        raise DatasetError(f"{len(feats.failures)} augmented view(s) failed to decode: {feats.failures[0]}")
    return stack_views(feats, views)


def caption_features(backbone: Backbone, train: ImageDataset, split: FewShotSplit, cache_dir) -> np.ndarray | None:
    """Text embeddings of the first caption of each shot item, when the dataset has captions."""
    captions = getattr(train, "captions", None)
    base = getattr(train, "dataset", None)
    if captions is None and base is not None:  # a Subset (e.g. train less the held-out val) of a captioned set
        captions = getattr(base, "captions", None)
        indices = getattr(train, "indices", None)
        if captions is not None and indices is not None:
            captions = [captions[int(i)] for i in indices]
    if not captions:
        return None
    texts = [captions[int(i)][0] if captions[int(i)] else "" for i in split.train.indices]
    if not all(texts):
        return None
    return embed_texts(backbone, texts, cache_dir)


def with_aux(features: ImageFeatures, aux: ImageFeatures) -> ImageFeatures:
    """``features`` with ``aux``'s features of the same items appended column-wise (items in both only)."""
    from dataclasses import replace

    position = {item: i for i, item in enumerate(aux.item_ids)}
    keep = [i for i, item in enumerate(features.item_ids) if item in position]
    rows = features.subset(keep)
    extra = np.asarray(aux.features)[[position[features.item_ids[i]] for i in keep]]
    return replace(rows, features=np.hstack([np.asarray(rows.features), extra]).astype(np.float32),
                   failures=features.failures + [f for f in aux.failures if f not in features.failures],
                   model_id=f"{features.model_id}+aux:{aux.model_id}")


def run_fewshot(
    backbone: Backbone,
    train: ImageDataset,
    test: ImageDataset,
    methods: list[str],
    shots: list[int],
    seeds: list[int],
    *,
    templates: str | list[str] = "generic",
    params: dict[str, dict] | None = None,
    views: int = DEFAULT_VIEWS,
    output_dir: str | Path = "results",
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    on_run=None,
) -> FewShotResult:
    """Run every method for every shot count and seed; write per-run JSON, split files, a summary and a curve."""
    out = Path(output_dir)
    entries = {m: head_entry(m) for m in methods}
    train_feats = embed_images(backbone, train, cache_dir, batch_size=batch_size, num_workers=workers,
                               progress=progress).labelled()
    test_feats = embed_images(backbone, test, cache_dir, batch_size=batch_size, num_workers=workers,
                              progress=progress).labelled()
    result = FewShotResult()
    zeroshot_reports: dict[str, dict] = {}
    aux_cache: dict[str, tuple[ImageFeatures, ImageFeatures]] = {}

    def aux_features(name: str) -> tuple[ImageFeatures, ImageFeatures]:
        """Train and test features with a second model's embeddings appended (AMU-Tuning's auxiliary branch)."""
        if name not in aux_cache:
            from ..models import load_model

            aux = load_model(name, device=str(backbone.device))
            embed = [embed_images(aux, data, cache_dir, batch_size=batch_size, num_workers=workers,
                                  progress=progress).labelled() for data in (train, test)]
            aux_cache[name] = with_aux(train_feats, embed[0]), with_aux(test_feats, embed[1])
        return aux_cache[name]

    for seed in seeds:
        for k in shots:
            split = train_feats.few_shot(k, seed=seed)
            split_file = split.save(out / "splits" / f"{test.name}_{k}shot_seed{seed}.json")
            extra: dict = {}
            if any(_uses(entries[m], "views") for m in methods):
                extra["views"] = shot_views(backbone, train, split, views, cache_dir, batch_size, workers, progress)
            if any(_uses(entries[m], "caption_features") for m in methods):
                extra["caption_features"] = caption_features(backbone, train, split, cache_dir)
            for method in methods:
                entry = entries[method]
                if not entry.needs_train and method in zeroshot_reports:
                    run = {**zeroshot_reports[method], "shots": k, "seed": seed}
                else:
                    method_params = (params or {}).get(method, {})
                    method_test, method_split = test_feats, split
                    method_extra = extra
                    if method_params.get("aux_model"):  # views are of the CLIP model only: train on the shots
                        aux_train, method_test = aux_features(method_params["aux_model"])
                        method_split = aux_train.apply_split(split.record)
                        method_extra = {key: value for key, value in extra.items() if key != "views"}
                    run = _run_one(entry, backbone, method_test, method_split, method_extra, templates,
                                   method_params, cache_dir, out, seed, k, split_file)
                    if not entry.needs_train:
                        zeroshot_reports[method] = run
                result.runs.append(run)
                if on_run is not None:
                    on_run(run)
    result.table = _table(result.runs)
    result.files = _write_summary(result, out, test.name, backbone, methods, shots, seeds, views)
    return result


def _uses(entry, name: str) -> bool:
    import inspect

    return name in inspect.signature(entry.cls.fit).parameters


def _run_one(entry, backbone, test_feats: ImageFeatures, split: FewShotSplit, extra, templates, params, cache_dir,
             out: Path, seed: int, k: int, split_file: Path) -> dict:
    kwargs = dict(params)
    if entry.needs_backbone:
        kwargs.setdefault("templates", templates)
        kwargs.setdefault("cache_dir", cache_dir)
    head = create_head(entry.name, backbone=backbone, class_names=test_feats.class_names, **kwargs)
    start = time.perf_counter()
    if entry.needs_train:
        report = evaluate(head, test_feats, split.train, val=split.val, fit_params=extra, output_dir=out / "runs",
                          seed=seed, shots=k, split_file=split_file)
    else:
        report = evaluate(head, test_feats, output_dir=out / "runs", seed=seed)
    return {"method": entry.name, "shots": k, "seed": seed, "acc1": report.metrics["acc1"],
            "mean_per_class_recall": report.metrics["mean_per_class_recall"], "chosen": head.fit_summary(),
            "seconds": round(time.perf_counter() - start, 3), "json": str(report.files.get("json", "")),
            "split_file": str(split_file)}


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
    model, pretrained, weights = record["model"], record["pretrained"], record["weights"]
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
