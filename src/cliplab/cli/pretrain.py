"""``cliplab pretrain``: train a CLIP model on image-caption pairs (or a named recipe)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import RUN_OPTIONS, command, console, err_console, interrupted_build


@command
def pretrain(
    source: str = typer.Argument(None, help="Image-caption source: a named dataset (cifar10, coco, ...), a "
                                 "manifest with captions (JSONL/CSV/JSON, e.g. from cliplab curate), a COCO "
                                 "captions JSON, a labelled folder (captions made from --templates), or "
                                 "mosaic[:tiles=D,k=K,descriptions=FILE]: k x k tiles of CIFAR-10 train (or D) "
                                 "with exact boxes and region texts, for --loss cloc|grain."),
    sources: list[str] = typer.Option(None, "--source", metavar="NAME:WEIGHT", help="Repeatable, instead of "
                                      "SOURCE: a weighted mixture of sources, each batch drawn from one source "
                                      "with probability weight / total (seeded); recorded in the run's config."),
    recipe: str = typer.Option(None, "--recipe", help="A named recipe instead of SOURCE and the training "
                               "options: cifar10-signal (16 min measured on 2 idle CPU cores, hours on a busy "
                               "machine), cifar10-vit-signal (its ViT twin, patch 4: 74 min measured on 2 shared "
                               "cores) or cifar10-ci (40 steps, about 5 min on 2 busy cores)."),
    model: str = typer.Option("cliplab-rn-32px", "--model", "-m", help="Architecture: a built-in config "
                              "(cliplab-rn-32px, cliplab-vit-32px), an open_clip name (ViT-S-32, RN50, ...) or a "
                              "model-config JSON file."),
    init_model: str = typer.Option(None, "--init-model", help="Fine-tune this model instead of training --model "
                                   "from random weights: any --model spec of an open_clip model (tiny, "
                                   "ViT-B-32:openai, an open_clip folder, ...). A copy trains; the model itself never "
                                   "changes."),
    output: Path = typer.Option(None, "--output", "-o", help="Folder for the model (open_clip layout) and its "
                                "card; a folder with a checkpoint resumes. Default: "
                                "$CLIPLAB_CACHE/models/<recipe>-<hash>."),
    steps: int = typer.Option(1000, "--steps", min=1, help="Optimiser steps."),
    batch_size: int = typer.Option(128, "--batch-size", "-b", min=2, help="Pairs per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW)."),
    warmup: int = typer.Option(100, "--warmup", min=0, help="Linear warmup steps, then cosine decay."),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW weight decay (not on gains, biases)."),
    loss: str = typer.Option("clip", "--loss", help="clip (open_clip's ClipLoss), siglip (SigLipLoss), mlcd (clip + "
                      "multi-label cluster discrimination), clip-refine (post-training of --init-model), lightclip "
                      "(softened labels + token OT, + MLM with image fusion: --loss-param mlm_weight=1; a ViT model), "
                      "cloc or grain (clip + region-text contrast of RoI-pooled boxes, or region-to-description; a "
                      "ViT model and a source with boxes: mosaic), clip-moe (clip + MoE load balancing; --init-model "
                      "an upcycled model from cliplab moe-upcycle; --loss-param routers_only=true trains the routers "
                      "alone)."),
    loss_param: list[str] = typer.Option(
        None, "--loss-param", metavar="KEY=VALUE", help="A parameter of the --loss objective (repeatable; e.g. "
        "--loss mlcd --loss-param centres=64); the parameters and their defaults: cliplab methods --family "
        "objective."),
    crop_scale: float = typer.Option(0.5, "--crop-scale", help="Smallest area of the random resized crop."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Random horizontal flips."),
    templates: str = typer.Option("generic", "--templates", help="Caption templates for labelled sources "
                                  "without captions (a built-in set or a file); also the zero-shot check's."),
    split: str = typer.Option("train", "--split", help="Split to train on."),
    eval_split: str = typer.Option("val", "--eval-split", help="Held-out split checked during training "
                                   "(zero-shot top-1, or image-to-text recall@1 for caption sources); 'none' "
                                   "to skip."),
    eval_every: int = typer.Option(200, "--eval-every", min=1, help="Steps between held-out checks."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", min=1, help="Steps between checkpoints."),
    checkpoint_minutes: float = typer.Option(None, "--checkpoint-minutes", min=0.0, help="Also checkpoint when this "
                                             "many minutes passed since the last checkpoint (0: by steps only; "
                                             "default: a recipe's own, 2 min, else 0)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16 autocast (CUDA, or CPUs with "
                                  "bf16 instructions)."),
    device: str = RUN_OPTIONS["device"],
    seed: int = RUN_OPTIONS["seed"],
    data_root: Path = typer.Option(None, "--data-root", help="Where named datasets live (default: CLIPLAB_DATA)."),
    quiet: bool = RUN_OPTIONS["quiet"],
):
    """Train (or with --init-model fine-tune) a CLIP model contrastively; writes an open_clip folder for --model."""
    from ..models.loader import check_device
    from ..train import PretrainConfig, PretrainOptionError
    from ..train import pretrain as run
    from ..train.objective_params import parse_objective_params
    from ..train.recipes import recipe_config, recipe_folder

    device = check_device(device)
    if sources:
        from ..train.mixture import mixture_source

        if source or recipe:
            raise PretrainOptionError("give SOURCE, --source NAME:WEIGHT items or --recipe, one of them")
        source = mixture_source(sources)
    if recipe and loss_param:
        raise PretrainOptionError("--loss-param changes a recipe: train from a SOURCE with --loss instead")
    if recipe:
        timing = {} if checkpoint_minutes is None else {"checkpoint_seconds": 60 * checkpoint_minutes}
        config = recipe_config(recipe, data_root, device=device, seed=seed, **timing,
                               **({"init_model": init_model} if init_model else {}))
    elif source:
        config = PretrainConfig(
            source=source, model=model, split=split, eval_split=None if eval_split == "none" else eval_split,
            templates=templates, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            warmup=warmup, loss=loss, crop_scale=crop_scale, flip=flip, seed=seed, eval_every=eval_every,
            checkpoint_every=checkpoint_every, checkpoint_seconds=60 * (checkpoint_minutes or 0.0), device=device,
            precision=precision,
            data_root=str(data_root) if data_root else None, init_model=init_model,
            loss_params=parse_objective_params(loss, loss_param) if loss_param else {})
    else:
        raise typer.BadParameter("give a SOURCE or --recipe NAME")
    folder = output or recipe_folder(config, recipe or "pretrain")
    with interrupted_build(recipe, folder):
        result = run(config, folder, progress=not quiet)
    what = f"fine-tuned {config.init_model}" if config.init_model else f"pretrained {config.model}"
    table = Table(title=f"{what} on {config.source} ({config.split})")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("steps", f"{result.steps_done:,}" + (f" (resumed at {result.resumed_from:,})"
                                                         if result.resumed_from else ""))
    table.add_row("training time", f"{result.seconds / 60:.1f} min")
    for key, value in result.final_metric.items():
        table.add_row(f"held-out {key} ({config.eval_split})", f"{value:.4f}")
    if result.skipped:
        table.add_row("pairs skipped", f"{result.skipped:,} (listed in the model card)")
    console.print(table)
    for note in result.notes:
        err_console.print(f"note: {note}", highlight=False)
    err_console.print(f"model folder: {folder}  (use: --model {folder})", highlight=False)
