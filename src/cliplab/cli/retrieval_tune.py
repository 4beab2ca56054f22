"""``cliplab retrieval-tune``: retrieval fine-tuning with maintained alignment (paper 5, two stages; adapters saved)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from .common import DataOptions, RunOptions, command, console, default_templates

ALIASES = {"coco_mini": "coco"}
RECALL_K = (1, 5, 10)


def evaluate_model(model, dataset, templates, cache_dir=None, batch_size: int = 64, workers=None,
                   progress: bool = False) -> dict[str, float]:
    """A backbone's numbers on ``dataset``: text -> image and image -> text Recall@k (``retrieval-eval``'s
    definitions) where it has captions; zero-shot top-1 (``templates`` x its classes, CLIP's ensembling) and
    leave-one-out image -> image precision@1 and @10 where it has labels."""
    import numpy as np

    from ..data import has_labels
    from ..eval.retrieval import evaluate_retrieval
    from ..features.embed import embed_images
    from ..features.text import class_weights
    from ..train.retrieval_tune import image_retrieval_precision

    out: dict[str, float] = {}
    if dataset.captions is not None:
        report = evaluate_retrieval(model, dataset, None, cache_dir, batch_size, workers, progress=progress,
                                    recall_k=RECALL_K)
        for k in RECALL_K:
            out[f"text->image R@{k}"] = report.metrics[f"image_retrieval_recall@{k}"]
            out[f"image->text R@{k}"] = report.metrics[f"text_retrieval_recall@{k}"]
    if has_labels(dataset):
        feats = embed_images(model, dataset, cache_dir, batch_size=batch_size, num_workers=workers,
                             progress=progress)
        keep = np.asarray(feats.labels) >= 0
        x, y = np.asarray(feats.features)[keep], np.asarray(feats.labels)[keep]
        weights = class_weights(model, list(feats.class_names), templates, cache_dir=cache_dir)
        out["zero-shot top-1"] = float(np.mean((x @ weights).argmax(1) == y))
        out["image->image P@1"] = image_retrieval_precision(x, y, 1)
        out["image->image P@10"] = image_retrieval_precision(x, y, 10)
    return out


def evaluate_pair(before, after, dataset, templates, cache_dir=None, batch_size: int = 64, workers=None,
                  progress: bool = False) -> dict[str, tuple[float, float]]:
    """``{metric: (before, after)}``: ``evaluate_model`` of two backbones on ``dataset``."""
    first, second = (evaluate_model(m, dataset, templates, cache_dir, batch_size, workers, progress)
                     for m in (before, after))
    return {k: (first[k], second[k]) for k in first}


def _subset(dataset, count: int | None, seed: int):
    if count is None or count >= len(dataset):
        return dataset
    import numpy as np

    from ..data import Subset

    return Subset(dataset, np.sort(np.random.default_rng(seed).permutation(len(dataset))[:count]))


@command
def retrieval_tune(
    labelled: str = typer.Option(..., "--labelled", "-l", help="Labelled images for stage 1 (metric learning): "
                                 "cifar10 (its train split), a class-folder path or a manifest with labels."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for adapters.safetensors + retrieval_tune.json "
                                "(and train_state/, the checkpoints a rerun resumes from)."),
    captions: str = typer.Option(None, "--captions", help="A captioned set whose (image, caption) pairs stage 2 "
                                 "aligns as well: coco (its train split), a caption manifest."),
    pseudo_captions: bool = typer.Option(True, "--pseudo-captions/--no-pseudo-captions", help="Stage 2 pairs each "
                                         "labelled image with a template sentence of its class."),
    templates: str = typer.Option(None, "--templates", "-t", help="Template set or file of the pseudo-captions and "
                                  "of the zero-shot evaluation (default: the labelled set's CLIP_benchmark set, "
                                  "else imagenet7)."),
    train_split: str = typer.Option("train", "--labelled-split", help="Split of --labelled and --captions to train "
                                    "on."),
    val_split: str = typer.Option(None, "--val-split", help="A labelled held-out split (e.g. val) for the progress "
                                  "numbers: image -> image P@1 (stage 1), zero-shot top-1 (stage 2)."),
    max_items: int = typer.Option(None, "--max-items", min=2, help="Train on this many labelled images (a seeded "
                                  "draw), for a small budget."),
    stage1_epochs: int = typer.Option(10, "--stage1-epochs", min=0, help="Epochs of stage 1 (0: skip)."),
    stage2_epochs: int = typer.Option(10, "--stage2-epochs", min=0, help="Epochs of stage 2 (0: skip)."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate (AdamW, cosine) of stage 1, and of stage 2 unless "
                             "--stage2-lr."),
    stage2_lr: float = typer.Option(None, "--stage2-lr", help="Learning rate of stage 2."),
    train_batch: int = typer.Option(256, "--train-batch", help="Training batch size (rows of cached features)."),
    margin: float = typer.Option(0.2, "--margin", help="ArcFace angular margin m (radians)."),
    scale: float = typer.Option(30.0, "--scale", help="ArcFace scale s."),
    temperature: float = typer.Option(None, "--temperature", help="Stage 2 InfoNCE temperature (default: 1 / the "
                                      "model's logit scale)."),
    evaluate: list[str] = typer.Option(None, "--eval", help="Evaluate before and after on this set (--eval-split) "
                                       "(repeatable): captioned sets give Recall@k both ways, labelled ones zero-shot "
                                       "top-1 and image -> image P@1. E.g. --eval coco --eval cifar10."),
    eval_split: str = typer.Option("test", "--eval-split", help="Split of the --eval sets."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Tune a model for image retrieval, then re-align its text side (paper 5): stage 1 trains a residual linear
    adapter on the image embeddings with ArcFace on labelled images; stage 2 trains one on the text embeddings with
    InfoNCE against the frozen new image space. The adapters merge into the towers' output projections."""
    import json

    from ..data import has_labels, load_templates
    from ..fileio import atomic_write_text

    labelled_name = ALIASES.get(labelled, labelled)
    chosen_templates = default_templates(templates, labelled_name)
    load_templates(chosen_templates)  # an unknown set fails before torch or a model loads
    if output.exists() and not output.is_dir():
        raise CliplabError(f"--output {output}: is a file; give a folder")
    train_set = data.load(labelled_name, train_split)
    if not has_labels(train_set):
        raise CliplabError(f"--labelled {labelled}: has no class labels (give cifar10, a class-folder path or a "
                           "manifest with a label column)")
    train_set = _subset(train_set, max_items, run.seed)
    caption_set = None
    if captions is not None:
        caption_set = data.load(ALIASES.get(captions, captions), train_split)
        if caption_set.captions is None:
            raise CliplabError(f"--captions {captions}: has no captions (use coco or a manifest with a caption column)")
    elif not pseudo_captions and stage2_epochs:
        raise CliplabError("stage 2 needs texts: give --captions, or keep --pseudo-captions")
    val_set = data.load(labelled_name, val_split) if val_split else None
    eval_sets = [(name, data.load(ALIASES.get(name, name), eval_split)) for name in evaluate or []]
    from ..train.retrieval_tune import RetrievalTuneConfig
    from ..train.retrieval_tune import retrieval_tune as tune

    config = RetrievalTuneConfig(stage1_epochs=stage1_epochs, stage2_epochs=stage2_epochs, lr=lr, stage2_lr=stage2_lr,
                                 batch_size=train_batch, margin=margin, scale=scale, temperature=temperature,
                                 pseudo_captions=pseudo_captions, templates=chosen_templates, seed=run.seed)
    backbone = run.load_backbone()
    tuned = tune(backbone, train_set, config, captioned=caption_set, val=val_set, cache_dir=run.cache_dir,
                 checkpoint_dir=output / "train_state", batch_size=run.batch_size, workers=run.workers,
                 progress=not run.quiet, device=run.device)
    for stage, what in (("stage1", "image adapter, ArcFace"), ("stage2", "text adapter, InfoNCE")):
        if stage in tuned.info:
            done = tuned.info[stage]
            extra = ", ".join(f"{k} {v:.4f}" for k, v in (done["history"][-1] if done["history"] else {}).items()
                              if k not in ("step", "epoch", "seconds", "loss"))
            line = f"{stage}: {what}: {done['steps']} steps, last loss {done['last_loss']:.4f}"
            console.print(line + (f", {extra}" if extra else ""), soft_wrap=True)
    after = tuned.apply(backbone)
    after.display_name = f"{backbone.display_name} + retrieval-tune"
    results = {}
    for name, dataset in eval_sets:
        scores = evaluate_pair(backbone, after, dataset, default_templates(templates, dataset.name), run.cache_dir,
                               run.batch_size, run.workers, progress=not run.quiet)
        results[name] = {k: {"before": b, "after": a} for k, (b, a) in scores.items()}
        console.print(f"{name} ({dataset.split}, {len(dataset)} images) · {backbone.display_name}: before / after "
                      "retrieval-tune", soft_wrap=True)
        table = Table()
        for column in ("metric", "before", "after"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for metric, (b, a) in scores.items():
            table.add_row(metric, f"{100 * b:.2f}%", f"{100 * a:.2f}%")
        console.print(table)
    if results:
        tuned.info["evaluation"] = results
    tuned.save(output)
    if results:
        atomic_write_text(output / "evaluation.json", json.dumps(results, indent=2) + "\n")
    console.print(f"adapters: {output} (model {after.model_id})", soft_wrap=True)
