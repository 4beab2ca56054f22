"""DenseCLIP on the mosaic set: mIoU and seconds per image, before and after training on mosaic train.

Signal rows: ``recipe:cifar10-signal`` (the 32-px open_clip ResNet trained here on CIFAR-10 train with template
captions; dense features from MaskCLIP's RN value path, one 32-px cell per CIFAR tile). DenseCLIP is trained
(``cliplab.dense.denseclip.train_denseclip``: learned context, context decoder, gamma, the 1x1 adapter head; CLIP
frozen) on ``--train-images`` mosaics of CIFAR-10 *train* tiles (k = 2, seed 1) and evaluated on the first
``--test-images`` mosaics of CIFAR-10 *test* tiles (seed 0), each image at its own size, the pipeline's windows.
Rows: MaskCLIP (CIFAR-10 templates) as the reference, DenseCLIP at initialisation (plain "a photo of a {c}."
prompts, gamma = 1e-4, untrained decoder), DenseCLIP trained. ``recipe:cifar10-vit-signal`` is not built, so the
ViT rows use a **random-weight** 32-px ViT (cliplab-vit-32px): timing of training and inference only, their mIoU
is chance level. The recipe is loaded, never built, by this script.

    python benchmarks/segment_denseclip.py [--quick] [--train-images 500] [--test-images 200] [--epochs 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import DATA_ROOT, RESULTS_DIR, header, load_average, log, md_table, write_results

NAME = "segment_denseclip"
SIGNAL = "recipe:cifar10-signal"


def signal_model():
    """The signal recipe's model, read from its built folder (``build=False``: never built here)."""
    from cliplab.models import load_model
    from cliplab.train.recipes import recipe_model

    backbone = load_model(str(recipe_model(SIGNAL.split(":", 1)[1], DATA_ROOT, build=False)))
    backbone.display_name = SIGNAL
    return backbone


def evaluate(backbone, dataset, method: str, limit: int, out: Path, params: dict | None = None) -> dict:
    from cliplab.eval.segmentation import evaluate_segmentation

    record = evaluate_segmentation(backbone, dataset, method, params=params, limit=limit, output_dir=out,
                                   grid_items=3).record
    return {"method": method, "items": record["items"], "mIoU": record["mIoU"], "aAcc": record["aAcc"],
            "s_per_image": record["timing"]["s_per_image"], "cpu_s": record["timing"]["cpu_s"],
            "setup_s": record["timing"]["setup_s"], "stride": record["settings"]["stride"],
            "window": record["settings"]["window"]}


def rows_for(backbone, label: str, args, out: Path, train, test) -> list[dict]:
    from cliplab.dense.denseclip import train_denseclip

    rows = []
    folder_of = {"maskclip (reference)": "maskclip", "denseclip at init (plain prompts)": "denseclip_init",
                 "denseclip trained": "denseclip_trained"}
    model_dir = out / ("signal" if label == SIGNAL else "vit_random")
    for method, row_label in [("maskclip", "maskclip (reference)"), ("denseclip", "denseclip at init (plain prompts)")]:
        log(f"{label}: {row_label}")
        rows.append(dict(evaluate(backbone, test, method, args.test_images, model_dir / folder_of[row_label]),
                         model=label, row=row_label))
    with tempfile.TemporaryDirectory() as folder:
        log(f"{label}: training denseclip on {len(train)} mosaic train images, {args.epochs} epochs")
        t0, c0 = time.perf_counter(), time.process_time()
        _, summary = train_denseclip(backbone, train, folder, epochs=args.epochs, batch_size=args.batch_size,
                                     lr=args.lr, seed=0)
        train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        log(f"  {summary['windows']} windows, {summary['steps']} steps, loss {summary['loss']:.3f}, "
            f"{train_wall:.0f} s")
        row = evaluate(backbone, test, "denseclip", args.test_images, model_dir / folder_of["denseclip trained"],
                       {"weights": folder})
        row["params"] = {"weights": "(trained here)"}
    rows.append(dict(row, model=label, row="denseclip trained", train_wall_s=train_wall, train_cpu_s=train_cpu,
                     train_windows=summary["windows"], train_steps=summary["steps"], train_loss=summary["loss"]))
    for r in rows:
        log(f"  {r['row']}: mIoU {100 * r['mIoU']:.1f}%, {r['s_per_image']:.3f} s/image")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train-images", type=int, default=500)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--vit-train-images", type=int, default=50)
    parser.add_argument("--vit-test-images", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.train_images, args.test_images, args.epochs = 40, 20, 2
        args.vit_train_images, args.vit_test_images = 8, 4
    from cliplab.data.segmentation import MosaicSpec, load_segmentation

    out = RESULTS_DIR / f"{NAME}_files"
    record = header(NAME, __doc__.splitlines()[0], args.quick)
    record["load_before"] = load_average()
    record["settings"] = vars(args)
    test = load_segmentation("mosaic", DATA_ROOT, "test")
    rows = rows_for(signal_model(), SIGNAL, args, out,
                    load_segmentation("mosaic", DATA_ROOT, "train", mosaic=MosaicSpec(count=args.train_images,
                                                                                       seed=1)), test)
    if not args.skip_vit:
        from segment_methods import vit_32px

        vit_args = argparse.Namespace(**dict(vars(args), test_images=args.vit_test_images))
        train = load_segmentation("mosaic", DATA_ROOT, "train", mosaic=MosaicSpec(count=args.vit_train_images,
                                                                                  seed=1))
        rows += rows_for(vit_32px(), "cliplab-vit-32px (random weights)", vit_args, out, train, test)
    record["runs"] = rows
    record["load_after"] = load_average()
    table = md_table(["model", "method", "test images", "mIoU %", "pixel acc %", "s/image", "setup s",
                      "train s (wall / CPU)", "train windows / steps", "last train loss"],
                     [[r["model"], r["row"], r["items"], 100 * r["mIoU"], 100 * r["aAcc"], r["s_per_image"],
                       r["setup_s"], f"{r['train_wall_s']:.0f} / {r['train_cpu_s']:.0f}" if "train_wall_s" in r
                       else "", f"{r['train_windows']} / {r['train_steps']}" if "train_windows" in r else "",
                       r.get("train_loss", "")]
                      for r in rows])
    body = "\n".join([
        "# DenseCLIP on the mosaic set (recipe:cifar10-signal; ViT rows with random weights: timing only)\n",
        f"Test: the first mosaic test images (2 x 2 CIFAR-10 *test* tiles, 64 px, each image at its own size, "
        f"model-size windows at the pipeline's stride). DenseCLIP trained on {args.train_images} (ViT: "
        f"{args.vit_train_images}) mosaics of CIFAR-10 *train* tiles (seed 1), {args.epochs} epochs, AdamW lr "
        f"{args.lr}, batch {args.batch_size} windows; CLIP frozen, its window features computed once (inside the "
        f"train seconds). MaskCLIP with CIFAR-10 templates is the reference. {SIGNAL}: the 32-px ResNet trained here "
        "on CIFAR-10 train with template captions (signal-carrying, but it has seen these classes, and the training "
        "tiles are the very images it was trained on: a low train loss says little about test images). "
        "cliplab-vit-32px: **random weights** (recipe:cifar10-vit-signal is not built): its mIoU is chance level, "
        f"the rows give timing only. CPU seconds on this shared 2-core machine, torch threads {args.threads} "
        f"(load average before/after {record['load_before']} / {record['load_after']}).\n",
        table,
    ])
    write_results(NAME + ("_quick" if args.quick else ""), record, body)


if __name__ == "__main__":
    main()
