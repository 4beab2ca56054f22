"""Box scoring (issue 27 items 1-2): box-level accuracy with ground-truth boxes, BIRDet's background class and
partial-object suppression on boxes with known truth, and seconds per box.

Parts (``--parts``, each merged into ``results/regions_boxes.json`` under its model, so models built later are
added by a later run; ``--render`` rewrites the markdown from the JSON):

- ``coco``: coco_mini val2017, every non-crowd ground-truth box classified over the 80 category names
  (``--coco-model``, default ``ViT-B-32:random``: timing only, accuracy is chance).
- ``mosaic`` (per ``--models``, signal models trained here on CIFAR-10): 2 x 2 mosaics of CIFAR-10 test tiles
  (exact boxes). Top-1 of the exact tile boxes and of loose boxes (each side grown by a quarter tile, clipped).
  Background: in a copy of each mosaic one tile (seeded) is replaced by a crop of a DTD texture (the test half of
  dtd_sample, as the counting scenes use), so its box holds no object; the four boxes are scored without a
  background class, with the plain "background" prompt as an extra class (``mix 0``), and with BIRDet's
  image-conditioned background (``mix 0.5``). Partial-object suppression: each tile's box plus a half-size box
  centred inside it, labels the predicted ones, thresholds 0.9 and 1.
- ``coco-cifar`` (per ``--models``): coco_mini val2017 + train2017 (the signal models never trained on COCO)
  boxes of at least 32 x 32 px of the 8 CIFAR-10 classes COCO has (boat -> ship, car -> automobile), over those
  8 names.

    python benchmarks/regions_boxes.py [--quick] [--parts coco,mosaic,coco-cifar] [--models recipe:cifar10-signal]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from PIL import Image

from _common import DATA_ROOT, RESULTS_DIR, built_model, header, log, md_table, write_results
from cliplab.data.counting import load_counting_scenes
from cliplab.data.segmentation import MosaicSpec, load_segmentation
from cliplab.features.text import class_weights
from cliplab.regions.birdet import BACKGROUND, background_embedding, partial_object_suppression, scores_with_background
from cliplab.regions.coco import box_accuracy
from cliplab.regions.scoring import category_probabilities, embed_boxes

NAME = "regions_boxes"
COCO_CIFAR = {"airplane": "airplane", "car": "automobile", "bird": "bird", "cat": "cat", "dog": "dog",
              "horse": "horse", "boat": "ship", "truck": "truck"}
MIXES = (0.0, 0.5)
RANDOM_NOTE = "random weights: timing only, the accuracy says nothing"


def load(spec: str):
    """(backbone, weights note); a recipe must be built already (this benchmark never starts a build)."""
    return built_model(spec, held_label="held-out val zero-shot", random_note=RANDOM_NOTE,
                       after=": weights that carry signal, but a small model that has seen these classes")


def texture_tile(textures, index: int, size: int, slots: int) -> tuple[Image.Image, int]:
    """A seeded DTD crop resized to ``size`` px and the tile slot (0..slots-1) it replaces in mosaic ``index``."""
    rng = np.random.default_rng([0, index])
    path, _ = textures[int(rng.integers(len(textures)))]
    with Image.open(path) as img:
        img = img.convert("RGB")
        side = int(rng.integers(min(img.size) // 4, min(img.size) // 2 + 1))
        left, top = (int(rng.integers(0, extent - side + 1)) for extent in img.size)
        crop = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return crop, int(rng.integers(slots))


def mosaic_part(backbone, count: int, k: int = 2) -> dict:
    data = load_segmentation("mosaic", DATA_ROOT, "test", mosaic=MosaicSpec(count=count, k=k, seed=0))
    textures = load_counting_scenes(DATA_ROOT, "test").textures
    t, n, scale = data.tile_size, k * k, backbone.logit_scale
    weights = class_weights(backbone, data.class_names, "imagenet7")
    bg_text = class_weights(backbone, [BACKGROUND], "imagenet7")[:, 0]
    tiles = np.array([[c * t, r * t, t, t] for r in range(k) for c in range(k)], dtype=np.float64)
    grow = t / 4
    near = np.maximum(tiles[:, :2] - grow, 0)
    wide = np.concatenate([near, np.minimum(tiles[:, :2] + t + grow, k * t) - near], axis=1)
    half = np.concatenate([tiles[:, :2] + t / 4, np.full((n, 2), t / 2)], axis=1)
    exact, loose, truth, boxes_scored = [], [], [], 0
    kept_half, kept_whole = {0.9: [], 1.0: []}, {0.9: [], 1.0: []}
    bg = {"none": [], **{m: [] for m in MIXES}}  # per mosaic: (predictions of the 4 tiles, the texture slot)
    start, cpu = time.perf_counter(), time.process_time()
    for index in range(len(data)):
        image = data.load_image(index).convert("RGB")
        probs = category_probabilities(embed_boxes(backbone, image, np.concatenate([tiles, wide, half])), weights,
                                       scale)
        exact.append(probs[:n].argmax(1))
        loose.append(probs[n:2 * n].argmax(1))
        truth.append(data.tile_labels[index].ravel())
        labels = np.concatenate([probs[:n].argmax(1), probs[2 * n:].argmax(1)])
        for threshold in kept_half:
            kept = set(partial_object_suppression(np.concatenate([tiles, half]), labels, threshold).tolist())
            kept_whole[threshold] += [i in kept for i in range(n)]
            kept_half[threshold] += [n + i in kept for i in range(n)]
        crop, slot = texture_tile(textures, index, t, n)
        scene = image.copy()
        scene.paste(crop, (int(tiles[slot, 0]), int(tiles[slot, 1])))
        feats = embed_boxes(backbone, scene, np.concatenate([tiles, [[0, 0, k * t, k * t]]]))
        bg["none"].append((category_probabilities(feats[:n], weights, scale).argmax(1), slot))
        for mix in MIXES:
            scores = scores_with_background(feats[:n], weights, background_embedding(bg_text, feats[n], mix), scale)
            bg[mix].append((scores.argmax(1), slot))
        boxes_scored += 3 * n + n + 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    y = np.concatenate(truth)
    background = {}
    for key, rows in bg.items():
        pred = np.stack([p for p, _ in rows])  # (mosaics, n)
        is_bg = np.zeros_like(pred, dtype=bool)
        is_bg[np.arange(len(rows)), [s for _, s in rows]] = True
        labels = np.stack(truth)
        objects = pred[~is_bg] == labels[~is_bg]
        entry = {"object_top1": float(objects.mean())}
        if key != "none":
            entry.update(object_called_background=float((pred[~is_bg] == len(data.class_names)).mean()),
                         texture_called_background=float((pred[is_bg] == len(data.class_names)).mean()))
        background["no background class" if key == "none" else f"mix {key:g}"] = entry
    return {"mosaics": count, "k": k, "boxes": int(len(y)), "top1_exact": float((np.concatenate(exact) == y).mean()),
            "top1_loose": float((np.concatenate(loose) == y).mean()), "background": background,
            "suppression": {str(th): {"half_boxes_dropped": 1 - float(np.mean(kept_half[th])),
                                      "whole_boxes_dropped": 1 - float(np.mean(kept_whole[th]))}
                            for th in kept_half},
            "boxes_scored": boxes_scored, "wall_s": wall, "cpu_s": cpu, "s_per_box": wall / boxes_scored}


def coco_cifar_part(backbone) -> dict:
    splits = {}
    for split in ("val2017", "train2017"):
        splits[split] = box_accuracy(backbone, DATA_ROOT / "coco_mini" / f"instances_{split}.json",
                                     min_area=32 * 32, categories=COCO_CIFAR)
    boxes = sum(s["boxes"] for s in splits.values())
    pooled = {key: sum(s[key] * s["boxes"] for s in splits.values()) / boxes for key in ("top1", "top5")}
    wall = sum(s["wall_s"] for s in splits.values())
    return {"splits": splits, "boxes": boxes, "images": sum(s["images"] for s in splits.values()),
            "classes": len(COCO_CIFAR), **pooled, "wall_s": wall, "cpu_s": sum(s["cpu_s"] for s in splits.values()),
            "s_per_box": wall / boxes}


def render(record: dict) -> str:
    parts = ["# Box scoring: ground-truth boxes, BIRDet's background class and partial-object suppression"]
    coco = record.get("coco")
    if coco:
        parts += [f"## coco_mini val2017, ground-truth boxes ({coco['model']}: {coco['weights']})",
                  md_table(["images", "boxes", "classes", "top-1", "top-5", "wall s", "CPU s", "s / box"],
                           [[coco["images"], coco["boxes"], coco["classes"], coco["top1"], coco["top5"],
                             coco["wall_s"], coco["cpu_s"], coco["s_per_box"]]])]
    mosaic = record.get("mosaic", {})
    if mosaic:
        first = next(iter(mosaic.values()))
        parts += [
            f"## CIFAR-10 mosaics: {first['mosaics']} images of {first['k']}x{first['k']} test tiles, exact boxes",
            md_table(["model", "boxes", "top-1 exact boxes", "top-1 loose boxes (+1/4 tile per side)",
                      "boxes scored", "wall s", "CPU s", "s / box"],
                     [[m, r["boxes"], r["top1_exact"], r["top1_loose"], r["boxes_scored"], r["wall_s"], r["cpu_s"],
                       r["s_per_box"]] for m, r in mosaic.items()]),
            "Background (BIRDet): one tile per mosaic replaced by a DTD texture crop; its box should be called "
            "background. Object top-1 counts a 'background' answer as wrong. mix 0: the plain 'background' prompt as "
            "an extra class; mix 0.5: normalize(0.5 t_bg + 0.5 v_image), the image-conditioned background:",
            md_table(["model", "background class", "object boxes top-1", "object boxes called background",
                      "texture boxes called background"],
                     [[m, key, v["object_top1"], v.get("object_called_background", "-"),
                       v.get("texture_called_background", "-")]
                      for m, r in mosaic.items() for key, v in r["background"].items()]),
            "Partial-object suppression over each tile's box and a half-size box centred inside it (labels: the "
            "predicted ones; a half box can only be dropped when its prediction agrees with its tile's):",
            md_table(["model", "threshold", "half boxes dropped", "whole-tile boxes dropped"],
                     [[m, th, v["half_boxes_dropped"], v["whole_boxes_dropped"]]
                      for m, r in mosaic.items() for th, v in r["suppression"].items()])]
    cifar = record.get("coco_cifar", {})
    if cifar:
        parts += [
            "## coco_mini boxes of the CIFAR-10 classes (val2017 + train2017, boxes >= 32x32 px, 8 classes: "
            + ", ".join(f"{k} as {v}" if k != v else k for k, v in COCO_CIFAR.items()) + ")",
            md_table(["model", "images", "boxes", "top-1", "top-5", "val2017 top-1 (boxes)",
                      "train2017 top-1 (boxes)", "wall s", "s / box"],
                     [[m, r["images"], r["boxes"], r["top1"], r["top5"],
                       f"{r['splits']['val2017']['top1']:.3f} ({r['splits']['val2017']['boxes']})",
                       f"{r['splits']['train2017']['top1']:.3f} ({r['splits']['train2017']['boxes']})",
                       r["wall_s"], r["s_per_box"]] for m, r in cifar.items()]),
            "Chance is 1/8 = 0.125. The signal models saw 32-px CIFAR-10 photos only: a COCO box is a real photo "
            "crop, resized to 32 px, often cut through by other objects."]
    notes = record.get("weights", {})
    if notes:
        parts.append("Models:\n\n" + "\n".join(f"- {m}: {note}" for m, note in notes.items()))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="coco,mosaic,coco-cifar")
    parser.add_argument("--models", default="recipe:cifar10-signal", help="comma-separated signal models")
    parser.add_argument("--coco-model", default="ViT-B-32:random")
    parser.add_argument("--coco-images", type=int, default=20)
    parser.add_argument("--mosaics", type=int, default=200)
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    args = parser.parse_args()
    name = NAME + ("_quick" if args.quick else "")
    path = RESULTS_DIR / f"{name}.json"
    if args.render:
        record = json.loads(path.read_text())
        write_results(name, record, render(record))
        return
    if args.quick:
        args.coco_images, args.mosaics = 3, 10
    record = header(NAME, __doc__.splitlines()[0], args.quick)
    if path.is_file():
        old = json.loads(path.read_text())
        record.update({k: old[k] for k in ("coco", "mosaic", "coco_cifar", "weights", "runs") if k in old})
    record.setdefault("runs", []).append({"command": record["command"], "started": record["started"],
                                          "git": record["git"]})
    parts = args.parts.split(",")
    if "coco" in parts:
        log(f"coco_mini val2017: {args.coco_images} images, {args.coco_model}")
        backbone, note = load(args.coco_model)
        coco = box_accuracy(backbone, DATA_ROOT / "coco_mini" / "instances_val2017.json",
                            max_images=args.coco_images)
        record["coco"] = dict(coco, model=args.coco_model, weights=note)
        log(f"coco: {record['coco']}")
    for spec in args.models.split(",") if {"mosaic", "coco-cifar"} & set(parts) else []:
        backbone, note = load(spec)
        record.setdefault("weights", {})[spec] = note
        if "mosaic" in parts:
            record.setdefault("mosaic", {})[spec] = mosaic_part(backbone, args.mosaics)
            log(f"mosaic {spec}: {record['mosaic'][spec]}")
        if "coco-cifar" in parts:
            record.setdefault("coco_cifar", {})[spec] = coco_cifar_part(backbone)
            log(f"coco-cifar {spec}: {record['coco_cifar'][spec]}")
    write_results(name, record, render(record))


if __name__ == "__main__":
    main()
