"""``cliplab link``: record linkage with pooled image-text embeddings (CLIPPINGS, paper 40), clusters CSV out."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import CliplabError
from .common import RunOptions, command, console

COLUMNS = ("row", "image", "text", "label", "cluster", "cluster_size")


def _write_csv(rows: list[dict], path: Path) -> None:
    import csv
    import io

    from ..fileio import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


@command
def link(
    manifest: Path = typer.Argument(..., help="Records: a CSV (header with path and caption), JSONL or JSON "
                                    "manifest; each row an image path (relative to the manifest) and its text "
                                    "(caption); an optional label (the true entity) adds pairwise precision, recall "
                                    "and F1."),
    threshold: float = typer.Option(0.9, "--threshold", "-t", help="Link two records when one is among the other's "
                                    "nearest neighbours with a pooled cosine of at least this (above 1: no links)."),
    neighbours: int = typer.Option(10, "--neighbours", "-k", help="Nearest neighbours searched per record."),
    image_weight: float = typer.Option(0.5, "--image-weight", help="Pooling weight w of the image in "
                                       "normalise(w * image + (1 - w) * text); 0.5 is the plain sum."),
    output: Path = typer.Option(None, "--output", "-o", help="Clusters CSV (row, image, text, label, cluster, "
                                "cluster_size); default MANIFEST-STEM-clusters.csv in the current folder."),
    tune: Path = typer.Option(None, "--tune", help="A labelled manifest (rows with label = entity) to tune on first: "
                              "a linear adapter on the pooled embeddings trained with a supervised contrastive "
                              "loss (keep it apart from MANIFEST when MANIFEST's labels are scored)."),
    tune_epochs: int = typer.Option(30, "--tune-epochs", help="Epochs of --tune."),
    tune_lr: float = typer.Option(1e-2, "--tune-lr", help="Learning rate of --tune (AdamW, cosine)."),
    temperature: float = typer.Option(0.1, "--temperature", help="Temperature of the --tune contrastive loss."),
    run: RunOptions = None,
):
    """Link records that are the same entity from image and text (CLIPPINGS): clusters of near neighbours, CSV."""
    from ..eval.linkage import link_manifest, read_records

    output = output or Path(f"{manifest.stem}-clusters.csv")
    if output.suffix.lower() != ".csv":
        raise CliplabError(f"--output {output}: give a .csv file")
    if neighbours < 1:
        raise CliplabError(f"--neighbours {neighbours}: give at least 1")
    if tune is not None and tune_epochs < 1:
        raise CliplabError(f"--tune-epochs {tune_epochs}: give at least 1")
    read_records(manifest)  # a bad manifest fails before a model is loaded
    if tune is not None:
        read_records(tune)
    backbone = run.load_backbone()
    adapter = None
    if tune is not None:
        from ..eval.linkage import embed_records, tune_adapter

        tuning, _, pooled = embed_records(backbone, tune, image_weight, run.cache_dir, run.batch_size, run.workers,
                                          progress=not run.quiet)
        adapter = tune_adapter(pooled, tuning.labels, tune_epochs, tune_lr, temperature, seed=run.seed,
                               progress=not run.quiet, device=run.device or "cpu")
        console.print(f"tuned: linear adapter, supervised contrastive, {len(tuning)} records of {tune}, "
                      f"{tune_epochs} epochs", soft_wrap=True)
    result = link_manifest(backbone, manifest, threshold, neighbours, image_weight, run.cache_dir,
                           batch_size=run.batch_size, workers=run.workers, progress=not run.quiet, adapter=adapter)
    _write_csv(result.rows(), output)
    count = len(set(result.cluster.tolist()))
    console.print(f"{len(result.images)} records, {len(result.pairs)} links, {count} clusters "
                  f"(threshold {threshold}, {neighbours} neighbours, {backbone.display_name})", soft_wrap=True)
    if result.scores is not None:
        s = result.scores
        console.print(f"pairwise precision {s['precision']:.4f}  recall {s['recall']:.4f}  F1 {s['f1']:.4f} "
                      f"({s['correct_pairs']} of {s['predicted_pairs']} linked pairs correct, {s['true_pairs']} "
                      f"true pairs, {s['records']} labelled records)", soft_wrap=True)
    console.print(f"{result.seconds / max(len(result.images), 1):.4f} s per record")
    console.print(f"clusters: {output}", soft_wrap=True)
