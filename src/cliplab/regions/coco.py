"""Box-level accuracy on COCO instance annotations with ground-truth boxes (coco_mini).

Each non-crowd annotation's box (clipped to its image; boxes under ``min_area`` px² skipped) is cropped, embedded
and classified zero-shot over the file's category names; accuracy is the share of boxes whose top label (and
top-5) is the annotated category. The annotation file is read with pycocotools as ``data/segmentation.py`` does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..data.images import load_image
from ..data.segmentation import _pycocotools, _quiet
from ..errors import DatasetError
from ..features.text import class_weights
from ..models.backbone import Backbone
from .scoring import category_probabilities, embed_boxes


def coco_boxes(annotations: str | Path, images_dir: str | Path | None = None, *, min_area: float = 0.0,
               max_images: int | None = None, categories: Mapping[str, str] | None = None,
               ) -> tuple[list[str], list[tuple[Path, np.ndarray, np.ndarray]]]:
    """(category names, [(image path, boxes (n, 4), category indices (n,))]) for images that exist and have boxes.

    ``categories`` maps COCO category names to the names returned (and prompted), in its order; boxes of the
    other categories are left out (default: every category of the file, by id, under its own name)."""
    annotations = Path(annotations)
    if not annotations.is_file():
        raise DatasetError(f"COCO annotation file not found: {annotations}")
    coco = _quiet(_pycocotools(), annotations)
    part = annotations.stem.removeprefix("instances_")
    images_dir = Path(images_dir) if images_dir is not None else annotations.parent / "images" / part
    cats = sorted(coco.cats.values(), key=lambda c: c["id"])
    if categories is not None:
        by_name = {str(c["name"]): c for c in cats}
        unknown = [name for name in categories if name not in by_name]
        if unknown:
            raise DatasetError(f"{annotations}: no category named {unknown[0]!r}")
        cats = [dict(by_name[name], name=prompt) for name, prompt in categories.items()]
    index = {int(c["id"]): i for i, c in enumerate(cats)}
    items = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        path = images_dir / info["file_name"]
        anns = [a for a in coco.imgToAnns.get(image_id, [])
                if not a.get("iscrowd", 0) and int(a["category_id"]) in index]
        boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        if not path.is_file() or not len(boxes):
            continue
        x0 = np.clip(boxes[:, 0], 0, info["width"])
        y0 = np.clip(boxes[:, 1], 0, info["height"])
        x1 = np.clip(boxes[:, 0] + boxes[:, 2], 0, info["width"])
        y1 = np.clip(boxes[:, 1] + boxes[:, 3], 0, info["height"])
        clipped = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
        keep = (clipped[:, 2] * clipped[:, 3] > max(min_area, 0.0)) & (clipped[:, 2] >= 1) & (clipped[:, 3] >= 1)
        if keep.any():
            items.append((path, clipped[keep], np.asarray([index[int(a["category_id"])] for a in anns])[keep]))
        if max_images is not None and len(items) >= max_images:
            break
    if not items:
        raise DatasetError(f"{annotations}: no image with boxes found under {images_dir}")
    return [str(c["name"]) for c in cats], items


def box_accuracy(backbone: Backbone, annotations: str | Path, *, images_dir: str | Path | None = None,
                 templates: str | Sequence[str] = "imagenet7", min_area: float = 0.0,
                 max_images: int | None = None, cache_dir: str | Path | None = None,
                 categories: Mapping[str, str] | None = None) -> dict:
    """Zero-shot top-1/top-5 accuracy of ground-truth boxes over the annotation file's categories (or
    ``categories``, as in :func:`coco_boxes`), with wall and CPU seconds (per box too)."""
    start, cpu = time.perf_counter(), time.process_time()
    names, items = coco_boxes(annotations, images_dir, min_area=min_area, max_images=max_images,
                              categories=categories)
    weights = class_weights(backbone, names, templates, cache_dir=cache_dir)
    truth, probs = [], []
    for path, boxes, cats in items:
        probs.append(category_probabilities(embed_boxes(backbone, load_image(path), boxes), weights,
                                            backbone.logit_scale))
        truth.append(cats)
    p, y = np.concatenate(probs), np.concatenate(truth)
    top5 = np.argsort(-p, axis=1)[:, :5]
    wall = time.perf_counter() - start
    return {"images": len(items), "boxes": int(len(y)), "classes": len(names), "class_names": names,
            "top1": float((p.argmax(axis=1) == y).mean()), "top5": float((top5 == y[:, None]).any(axis=1).mean()),
            "wall_s": wall, "cpu_s": time.process_time() - cpu, "s_per_box": wall / len(y)}
