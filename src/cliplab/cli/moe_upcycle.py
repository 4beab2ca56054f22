"""``cliplab moe-upcycle``: CLIP-MoE's diversified multiplet upcycling of a loaded model (paper 46) into a model
folder that every command loads; ``cliplab pretrain --loss clip-moe --init-model FOLDER`` trains it on."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import RUN_OPTIONS, command, console, err_console


@command
def moe_upcycle(
    source: str = typer.Argument(..., help="Pairs the copies fine-tune on and the routers train on: any SOURCE of "
                                 "cliplab pretrain (a named dataset, a caption manifest, a COCO captions JSON, a "
                                 "labelled folder)."),
    init_model: str = typer.Option(..., "--init-model", help="The dense open_clip model to upcycle (tiny, "
                                   "ViT-B-32:openai, an open_clip folder, a cliplab pretrain folder ...); never "
                                   "changed."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the upcycled model (a folder holding an "
                                "unfinished run of the same options resumes it)."),
    experts: int = typer.Option(4, "--experts", min=2, help="Experts per MoE layer: the model's own MLPs and "
                                "experts - 1 fine-tuned copies."),
    top_k: int = typer.Option(2, "--top-k", min=1, help="Experts each token is routed to."),
    hard_fraction: float = typer.Option(0.5, "--hard-fraction", help="Share of the pool's pairs (highest per-pair "
                                        "InfoNCE under the previous copy) each new copy fine-tunes on."),
    clusters: int = typer.Option(2, "--clusters", min=1, help="k-means clusters of the hard pairs (each batch is "
                                 "drawn within one)."),
    steps: int = typer.Option(20, "--steps", min=1, help="Fine-tuning steps of each copy (MLPs only)."),
    routing_steps: int = typer.Option(20, "--routing-steps", min=0, help="Steps training the routers alone after "
                                      "assembly (clip-moe loss with load balancing)."),
    pool: int = typer.Option(512, "--pool", min=2, help="Pairs drawn (seeded) from SOURCE for all stages."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=2, help="Pairs per step."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate of the copies and the routers (AdamW)."),
    balance: float = typer.Option(0.01, "--balance", min=0.0, help="Weight of the load-balancing loss in routing."),
    templates: str = typer.Option("generic", "--templates", help="Caption templates for labelled sources without "
                                  "captions."),
    split: str = typer.Option("train", "--split", help="Split of SOURCE (where it has splits)."),
    seed: int = RUN_OPTIONS["seed"],
    data_root: Path = typer.Option(None, "--data-root", help="Where named datasets live (default: CLIPLAB_DATA)."),
    quiet: bool = RUN_OPTIONS["quiet"],
):
    """Upcycle a dense CLIP into top-k routed MoE MLPs (CLIP-MoE multiplets); writes a folder --model loads."""
    from ..train.moe_upcycle import UpcycleConfig, upcycle_folder

    config = UpcycleConfig(source=source, init_model=init_model, split=split, templates=templates, experts=experts,
                           top_k=top_k, hard_fraction=hard_fraction, clusters=clusters, steps=steps,
                           routing_steps=routing_steps, pool=pool, batch_size=batch_size, lr=lr, balance=balance,
                           seed=seed, data_root=str(data_root) if data_root else None)
    result = upcycle_folder(config, output, progress=not quiet)
    table = Table(title=f"{init_model} upcycled: {experts} experts, top-{top_k} ({result.pool} pairs of {source})")
    for column in ("copy", "hard pairs", "cluster sizes"):
        table.add_column(column, justify="right")
    table.add_row("0", "-", "the model's own MLPs")
    for stage in result.stages:
        sizes = [stage.clusters.count(c) for c in range(clusters)]
        table.add_row(str(stage.k), str(len(stage.hard)), " ".join(map(str, sizes)))
    console.print(table)
    for note in result.notes:
        err_console.print(f"note: {note}", highlight=False)
    err_console.print(f"{result.seconds / 60:.1f} min; model folder: {output}  (use: --model {output}; train on: "
                      f"cliplab pretrain SOURCE --init-model {output} --loss clip-moe)", highlight=False)
