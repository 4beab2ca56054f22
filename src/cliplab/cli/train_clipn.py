"""``cliplab train-clipn``: train CLIPN's "no" text encoder and prompts on image-caption pairs (paper 18)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import CliplabError
from .common import DataOptions, RunOptions, command, console, err_console, report_failures, report_skipped


@command
def train_clipn(
    source: str = typer.Argument(..., help="Image-caption source: a manifest with captions (JSONL/CSV/JSON), COCO "
                                 "captions or a named captioned dataset (coco)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the trained CLIPN (what cliplab ood --clipn "
                                "reads); a folder with a checkpoint resumes."),
    steps: int = typer.Option(100, "--steps", min=1, help="Optimiser steps."),
    train_batch_size: int = typer.Option(64, "--train-batch-size", min=2, help="Pairs per step."),
    lr: float = typer.Option(1e-5, "--lr", help="AdamW learning rate (the authors' 1e-5)."),
    weight_decay: float = typer.Option(0.2, "--weight-decay", help="AdamW weight decay on the text tower's "
                                       "matrices (the authors' 0.2)."),
    schedule: str = typer.Option("constant", "--schedule", help="constant, or cosine (with --warmup steps, as the "
                                 "authors)."),
    warmup: int = typer.Option(0, "--warmup", min=0, help="Linear warm-up steps."),
    n_prompts: int = typer.Option(16, "--n-prompts", min=1, help="Learnable \"no\" prompts (the authors' 16)."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", min=0, help="Steps between checkpoints."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Train CLIPN (CLIP that can say "no") on captioned images; writes the folder cliplab ood --clipn reads.

    The image tower and CLIP's own text tower stay frozen: image features come from the feature cache, and only a
    copy of the text tower and the "no" prompts train (seeded, resumable from OUTPUT/train_state). A source with
    splits trains on its train split unless --split names another.
    """
    from ..data import dataset_splits, load_dataset
    from ..data.base import Subset
    from ..train.clipn import train_clipn as train

    split = data.split
    if split is None:  # a source with splits trains on its train split, one without on all of it
        try:
            split = "train" if "train" in dataset_splits(source) else None
        except (OSError, ValueError):
            split = None
    dataset = load_dataset(source, data.data_root, split, run.hash_content)
    report_skipped(dataset)
    if dataset.captions is None:
        raise CliplabError(f"{source}: CLIPN trains on image-caption pairs; this source has no captions")
    backbone = run.load_backbone()
    features = run.embed(backbone, dataset)
    report_failures(features.failures)
    pairs = Subset(dataset, features.indices)
    model = train(backbone, pairs, steps=steps, batch_size=train_batch_size, lr=lr, n_prompts=n_prompts,
                  seed=run.seed, device=run.device, image_features=features.features, weight_decay=weight_decay,
                  warmup_steps=warmup, schedule=schedule, checkpoint_dir=output / "train_state",
                  checkpoint_every=checkpoint_every, progress=not run.quiet)
    model.save(output)
    last = f"; last loss {model.history[-1]:.4f}" if model.history else ""
    console.print(f"trained CLIPN on {len(pairs)} pairs for {steps} steps{last}", highlight=False)
    err_console.print(f"CLIPN folder: {output}  (use: cliplab ood ... --model {run.model or 'the same model'} "
                      f"--clipn {output})", highlight=False)
