"""Box files: COCO-format ``[x, y, w, h]`` boxes per image, read and checked in one line per problem.

Accepted layouts: a list of boxes (one image), a list of ``{"bbox": [...]}`` records, a mapping of image file
name (or path) to either of those, or a COCO annotation file (``images`` + ``annotations``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import CliplabError


class BoxError(CliplabError, ValueError):
    """A box file or a box that cannot be used (one line)."""


def _as_boxes(value, source: str) -> np.ndarray:
    rows = [item["bbox"] if isinstance(item, dict) and "bbox" in item else item for item in value]
    try:
        boxes = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1) if rows else np.zeros((0, 4))
    except (TypeError, ValueError) as exc:
        raise BoxError(f"{source}: boxes must be [x, y, w, h] lists of numbers") from exc
    if boxes.shape[1] != 4 or not np.isfinite(boxes).all():
        raise BoxError(f"{source}: boxes must be [x, y, w, h] lists of 4 finite numbers")
    return boxes


def read_box_file(path: str | Path) -> dict[str | None, np.ndarray]:
    """Boxes per image name (key None: a bare list meant for a single image); refuses a file without boxes."""
    path = Path(path)
    if not path.is_file():
        raise BoxError(f"box file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise BoxError(f"box file {path} has no boxes")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BoxError(f"box file {path} is not JSON: {exc.msg} (line {exc.lineno})") from exc
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        names = {img["id"]: img["file_name"] for img in data["images"]}
        per: dict[str | None, list] = {name: [] for name in names.values()}
        for ann in data["annotations"]:
            per.setdefault(names.get(ann["image_id"], str(ann["image_id"])), []).append(ann["bbox"])
        out = {name: _as_boxes(rows, f"{path} ({name})") for name, rows in per.items()}
    elif isinstance(data, dict):
        out = {str(name): _as_boxes(rows, f"{path} ({name})") for name, rows in data.items()}
    elif isinstance(data, list):
        out = {None: _as_boxes(data, str(path))}
    else:
        raise BoxError(f"box file {path}: expected a list of [x, y, w, h] boxes or a mapping image -> boxes")
    if not any(len(b) for b in out.values()):
        raise BoxError(f"box file {path} has no boxes")
    return out


def boxes_for_image(boxes: dict[str | None, np.ndarray], image: str | Path, source: str | Path) -> np.ndarray:
    """The boxes of ``image`` (matched by path, then file name; a bare list serves a single image)."""
    image = Path(image)
    for key in (None, str(image), image.name):
        if key in boxes:
            found = boxes[key]
            break
    else:
        found = np.zeros((0, 4))
    if not len(found):
        raise BoxError(f"{image} has no boxes in {source}")
    return found


def check_boxes(boxes: np.ndarray, size: tuple[int, int], image: str | Path = "image") -> np.ndarray:
    """Refuse a box with no area or reaching outside the ``(width, height)`` image (half a pixel of
    rounding allowed, as COCO boxes have); returns the boxes."""
    width, height = size
    for k, (x, y, w, h) in enumerate(np.asarray(boxes, dtype=np.float64)):
        text = f"box {k} [{x:g}, {y:g}, {w:g}, {h:g}]"
        if w <= 0 or h <= 0:
            raise BoxError(f"{text} of {image} has no area (w and h must be > 0)")
        if x < 0 or y < 0 or x + w > width + 0.5 or y + h > height + 0.5:
            raise BoxError(f"{text} lies outside {image} ({width} x {height} px)")
    return np.asarray(boxes, dtype=np.float64)
