"""``cliplab rank`` (order images by a text) and ``cliplab rank-train`` (the ranking-aware adapter, paper 15)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import CliplabError
from .common import DataOptions, RunOptions, command, console, err_console, report_failures

ORDINAL_PREFIX = "ordinal:"
COLUMNS = ("rank", "score", "name")


def _write_csv(rows: list[dict], path: Path) -> None:
    import csv
    import io

    from ..fileio import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _metrics_line(name: str, m: dict) -> str:
    line = f"{name}: Kendall tau {m['kendall_tau']:+.4f}  pairwise accuracy {m['pairwise_accuracy']:.4f}"
    if "within_tau" in m:
        line += f"  (within a source image: tau {m['within_tau']:+.4f}, pairwise {m['within_pairwise']:.4f})"
    return line + f"  {m['items']} images"


@command
def rank(
    images: Path = typer.Argument(..., help="A folder of images (flat, or class folders named by numbers: then the "
                                  "order is scored against them) or a manifest."),
    by: str = typer.Option(None, "--by", help="What to rank by, in words (\"how blurry is the image\"). Default with "
                           "--model-dir: the text the adapter was trained for."),
    model_dir: Path = typer.Option(None, "--model-dir", help="A rank adapter folder from cliplab rank-train; without "
                                   "it images are ranked by the cosine of their embedding to the text (zero-shot)."),
    output: Path = typer.Option(None, "--output", "-o", help="Also write the ranking as CSV (rank, score, name)."),
    ascending: bool = typer.Option(False, "--ascending", help="Lowest score first (default: highest first)."),
    run: RunOptions = None,
):
    """Order a folder of images by a text: rank, score and name (relative to the folder), highest first."""
    from ..data import load_dataset
    from ..data.ordinal import numeric_levels
    from ..eval.ranking import rank_images, ranking_metrics
    from ..train.rank_adapter import load_ranker

    if output is not None and output.suffix.lower() != ".csv":
        raise CliplabError(f"--output {output}: give a .csv file")
    if model_dir is None and (by is None or not by.strip()):
        raise CliplabError("say what to rank by: --by \"TEXT\" (or give a trained adapter with --model-dir)")
    ranker = load_ranker(model_dir) if model_dir is not None else None
    dataset = load_dataset(images, hash_content=run.hash_content)
    backbone = run.load_backbone()
    if ranker is not None and by and by != ranker.text:
        err_console.print(f"note: the adapter was trained to rank by {ranker.text!r}, not {by!r}", soft_wrap=True,
                          markup=False, highlight=False)
    result = rank_images(backbone, dataset, by, ranker, run.cache_dir, batch_size=run.batch_size,
                         workers=run.workers, progress=not run.quiet, descending=not ascending)
    report_failures(result.failures, limit=10)
    rows = result.rows()
    for row in rows:
        typer.echo(f"{row['rank']:>5}  {row['score']:+.4f}  {row['name']}")
    if output is not None:
        _write_csv(rows, output)
    how = "rank adapter" if ranker is not None else "zero-shot cosine"
    console.print(f"{len(rows)} images ranked by {result.text!r} ({how}, {backbone.display_name}); "
                  f"{result.seconds / max(len(rows), 1):.4f} s per image", soft_wrap=True, markup=False,
                  highlight=False)
    try:
        targets = numeric_levels(dataset)
    except CliplabError:
        targets = None
    if targets is not None:
        console.print(_metrics_line("against the folder's levels", ranking_metrics(targets[result.indices],
                                                                                     result.scores)),
                      soft_wrap=True, markup=False, highlight=False)
    if output is not None:
        console.print(f"ranking: {output}", soft_wrap=True, markup=False, highlight=False)


@command
def rank_train(
    train_data: str = typer.Argument(..., help="Training images with levels: ordinal:blur or "
                                      "ordinal:brightness (seeded CIFAR-10 test images at levels 0..5, split by "
                                      "source image; the test half is scored after training), or a folder/manifest "
                                      "whose class names are numbers (0/, 1/, 2/ ...)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the adapter (rank_adapter.safetensors, "
                                "rank_adapter.json) and its resumable checkpoints."),
    by: str = typer.Option(None, "--by", help="The ranking text (default for ordinal: sets: the property's, e.g. "
                           "\"how blurry is the image\")."),
    epochs: int = typer.Option(30, "--epochs", help="Training epochs (AdamW, cosine schedule)."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate."),
    train_batch: int = typer.Option(32, "--train-batch", help="Images per step; the pair loss uses every ordered "
                                    "pair of a step with different levels."),
    pair: str = typer.Option("logistic", "--pair", help="Pairwise loss on the rank-aware branch: logistic "
                             "(binary cross-entropy, the authors') or margin (hinge)."),
    margin: float = typer.Option(1.0, "--margin", help="Margin of --pair margin."),
    pair_weight: float = typer.Option(1.0, "--pair-weight", help="Weight of the pairwise loss."),
    regression_weight: float = typer.Option(1.0, "--regression-weight", help="Weight of the regression loss."),
    score_pair_weight: float = typer.Option(1.0, "--score-pair-weight", help="Weight of the pairwise loss on "
                                            "differences of the regression scores (0: off)."),
    weight_decay: float = typer.Option(0.05, "--weight-decay", help="AdamW weight decay."),
    layers: int = typer.Option(2, "--layers", help="Cross-attention fusion blocks."),
    heads: int = typer.Option(4, "--heads", help="Attention heads (must divide the width)."),
    queries: int = typer.Option(4, "--queries", help="Learned query tokens of the rank-aware attention."),
    width: int = typer.Option(128, "--width", help="Adapter width (0: the model's embedding width)."),
    sources: int = typer.Option(200, "--sources", help="ordinal: source images drawn (half train, half test)."),
    ordinal_seed: int = typer.Option(0, "--ordinal-seed", help="ordinal: seed of the draw and the split."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Train the ranking-aware adapter (paper 15) on images with levels; save it for cliplab rank --model-dir."""
    import json

    from ..data.ordinal import PROPERTIES, ordinal_set
    from ..eval.ranking import evaluate_ranking, fit_ranker
    from ..train.rank_adapter import CONFIG, AdapterConfig, RankTrainSettings

    settings = RankTrainSettings(epochs=epochs, lr=lr, batch_size=train_batch, weight_decay=weight_decay,
                                 regression_weight=regression_weight, pair_weight=pair_weight,
                                 score_pair_weight=score_pair_weight, pair=pair, margin=margin, seed=run.seed)
    if (output / CONFIG).exists():
        raise CliplabError(f"{output}: holds a trained rank adapter already; give another -o folder")
    test = None
    if train_data.startswith(ORDINAL_PREFIX):
        prop = train_data[len(ORDINAL_PREFIX):]
        if prop not in PROPERTIES:
            raise CliplabError(f"{train_data}: choose ordinal:{' or ordinal:'.join(PROPERTIES)}")
        if data.split is not None:
            raise CliplabError("--split does not apply to ordinal: sets (they train on their train half)")
        train = ordinal_set(prop, "train", sources=sources, seed=ordinal_seed, root=data.data_root)
        test = ordinal_set(prop, "test", sources=sources, seed=ordinal_seed, root=data.data_root)
        by = by or train.text
    else:
        train = data.load(train_data, hash_content=run.hash_content)
    if by is None or not by.strip():
        raise CliplabError("say what to rank by: --by \"TEXT\"")
    from ..data.ordinal import numeric_levels

    numeric_levels(train)  # levels checked before a model loads
    backbone = run.load_backbone()
    config = AdapterConfig(dim=backbone.embed_dim, width=width or None, heads=heads, layers=layers, queries=queries)
    common = dict(batch_size=run.batch_size, workers=run.workers, progress=not run.quiet)
    ranker = fit_ranker(backbone, train, by, settings=settings, config=config, cache_dir=run.cache_dir,
                        device=run.device or "cpu", checkpoint_dir=output / "checkpoints", **common)
    console.print(f"trained: rank adapter on {len(train)} images of {train.name} ({ranker.tokens} tokens, "
                  f"{epochs} epochs, {ranker.seconds:.1f} s)", soft_wrap=True, markup=False, highlight=False)
    metrics = {}
    parts = [("train", train)] + ([("test", test)] if test is not None else [])
    for name, part in parts:
        fitted, _ = evaluate_ranking(backbone, part, by, ranker, run.cache_dir, **common)
        metrics[f"{name}_adapter"] = fitted
        console.print(_metrics_line(f"{name} ({part.split}), adapter", fitted), soft_wrap=True, markup=False,
                      highlight=False)
        if name == "test":
            baseline, _ = evaluate_ranking(backbone, part, by, None, run.cache_dir, **common)
            metrics[f"{name}_zero_shot"] = baseline
            console.print(_metrics_line(f"{name} ({part.split}), zero-shot cosine", baseline), soft_wrap=True,
                          markup=False, highlight=False)
    ranker.metrics = json.loads(json.dumps(metrics, default=float))
    ranker.save(output)
    console.print(f"adapter: {output}", soft_wrap=True, markup=False, highlight=False)
