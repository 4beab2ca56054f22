"""The signal-carrying recipe: train ``cifar10-signal`` from scratch, then zero-shot top-1 on CIFAR-10 test.

Trains on the CIFAR-10 train images (9,000 after the 10% validation hold-out) with CIFAR-10 template
captions; the curve is the validation zero-shot top-1 over training time. The test split (10,000 images)
is scored once, at the end, through cliplab's own pipeline (load_model on the written folder, the feature
cache, the zero-shot head and CLIP_benchmark-style templates). The trained folder is the recipe's cached
model, so later benchmarks reuse it (``cliplab.train.recipes.recipe_model``).

    python benchmarks/pretrain_cifar10.py [--recipe cifar10-signal] [--reuse]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from _common import DATA_ROOT, RESULTS_DIR, header, load_average, log, write_results
from cliplab.data import load_dataset
from cliplab.eval.zeroshot import evaluate_zeroshot
from cliplab.models import load_model
from cliplab.train.recipes import RECIPES, recipe_config, recipe_folder, recipe_model


def plot_curve(history: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [row["seconds"] / 60 for row in history]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(minutes, [100 * row["zeroshot_top1"] for row in history], marker="o")
    ax.set_xlabel("training time (min, 2 CPU cores)")
    ax.set_ylabel("val zero-shot top-1 (%)")
    ax.axhline(10, color="grey", linestyle=":", label="chance")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cifar10-signal", choices=sorted(RECIPES))
    parser.add_argument("--reuse", action="store_true", help="use a cached model instead of training anew")
    args = parser.parse_args()
    config = recipe_config(args.recipe, DATA_ROOT)
    folder = recipe_folder(config, args.recipe)
    if folder.exists() and not args.reuse:
        shutil.rmtree(folder)
    load_before = load_average()
    began = time.perf_counter()
    recipe_model(args.recipe, DATA_ROOT, progress=True)
    wall = time.perf_counter() - began
    import json

    card = json.loads((folder / "model_card.json").read_text())
    log(f"trained in {wall / 60:.1f} min wall ({card['training_seconds'] / 60:.1f} min of steps)")
    backbone = load_model(str(folder))
    test = load_dataset("cifar10", root=DATA_ROOT, split="test")
    report = evaluate_zeroshot(backbone, test, "cifar10", output_dir=tempfile.mkdtemp(), progress=False)
    top1 = report.metrics["acc1"]
    log(f"CIFAR-10 test zero-shot top-1: {100 * top1:.2f}%")
    record = header("pretrain_cifar10", __doc__.strip().splitlines()[0], False)
    record.update(recipe=args.recipe, options=config.to_dict(), recipe_hash=card["recipe_hash"],
                  folder=str(folder), wall_seconds=round(wall, 1), training_seconds=card["training_seconds"],
                  test_top1=top1, test_metrics=report.metrics, val_curve=card["history"], data=card["data"],
                  load_average_before=load_before, load_average_after=load_average(), reused=args.reuse)
    plot = RESULTS_DIR / "pretrain_cifar10_curve.png"
    plot_curve(card["history"], plot, f"{args.recipe}: val zero-shot top-1 over training time")
    rows = "\n".join(f"| {r['step']} | {r['seconds'] / 60:.1f} | {r['loss']:.3f} | {100 * r['zeroshot_top1']:.1f} |"
                     for r in card["history"])
    lines = [f"# {args.recipe}: a small CLIP trained here, zero-shot on CIFAR-10 test", "",
             f"- test top-1 (10,000 images, CIFAR-10 templates): **{100 * top1:.2f}%** (chance 10%)",
             f"- training: {card['training_seconds'] / 60:.1f} min of steps, {wall / 60:.1f} min wall with image "
             f"decoding and checks, on {record['machine']['cpu_count']} CPU cores",
             f"- data: {card['data']['pairs']} CIFAR-10 train images (the 1,000 val images held out), "
             f"{card['data']['captions']} template captions; model {config.model}, {config.steps} steps x "
             f"{config.batch_size}, lr {config.lr}, seed {config.seed}",
             "- the recipe was chosen on the validation split (scripts/pretrain_sweep.py); test was read only here",
             "", "| step | minutes | loss | val top-1 (%) |", "|---:|---:|---:|---:|", rows, "",
             f"![curve]({plot.name})"]
    write_results("pretrain_cifar10", record, "\n".join(lines))


if __name__ == "__main__":
    main()
