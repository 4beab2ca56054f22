"""``cliplab embed``: embed a dataset into the feature cache (and optionally export it)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import DataOptions, RunOptions, command, console, report_failures
from .evaluate import _load


@command
def embed(
    dataset: str = typer.Argument(..., help="Named dataset, class-folder path or manifest."),
    output: Path = typer.Option(None, "--output", "-o", help="Also export to this .npz (features, labels, ids)."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Embed a dataset into the feature cache (resumable: rerun after an interruption)."""
    import numpy as np

    dataset_value = _load(dataset, data, run)
    backbone = run.load_backbone()
    features = run.embed(backbone, dataset_value)
    console.print(f"{len(features)} features of dimension {features.dim} "
                  f"({features.computed} computed now, {len(features) - features.computed} from cache); "
                  f"cache key {features.cache_key}")
    report_failures(features.failures)
    if output is not None:
        output = output if output.suffix == ".npz" else output.with_name(output.name + ".npz")
        np.savez(output, features=np.asarray(features.features), labels=features.labels,
                 item_ids=np.asarray(features.item_ids), class_names=np.asarray(features.class_names))
        console.print(f"wrote {output}")
