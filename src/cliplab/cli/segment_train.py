"""``cliplab segment-train``: train a dense method that trains (one whose class has ``train_dense``, e.g. DenseCLIP)
on a labelled segmentation set and save it; ``cliplab segment --method M --param weights=DIR`` uses it."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import CliplabError
from .common import DataOptions, RunOptions, command, console


@command
def segment_train(
    method: str = typer.Option("denseclip", "--method", help="A dense method that trains (`cliplab segment-train "
                               "--method ?` lists them)."),
    dataset: str = typer.Option("mosaic", "--dataset", "-d", help="Labelled segmentation set: mosaic (its train "
                                "split: CIFAR-10 train tiles) or coco_mini_seg."),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Epochs over the training windows."),
    batch: int = typer.Option(32, "--batch", min=1, help="Windows per step."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="AdamW learning rate (cosine schedule)."),
    mosaic_count: int = typer.Option(500, "--mosaic-count", min=1, help="mosaic: training images."),
    mosaic_k: int = typer.Option(2, "--mosaic-k", min=1, help="mosaic: k x k tiles per image."),
    mosaic_seed: int = typer.Option(1, "--mosaic-seed", help="mosaic: the seed of the draw."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Where the trained weights go (resumable: "
                                    "checkpoints under DIR/train_state)."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Train a dense segmentation method on a labelled set (default mosaic train) and save it for `cliplab segment`."""
    from ..data.segmentation import MosaicSpec, load_segmentation
    from ..dense.registry import list_dense

    trainable = {e.name: e.cls for e in list_dense() if hasattr(e.cls, "train_dense")}
    if method not in trainable:
        raise CliplabError(f"segmentation method {method!r} does not train; methods that do: "
                           f"{', '.join(sorted(trainable)) or 'none'}")
    sets = load_segmentation(dataset, data.data_root, data.split or "train",
                             mosaic=MosaicSpec(count=mosaic_count, k=mosaic_k, seed=mosaic_seed))
    backbone = run.load_backbone()
    summary = trainable[method].train_dense(backbone, sets, output_dir, epochs=epochs, batch_size=batch, lr=lr,
                                            seed=run.seed, progress=not run.quiet)
    console.print(f"{method}: {summary['windows']} windows of {sets.name} {sets.split}, {summary['steps']} steps, "
                  f"last loss {summary['loss']:.4f}, {summary['seconds']:.1f} s", markup=False, highlight=False)
    console.print(f"saved: {output_dir}  (use: cliplab segment --method {method} --param weights={output_dir})",
                  markup=False, highlight=False, soft_wrap=True)
