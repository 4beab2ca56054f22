"""Semantic segmentation metrics with mmseg's definitions, and the evaluation of any dense method on a set.

Metrics (open-mmlab/mmsegmentation ``intersect_and_union`` / ``total_intersect_and_union`` /
``total_area_to_metrics``): per image, pixels whose truth is ``ignore_index`` are dropped; the intersection counts
pixels where prediction equals truth, per class; the prediction and truth areas count each class (values outside
``0..C-1`` count nowhere, as ``torch.histc`` drops them); union = prediction + truth - intersection. The areas are
summed over the images, then IoU = intersection / union per class (NaN where the union is empty), mIoU = the
NaN-ignoring mean of IoU (mmseg's ``np.nanmean``), per-class accuracy = intersection / truth area, mAcc its
NaN-ignoring mean, and pixel accuracy (aAcc) = total intersection / total truth area.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CliplabError


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(intersection, union, prediction area, truth area) per class for one image (mmseg's definition), int64."""
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise CliplabError(f"prediction {pred.shape} and truth {label.shape} differ in size")
    keep = label != ignore_index
    pred, label = pred[keep].astype(np.int64), label[keep].astype(np.int64)

    def hist(values: np.ndarray) -> np.ndarray:
        values = values[(values >= 0) & (values < num_classes)]
        return np.bincount(values, minlength=num_classes)

    area_intersect = hist(pred[pred == label])
    area_pred, area_label = hist(pred), hist(label)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def total_intersect_and_union(preds: Iterable[np.ndarray], labels: Iterable[np.ndarray], num_classes: int,
                              ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four areas of :func:`intersect_and_union` summed over images."""
    totals = [np.zeros(num_classes, dtype=np.int64) for _ in range(4)]
    for pred, label in zip(preds, labels, strict=True):
        for total, part in zip(totals, intersect_and_union(pred, label, num_classes, ignore_index)):
            total += part
    return tuple(totals)


@dataclass
class SegmentationMetrics:
    """mIoU, mAcc, pixel accuracy (aAcc) and per-class IoU/accuracy (NaN where undefined), from summed areas."""

    iou: np.ndarray
    acc: np.ndarray
    miou: float
    macc: float
    aacc: float
    area_intersect: np.ndarray
    area_union: np.ndarray
    area_pred: np.ndarray
    area_label: np.ndarray

    @classmethod
    def from_areas(cls, intersect, union, pred, label) -> SegmentationMetrics:
        intersect, union = np.asarray(intersect, float), np.asarray(union, float)
        label = np.asarray(label, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = intersect / union
            acc = intersect / label
            aacc = float(intersect.sum() / label.sum()) if label.sum() else float("nan")
        return cls(iou, acc, _nanmean(iou), _nanmean(acc), aacc, intersect.astype(np.int64),
                   union.astype(np.int64), np.asarray(pred, np.int64), label.astype(np.int64))

    def as_dict(self, class_names: list[str]) -> dict:
        def num(x):
            return None if np.isnan(x) else float(x)

        return {"mIoU": num(self.miou), "mAcc": num(self.macc), "aAcc": num(self.aacc),
                "per_class": {name: {"IoU": num(self.iou[i]), "Acc": num(self.acc[i]),
                                     "truth_pixels": int(self.area_label[i]), "pred_pixels": int(self.area_pred[i])}
                              for i, name in enumerate(class_names)}}


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def segmentation_metrics(preds, labels, num_classes: int, ignore_index: int = 255) -> SegmentationMetrics:
    """Metrics of predictions against truth maps (module docstring)."""
    return SegmentationMetrics.from_areas(*total_intersect_and_union(preds, labels, num_classes, ignore_index))


@dataclass
class SegmentationRun:
    """What :func:`evaluate_segmentation` returns: the metrics, timing and where the files went."""

    metrics: SegmentationMetrics
    record: dict
    json_path: Path | None
    grid_path: Path | None


def evaluate_segmentation(backbone, dataset, method: str, *, params: dict | None = None, settings=None,
                          templates=None, limit: int | None = None, output_dir: Path | None = None,
                          grid_items: int = 4, cache_dir=None, progress: bool = False, guidance=None,
                          synonyms=None) -> SegmentationRun:
    """Segment the first ``limit`` items (all by default) of a ``SegmentationDataset`` with the dense ``method`` and
    score them; writes ``segment_<method>_<dataset>_<split>.json`` and a PNG grid of image / truth / prediction
    for the first ``grid_items`` items when ``output_dir`` is given. ``guidance``: a guidance encoder for methods
    that declare one (``cliplab.dense.guidance``); ``synonyms`` (``{class: [names]}``): GKC's synonym classifier
    as the text weights (``cliplab.dense.gkc``; the files then end in ``_synonyms``)."""
    from ..dense.inference import Segmenter, SegmentSettings

    settings = settings or SegmentSettings()
    if settings.short_side is None and not settings.keep_size:
        from dataclasses import replace

        settings = replace(settings, short_side=dataset.default_short_side,
                           keep_size=dataset.default_short_side is None)
    templates = templates or _default_templates(dataset)
    started = time.perf_counter()
    segmenter = Segmenter(backbone, method, dataset.class_names, templates=templates, params=params,
                          settings=settings, background_index=dataset.background_index, guidance=guidance,
                          cache_dir=cache_dir, synonyms=synonyms)
    setup_s = time.perf_counter() - started
    count = len(dataset) if limit is None else min(limit, len(dataset))
    num_classes = len(dataset.class_names)
    totals = [np.zeros(num_classes, dtype=np.int64) for _ in range(4)]
    shown: list[tuple] = []
    wall = cpu = 0.0
    windows = 0
    items = range(count)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"segment {method}", unit="image")
    for i in items:
        image, truth = dataset.load_image(i), dataset.load_mask(i)
        t0, c0 = time.perf_counter(), time.process_time()
        result = segmenter.segment(image)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        windows += result.windows
        for total, part in zip(totals, intersect_and_union(result.labels, truth, num_classes, dataset.ignore_index)):
            total += part
        if len(shown) < grid_items:
            shown.append((dataset.item_id(i), np.asarray(image), truth, result.labels))
    metrics = SegmentationMetrics.from_areas(*totals)
    weights = "random" if getattr(backbone.info, "random_weights", False) else "pretrained"
    record = {"task": "segmentation", "method": method, "params": segmenter.method.get_params(),
              "dataset": dataset.name, "split": dataset.split, "items": count,
              "model": backbone.display_name, "model_id": backbone.model_id, "weights": weights,
              "templates": templates if isinstance(templates, str) else list(templates),
              "synonyms": {k: list(v) for k, v in synonyms.items() if v} if synonyms else None,
              "settings": {"short_side": settings.short_side, "keep_size": settings.keep_size,
                           "stride": segmenter.stride, "window": list(segmenter.tower.image_size),
                           "background_threshold": settings.background_threshold},
              "background_index": dataset.background_index, "ignore_index": dataset.ignore_index,
              **metrics.as_dict(dataset.class_names),
              "timing": {"setup_s": setup_s, "wall_s": wall, "cpu_s": cpu,
                         "s_per_image": wall / max(count, 1), "windows": windows}}
    json_path = grid_path = None
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        stem = f"segment_{method}_{dataset.name}_{dataset.split}" + ("_synonyms" if synonyms else "")
        json_path = output_dir / f"{stem}.json"
        json_path.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
        if shown:
            title = f"{method} · {dataset.name} {dataset.split} · {backbone.display_name}" + (
                " · random weights" if weights == "random" else "")
            grid_path = plot_grid(shown, dataset.class_names, dataset.ignore_index, output_dir / f"{stem}.png", title)
    return SegmentationRun(metrics, record, json_path, grid_path)


def _default_templates(dataset) -> str:
    return "cifar10" if dataset.name == "mosaic" else "imagenet"


def palette(count: int) -> np.ndarray:
    """``count`` distinct RGB colours (uint8), the first black-free and stable for a given index."""
    import colorsys

    golden = 0.618033988749895
    colours = [colorsys.hsv_to_rgb((i * golden) % 1.0, 0.65 + 0.35 * ((i // 7) % 2), 0.95 - 0.25 * ((i // 3) % 2))
               for i in range(count)]
    return (np.asarray(colours).reshape(-1, 3) * 255).astype(np.uint8)


def colourise(labels: np.ndarray, count: int, ignore_index: int | None = None) -> np.ndarray:
    """(H, W) indices -> (H, W, 3) colours; ``ignore_index`` (and anything out of range) is black."""
    colours = np.concatenate([palette(count), np.zeros((1, 3), np.uint8)])
    idx = labels.astype(np.int64)
    idx[(idx < 0) | (idx >= count)] = count
    if ignore_index is not None:
        idx[labels == ignore_index] = count
    return colours[idx]


def plot_grid(rows: list[tuple], class_names: list[str], ignore_index: int, path: Path, title: str) -> Path:
    """A PNG with one row per item: image, truth and prediction (colours per class, a legend of those shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    present: set[int] = set()
    for r, (item, image, truth, pred) in enumerate(rows):
        for c, (panel, name) in enumerate(((image, str(item)), (colourise(truth, len(class_names), ignore_index),
                                                                 "truth"),
                                           (colourise(pred, len(class_names)), "prediction"))):
            axes[r, c].imshow(panel)
            axes[r, c].set_title(name if len(name) <= 40 else "…" + name[-39:], fontsize=8)
            axes[r, c].axis("off")
        present |= {int(v) for v in np.unique(truth) if v != ignore_index} | {int(v) for v in np.unique(pred)}
    colours = palette(len(class_names)) / 255.0
    handles = [Patch(color=colours[i], label=class_names[i]) for i in sorted(present) if i < len(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(5, max(1, len(handles))), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
