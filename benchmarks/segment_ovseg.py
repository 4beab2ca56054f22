"""OVSeg on the mosaic set: ground-truth masks classified by masked crops, and the segmenter ensemble; mIoU, s/image.

Signal rows: ``recipe:cifar10-signal`` (the 32-px open_clip ResNet trained here on CIFAR-10 train with template
captions; MaskCLIP's RN value path, one 32-px cell per CIFAR tile), CIFAR-10 templates, the first ``--test-images``
mosaics of CIFAR-10 *test* tiles (2 x 2, seed 0). Rows: (a) **ground-truth masks** given by the user, each classified
by CLIP on its masked crop (the authors' crop, mean fill; every pixel of a mask takes its class); (b) the dense
pipeline: MaskCLIP (the reference segmenter), ``ovseg`` with MaskCLIP as segmenter at the ensemble weight 0.7 (the
authors' default) and at 1.0 (CLIP on the segmenter's region crops alone). Mask prompt tuning needs a ViT tower:
``recipe:cifar10-vit-signal`` is not built, so its rows use a **random-weight** 32-px ViT (cliplab-vit-32px):
timing of training the mask tokens on ``--vit-train-images`` mosaic train images and of inference, mIoU at chance.
The recipe is loaded, never built.

    python benchmarks/segment_ovseg.py [--quick] [--test-images 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from _common import DATA_ROOT, RESULTS_DIR, header, load_average, log, md_table, write_results
from segment_denseclip import SIGNAL, evaluate, signal_model

NAME = "segment_ovseg"


def gt_mask_row(backbone, dataset, limit: int, label: str, prompt=None) -> dict:
    """Ground-truth masks classified by masked crops: mIoU of the resulting maps."""
    from cliplab.dense.ovseg import classify_regions
    from cliplab.eval.segmentation import segmentation_metrics

    preds, truths = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for index in range(min(limit, len(dataset))):
        truth = np.asarray(dataset.load_mask(index))
        classes = [c for c in np.unique(truth) if c != dataset.ignore_index]
        masks = np.stack([(truth == c) for c in classes]).astype(np.float32)
        probs = classify_regions(backbone, dataset.load_image(index), dataset.class_names, masks=masks,
                                 templates="cifar10", prompt=prompt)
        pred = np.zeros_like(truth)
        for mask, p in zip(masks, probs):
            pred[mask > 0] = int(np.argmax(p))
        preds.append(pred)
        truths.append(truth)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    metrics = segmentation_metrics(preds, truths, len(dataset.class_names), dataset.ignore_index)
    return {"model": label, "row": "ground-truth masks, masked crops" + (" + mask prompt" if prompt else ""),
            "items": len(preds), "mIoU": metrics.miou, "aAcc": metrics.aacc, "s_per_image": wall / len(preds),
            "cpu_s": cpu, "setup_s": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--vit-train-images", type=int, default=50)
    parser.add_argument("--vit-test-images", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.test_images, args.vit_train_images, args.vit_test_images = 10, 8, 4
    from cliplab.data.segmentation import MosaicSpec, load_segmentation

    out = RESULTS_DIR / f"{NAME}_files"
    record = header(NAME, __doc__.splitlines()[0], args.quick)
    record["load_before"] = load_average()
    record["settings"] = vars(args)
    test = load_segmentation("mosaic", DATA_ROOT, "test")
    rows = []
    backbone = signal_model()
    log(f"{SIGNAL}: ground-truth masks")
    rows.append(gt_mask_row(backbone, test, args.test_images, SIGNAL))
    for method, params, row in [("maskclip", None, "maskclip (reference segmenter)"),
                                ("ovseg", {"ensemble_weight": 0.7}, "ovseg: maskclip regions, lambda 0.7"),
                                ("ovseg", {"ensemble_weight": 1.0}, "ovseg: maskclip regions, lambda 1 (crops only)")]:
        log(f"{SIGNAL}: {row}")
        rows.append(dict(evaluate(backbone, test, method, args.test_images, out / "signal", params), model=SIGNAL,
                         row=row))
    from cliplab.dense.ovseg import OVSeg, load_mask_prompt
    from segment_methods import vit_32px

    vit = vit_32px()
    label = "cliplab-vit-32px (random weights)"
    train = load_segmentation("mosaic", DATA_ROOT, "train", mosaic=MosaicSpec(count=args.vit_train_images, seed=1))
    with tempfile.TemporaryDirectory() as folder:
        log(f"{label}: mask prompt tuning on {len(train)} mosaic train images, {args.epochs} epochs")
        t0, c0 = time.perf_counter(), time.process_time()
        summary = OVSeg.train_dense(vit, train, folder, epochs=args.epochs, batch_size=32, lr=2e-3)
        train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        prompt = load_mask_prompt(f"{folder}/mask_prompt.safetensors", vit)
        rows.append(dict(gt_mask_row(vit, test, args.vit_test_images, label, prompt), train_wall_s=train_wall,
                         train_cpu_s=train_cpu, train_windows=summary["windows"], train_steps=summary["steps"]))
        rows.append(dict(evaluate(vit, test, "ovseg", args.vit_test_images, out / "vit",
                                  {"ensemble_weight": 0.7, "weights": folder}), model=label,
                         row="ovseg + mask prompt: maskclip regions, lambda 0.7", params={"weights": "(trained)"}))
    for r in rows:
        log(f"  {r['model']} {r['row']}: mIoU {100 * r['mIoU']:.1f}%, {r['s_per_image']:.3f} s/image")
    record["runs"] = rows
    record["load_after"] = load_average()
    table = md_table(["model", "method", "test images", "mIoU %", "pixel acc %", "s/image", "train s (wall / CPU)",
                      "train regions / steps"],
                     [[r["model"], r["row"], r["items"], 100 * r["mIoU"], 100 * r["aAcc"], r["s_per_image"],
                       f"{r['train_wall_s']:.0f} / {r['train_cpu_s']:.0f}" if "train_wall_s" in r else "",
                       f"{r['train_windows']} / {r['train_steps']}" if "train_windows" in r else ""] for r in rows])
    body = "\n".join([
        "# OVSeg on the mosaic set (recipe:cifar10-signal; ViT rows with random weights: timing only)\n",
        "Test: the first mosaic test images (2 x 2 CIFAR-10 *test* tiles, 64 px; the dense rows at each image's own "
        "size with model-size windows at the pipeline's stride). Ground-truth-mask rows: each true class region is "
        "a user mask, classified by CLIP on its masked crop (bounding box, outside filled with the pixel mean, "
        "resized bicubically to the model's input). ovseg rows: MaskCLIP's arg-max regions per window classified "
        "the same way and ensembled p_seg^(1-l) p_clip^l per patch. "
        "On the ResNet each 32-px window is one 32-px cell, so MaskCLIP's region in a window is the whole win"
        "dow and its masked crop is the window itself: the ovseg rows can only repeat MaskCLIP ther"
        "e (a ViT with a finer grid is where the crops differ). "
        f"{SIGNAL}: the 32-px ResNet trained here on CIFAR-10 train with template captions (it has seen these "
        "classes); mask prompt tuning is ViT-only, so its rows use cliplab-vit-32px with **random weights** "
        "(recipe:cifar10-vit-signal is not built): chance-level mIoU, timing only. CPU seconds on this shared "
        f"2-core machine, torch threads {args.threads} (load average before/after {record['load_before']} / "
        f"{record['load_after']}).\n",
        table,
    ])
    write_results(NAME + ("_quick" if args.quick else ""), record, body)


if __name__ == "__main__":
    main()
