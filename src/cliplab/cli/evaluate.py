"""``cliplab zeroshot`` and ``cliplab embed``: benchmark numbers and cached features for a dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from ..data import load_dataset, template_sets
from ..eval import evaluate_zeroshot
from ..features import embed_images
from . import common
from .common import console, err_console, friendly_errors, load_backbone

DEFAULT_EVAL_MODEL = "ViT-B-32:openai"
DatasetOpt = typer.Option(..., "--dataset", "-d", help="cifar10, cifar100, mnist, fashion_mnist, imagenette, dtd, "
                          "a class-folder path or a .csv/.jsonl/.json manifest.")
DataRootOpt = typer.Option(None, "--data-root", help="Folder holding named datasets (default: $CLIPLAB_DATA or "
                           "../shared/datasets).")
SplitOpt = typer.Option("test", "--split", help="test or train.")


@friendly_errors
def zeroshot(
    dataset: str = DatasetOpt,
    data_root: Path = DataRootOpt,
    split: str = SplitOpt,
    templates: str = typer.Option(None, "--templates", "-t", help="Template set or file (default: the dataset's "
                                  "CLIP_benchmark set, else 'imagenet7')."),
    output_dir: Path = typer.Option(Path("results"), "--output-dir", "-o", help="Where JSON and PNGs go."),
    model: str = common.ModelOpt,
    pretrained: str = common.PretrainedOpt,
    arch: str = common.ArchOpt,
    config: Path = common.ConfigOpt,
    quick_gelu: bool = common.QuickGeluOpt,
    device: str = common.DeviceOpt,
    cache_dir: Path = common.CacheOpt,
    batch_size: int = common.BatchOpt,
    workers: int = common.WorkersOpt,
    seed: int = common.SeedOpt,
    quiet: bool = common.QuietOpt,
    hash_content: bool = common.HashOpt,
):
    """Zero-shot top-1/top-5/mean per-class recall/ECE; CLIP_benchmark-style JSON + confusion and reliability PNGs."""
    data = load_dataset(dataset, data_root, split, hash_content)
    templates = templates or (data.name if data.name in template_sets() else "imagenet7")
    backbone = load_backbone(model, pretrained, arch, config, quick_gelu, device, seed, DEFAULT_EVAL_MODEL)
    report = evaluate_zeroshot(backbone, data, templates, output_dir, cache_dir, batch_size, workers,
                               progress=not quiet, seed=seed)
    title = f"zero-shot · {data.name} ({split}, {report.record['cliplab']['num_images']} images) · {backbone.model_id}"
    if backbone.info.random_weights:
        title += " · random weights"
    table = Table(title=title)
    for column in ("top-1", "top-5", "mean per-class recall", "ECE"):
        table.add_column(column, justify="right")
    m = report.metrics
    table.add_row(*(f"{100 * m[k]:.2f}%" for k in ("acc1", "acc5", "mean_per_class_recall", "ece")))
    console.print(table)
    if report.features.failures:
        err_console.print(f"[yellow]{len(report.features.failures)} image(s) skipped[/] (listed in the JSON)")
    for kind, path in report.files.items():
        console.print(f"{kind}: {path}")


@friendly_errors
def embed(
    dataset: str = typer.Argument(..., help="Named dataset, class-folder path or manifest."),
    data_root: Path = DataRootOpt,
    split: str = SplitOpt,
    output: Path = typer.Option(None, "--output", "-o", help="Also export to this .npz (features, labels, ids)."),
    model: str = common.ModelOpt,
    pretrained: str = common.PretrainedOpt,
    arch: str = common.ArchOpt,
    config: Path = common.ConfigOpt,
    quick_gelu: bool = common.QuickGeluOpt,
    device: str = common.DeviceOpt,
    cache_dir: Path = common.CacheOpt,
    batch_size: int = common.BatchOpt,
    workers: int = common.WorkersOpt,
    seed: int = common.SeedOpt,
    quiet: bool = common.QuietOpt,
    hash_content: bool = common.HashOpt,
):
    """Embed a dataset into the feature cache (resumable: rerun after an interruption)."""
    data = load_dataset(dataset, data_root, split, hash_content)
    backbone = load_backbone(model, pretrained, arch, config, quick_gelu, device, seed, DEFAULT_EVAL_MODEL)
    features = embed_images(backbone, data, cache_dir, batch_size=batch_size, num_workers=workers,
                            progress=not quiet)
    console.print(f"{len(features)} features of dimension {features.features.shape[1]} "
                  f"({features.computed} computed now, {len(data) - features.computed} from cache); "
                  f"cache key {features.cache_key}")
    if features.failures:
        err_console.print(f"[yellow]skipped {len(features.failures)} file(s):[/]")
        for item, reason in features.failures:
            err_console.print(f"  {item}: {reason}", markup=False, highlight=False)
    common.report_ignored(data)
    if output is not None:
        output = output if output.suffix == ".npz" else output.with_name(output.name + ".npz")
        np.savez(output, features=np.asarray(features.features), labels=features.labels,
                 item_ids=np.asarray(features.item_ids), class_names=np.asarray(features.class_names))
        console.print(f"wrote {output}")
