"""``cliplab retrieval-eval``: zero-shot image-text retrieval Recall@k (CLIP_benchmark's definitions)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from .common import DataOptions, RunOptions, command, console, err_console
from .evaluate import OutputDirOpt, _load

ALIASES = {"coco_mini": "coco"}  # the named dataset "coco" reads ../shared/datasets/coco_mini


@command
def retrieval_eval(
    dataset: str = typer.Option(..., "--dataset", "-d", help="A captioned dataset: coco (alias coco_mini: "
                                "COCO-2017 images with 5 captions each), or a caption manifest (.jsonl/.csv)."),
    recall_k: str = typer.Option("1,5,10", "--recall-k", help="Comma-separated k values."),
    output_dir: Path = OutputDirOpt,
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Image-to-text and text-to-image Recall@k of a model on a captioned dataset; JSON + table."""
    from ..eval.retrieval import evaluate_retrieval

    try:
        ks = [int(part) for part in recall_k.split(",") if part.strip()]
    except ValueError:
        raise CliplabError(f"--recall-k {recall_k!r}: write comma-separated integers, e.g. 1,5,10") from None
    if not ks or min(ks) < 1:
        raise CliplabError("--recall-k: give positive integers, e.g. 1,5,10")
    value = _load(ALIASES.get(dataset, dataset), data, run)
    if value.captions is None:
        raise CliplabError(f"{dataset}: has no captions (use coco or a manifest with a caption column)")
    backbone = run.load_backbone()
    report = evaluate_retrieval(backbone, value, output_dir, run.cache_dir, run.batch_size, run.workers,
                                progress=not run.quiet, recall_k=ks)
    table = Table(title=f"retrieval · {value.name} ({value.split}, {report.num_images} images, "
                        f"{report.num_texts} captions) · {backbone.display_name}")
    table.add_column("direction")
    for k in ks:
        table.add_column(f"R@{k}", justify="right")
    table.add_row("text -> image", *(f"{100 * report.metrics[f'image_retrieval_recall@{k}']:.2f}%" for k in ks))
    table.add_row("image -> text", *(f"{100 * report.metrics[f'text_retrieval_recall@{k}']:.2f}%" for k in ks))
    console.print(table)
    if report.truncated_texts:
        policy = report.record["cliplab"]["long_text"]["policy"]
        err_console.print(f"[yellow]{report.truncated_texts} caption(s) exceed the {backbone.context_length}-token "
                          f"context[/] (--long-text {policy})")
    failed = report.record["cliplab"]["failed_images"]
    if failed:
        err_console.print(f"[yellow]{len(failed)} image(s) skipped[/] (listed in {report.files.get('json')})")
    for kind, path in report.files.items():
        console.print(f"{kind}: {path}")
