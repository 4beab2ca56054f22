"""Box scoring (issue 27 items 1-2): box-level accuracy with ground-truth boxes, and BIRDet's partial-object
suppression on boxes with known truth.

1. coco_mini val2017, every non-crowd ground-truth box classified over the 80 category names (``--coco-model``,
   default ``ViT-B-32:random``: timing only, accuracy is chance).
2. CIFAR-10 mosaics (k x k test tiles, exact boxes) with the signal model (``recipe:cifar10-signal``, 32-px RN trained
   here): top-1 of the exact tile boxes and of loose boxes (each side grown by a quarter of the tile, clipped), and
   partial-object suppression on each tile's box plus a half-size box inside it: the share of half boxes dropped
   (they are parts of a tile) and of whole-tile boxes dropped (never right) at thresholds 0.9 and 1.

    python benchmarks/regions_boxes.py [--quick] [--coco-images 20] [--mosaics 100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import DATA_ROOT, benchmark_model, header, log, md_table, write_results
from cliplab.data.segmentation import MosaicSpec, load_segmentation
from cliplab.features.text import class_weights
from cliplab.regions.birdet import partial_object_suppression
from cliplab.regions.coco import box_accuracy
from cliplab.regions.scoring import category_probabilities, embed_boxes


def _never_build(spec: str) -> None:
    """A recipe model must be built already: this benchmark never starts (or joins) a recipe build."""
    if spec.startswith("recipe:"):
        from cliplab.train.recipes import recipe_model

        recipe_model(spec.split(":", 1)[1], DATA_ROOT, build=False)


def mosaic_part(spec: str, count: int, k: int = 2) -> tuple[dict, str]:
    _never_build(spec)
    backbone, note = benchmark_model(spec)
    data = load_segmentation("mosaic", DATA_ROOT, "test", mosaic=MosaicSpec(count=count, k=k, seed=0))
    t = data.tile_size
    weights = class_weights(backbone, data.class_names, "imagenet7")
    start, cpu = time.perf_counter(), time.process_time()
    exact, loose, truth, kept_half, kept_whole = [], [], [], {0.9: [], 1.0: []}, {0.9: [], 1.0: []}
    grow = t / 4
    for index in range(len(data)):
        image = data.load_image(index)
        tiles = np.array([[c * t, r * t, t, t] for r in range(k) for c in range(k)], dtype=np.float64)
        big = np.stack([np.maximum(tiles[:, 0] - grow, 0), np.maximum(tiles[:, 1] - grow, 0)], axis=1)
        far = np.minimum(tiles[:, :2] + t + grow, k * t)
        wide = np.concatenate([big, far - big], axis=1)
        half = np.concatenate([tiles[:, :2] + t / 4, np.full((k * k, 2), t / 2)], axis=1)
        probs = category_probabilities(embed_boxes(backbone, image, np.concatenate([tiles, wide, half])), weights,
                                       backbone.logit_scale)
        n = k * k
        exact.append(probs[:n].argmax(1))
        loose.append(probs[n:2 * n].argmax(1))
        truth.append(data.tile_labels[index].ravel())
        boxes, labels = np.concatenate([tiles, half]), np.concatenate([probs[:n].argmax(1), probs[2 * n:].argmax(1)])
        for threshold in kept_half:
            kept = set(partial_object_suppression(boxes, labels, threshold).tolist())
            kept_whole[threshold] += [i in kept for i in range(n)]
            kept_half[threshold] += [n + i in kept for i in range(n)]
    y = np.concatenate(truth)
    row = {"model": spec, "weights": note, "mosaics": count, "k": k, "boxes": int(len(y)),
           "top1_exact": float((np.concatenate(exact) == y).mean()),
           "top1_loose": float((np.concatenate(loose) == y).mean()),
           "suppression": {str(th): {"half_boxes_dropped": 1 - float(np.mean(kept_half[th])),
                                     "whole_boxes_dropped": 1 - float(np.mean(kept_whole[th]))}
                           for th in kept_half},
           "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}
    return row, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--coco-model", default="ViT-B-32:random")
    parser.add_argument("--coco-images", type=int, default=20)
    parser.add_argument("--mosaic-model", default="recipe:cifar10-signal")
    parser.add_argument("--mosaics", type=int, default=100)
    args = parser.parse_args()
    if args.quick:
        args.coco_images, args.mosaics = 3, 10
    record = header("regions_boxes", __doc__.splitlines()[0], args.quick)
    log(f"coco_mini val2017: {args.coco_images} images, {args.coco_model}")
    _never_build(args.coco_model)
    backbone, coco_note = benchmark_model(args.coco_model)
    coco = box_accuracy(backbone, DATA_ROOT / "coco_mini" / "instances_val2017.json", max_images=args.coco_images)
    coco.update(model=args.coco_model, weights=coco_note)
    log(f"coco: {coco}")
    mosaic, _ = mosaic_part(args.mosaic_model, args.mosaics)
    log(f"mosaic: {mosaic}")
    record.update(coco=coco, mosaic=mosaic)
    sup = mosaic["suppression"]
    body = "\n\n".join([
        "# Box scoring: ground-truth boxes and partial-object suppression",
        f"## coco_mini val2017, ground-truth boxes ({coco['model']}: {coco['weights']})",
        md_table(["images", "boxes", "classes", "top-1", "top-5", "wall s", "CPU s", "boxes / s"],
                 [[coco["images"], coco["boxes"], coco["classes"], coco["top1"], coco["top5"], coco["wall_s"],
                   coco["cpu_s"], coco["boxes"] / coco["wall_s"]]]),
        f"## CIFAR-10 mosaics, {mosaic['k']}x{mosaic['k']} test tiles ({mosaic['model']}: {mosaic['weights']})",
        md_table(["mosaics", "boxes", "top-1 exact boxes", "top-1 loose boxes (+1/4 tile per side)", "wall s"],
                 [[mosaic["mosaics"], mosaic["boxes"], mosaic["top1_exact"], mosaic["top1_loose"],
                   mosaic["wall_s"]]]),
        "Partial-object suppression over each tile's box and a half-size box centred inside it (labels: the "
        "predicted ones; a half box is dropped only when its prediction agrees with its tile's):",
        md_table(["threshold", "half boxes dropped", "whole-tile boxes dropped"],
                 [[th, v["half_boxes_dropped"], v["whole_boxes_dropped"]] for th, v in sup.items()]),
    ])
    write_results("regions_boxes" + ("_quick" if args.quick else ""), record, body)


if __name__ == "__main__":
    main()
