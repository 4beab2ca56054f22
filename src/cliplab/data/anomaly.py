"""Seeded synthetic anomaly images with exact masks: DTD textures with pasted defects (issue 27, Bayes-PFL's data).

Two splits, built from the ``dtd_sample`` textures under the data root (``labels.json``):

- ``test``: textures of :data:`TEST_TEXTURES` with the test defects :data:`TEST_DEFECTS`: ``cutpaste`` (a
  rectangle cut from a texture of another class of the same split), ``scratch`` (thin random polylines in one
  contrasting colour), ``blotch`` (a union of ellipses blended with one colour, alpha 0.75);
- ``aux``: the auxiliary training split of zero-shot anomaly detection (Bayes-PFL trains on it), textures of
  :data:`AUX_TEXTURES` (other classes: no source image is shared with ``test``) and its own defect types
  :data:`AUX_DEFECTS`, none a test defect: ``polygon`` (a random filled polygon of one colour), ``noise``
  (uniform noise in a rectangle), ``invert`` (the colours of an ellipse inverted, 255 - x).

Every source image gives ``per_source`` square crops (seeded position and side, resized to ``size``); each crop is
defective with probability ``anomaly_ratio``, its defect type taken in turn from the split's types. A defect is
drawn as a boolean mask first and the image changed only there (``np.where(mask, defect, clean)``), so the mask
is exact: pixels outside it equal the clean crop (tested). Everything is drawn from ``numpy`` generators seeded by
``(seed, split, item)``: the same arguments give the same images, bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DatasetError

DTD_FOLDER = "dtd_sample"
AUX_TEXTURES = ("banded", "blotchy", "braided", "bubbly", "bumpy")
TEST_TEXTURES = ("chequered", "cobwebbed", "cracked", "crosshatched", "crystalline")
TEST_DEFECTS = ("cutpaste", "scratch", "blotch")
AUX_DEFECTS = ("polygon", "noise", "invert")
SPLITS = {"test": (TEST_TEXTURES, TEST_DEFECTS), "aux": (AUX_TEXTURES, AUX_DEFECTS)}
_SPLIT_SEED = {"test": 1, "aux": 2}


@dataclass(frozen=True)
class AnomalySample:
    """One image: RGB ``image`` (H, W, 3) uint8, exact defect ``mask`` (H, W) bool, ``label`` 1 if defective,
    ``defect`` type ("" for a normal image), ``texture`` class and ``source`` file of the clean crop."""

    image: np.ndarray
    mask: np.ndarray
    label: int
    defect: str
    texture: str
    source: str
    clean: np.ndarray = field(repr=False, compare=False)

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


@dataclass(frozen=True)
class AnomalySet:
    """A split of synthetic anomaly images (see the module docstring)."""

    split: str
    samples: tuple[AnomalySample, ...]
    size: int
    seed: int

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def masks(self) -> np.ndarray:
        """(n, size, size) bool."""
        return np.stack([s.mask for s in self.samples]) if self.samples else np.zeros((0, self.size, self.size), bool)

    @property
    def defects(self) -> set[str]:
        return {s.defect for s in self.samples if s.defect}

    @property
    def sources(self) -> set[str]:
        return {s.source for s in self.samples}

    def images(self) -> list[Image.Image]:
        return [s.pil() for s in self.samples]


def _texture_rows(root: Path, textures: Sequence[str]) -> list[tuple[str, str]]:
    folder = root / DTD_FOLDER
    labels = folder / "labels.json"
    if not labels.is_file():
        raise DatasetError(f"anomaly images need the DTD textures: {labels} not found (pass --data-root or set "
                           "CLIPLAB_DATA)")
    rows = json.loads(labels.read_text(encoding="utf-8"))["images"]
    chosen = [(str(folder / r["image"]), r["class_name"]) for r in rows if r["class_name"] in textures]
    if not chosen:
        raise DatasetError(f"{labels} holds none of the textures {', '.join(textures)}")
    return sorted(chosen)


def _crop(path: str, size: int, rng: np.random.Generator) -> np.ndarray:
    with Image.open(path) as img:
        image = img.convert("RGB")
    width, height = image.size
    side = int(min(width, height) * rng.uniform(0.6, 1.0))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    crop = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return np.asarray(crop, dtype=np.uint8).copy()


def _contrast(clean: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour far from the masked region's mean (its complement, jittered)."""
    mean = clean[mask].mean(axis=0) if mask.any() else clean.reshape(-1, 3).mean(axis=0)
    colour = 255.0 - mean + rng.uniform(-20, 20, size=3)
    far = np.abs(colour - mean) < 60  # a mid-grey region: push the channel to an extreme instead
    colour[far] = np.where(mean[far] < 128, 255.0, 0.0)
    return np.clip(colour, 0, 255)


def _box(size: int, rng: np.random.Generator, low: float = 0.1, high: float = 0.25) -> tuple[int, int, int, int]:
    h = max(2, int(size * rng.uniform(low, high)))
    w = max(2, int(size * rng.uniform(low, high)))
    top = int(rng.integers(0, size - h + 1))
    left = int(rng.integers(0, size - w + 1))
    return top, left, h, w


def _mask_from_draw(size: int, draw) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 127


def _defect(kind: str, clean: np.ndarray, rng: np.random.Generator, donor: np.ndarray | None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) with defect ``kind`` drawn on ``clean``."""
    size = clean.shape[0]
    out = clean.astype(np.float64)
    if kind == "cutpaste":
        top, left, h, w = _box(size, rng)
        src_top, src_left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        mask = np.zeros((size, size), bool)
        mask[top:top + h, left:left + w] = True
        patch = np.zeros_like(out)
        patch[top:top + h, left:left + w] = donor[src_top:src_top + h, src_left:src_left + w]
        out = np.where(mask[..., None], patch, out)
    elif kind == "scratch":
        width = max(1, round(size / 80))

        def draw(d):
            for _ in range(int(rng.integers(1, 4))):
                x, y = rng.uniform(0, size, size=2)
                points = [(x, y)]
                angle = rng.uniform(0, 2 * np.pi)
                for _ in range(int(rng.integers(2, 5))):
                    angle += rng.uniform(-0.6, 0.6)
                    step = size * rng.uniform(0.08, 0.2)
                    x, y = x + step * np.cos(angle), y + step * np.sin(angle)
                    points.append((x, y))
                d.line(points, fill=255, width=width)

        mask = _mask_from_draw(size, draw)
        out = np.where(mask[..., None], _contrast(clean, mask, rng), out)
    elif kind == "blotch":
        cy, cx = rng.uniform(size * 0.15, size * 0.85, size=2)

        def draw(d):
            for _ in range(int(rng.integers(2, 5))):
                ry, rx = size * rng.uniform(0.04, 0.1, size=2)
                oy, ox = size * rng.uniform(-0.06, 0.06, size=2)
                d.ellipse((cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry), fill=255)

        mask = _mask_from_draw(size, draw)
        colour = _contrast(clean, mask, rng)
        out = np.where(mask[..., None], 0.25 * out + 0.75 * colour, out)
    elif kind == "polygon":
        cy, cx = rng.uniform(size * 0.2, size * 0.8, size=2)
        n = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        radii = size * rng.uniform(0.05, 0.14, size=n)
        points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)]
        mask = _mask_from_draw(size, lambda d: d.polygon(points, fill=255))
        out = np.where(mask[..., None], rng.uniform(0, 255, size=3), out)
    elif kind == "noise":
        top, left, h, w = _box(size, rng)
        mask = np.zeros((size, size), bool)
        mask[top:top + h, left:left + w] = True
        out = np.where(mask[..., None], rng.uniform(0, 255, size=out.shape), out)
    elif kind == "invert":
        cy, cx = rng.uniform(size * 0.2, size * 0.8, size=2)
        ry, rx = size * rng.uniform(0.06, 0.14, size=2)
        mask = _mask_from_draw(size, lambda d: d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255))
        out = np.where(mask[..., None], 255.0 - out, out)
    else:
        raise DatasetError(f"unknown defect type {kind!r}")
    image = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return image, mask


def anomaly_set(split: str = "test", *, root: str | Path | None = None, size: int = 224, per_source: int = 2,
                anomaly_ratio: float = 0.5, seed: int = 0, limit: int | None = None) -> AnomalySet:
    """The ``split`` ("test" or "aux") of seeded anomaly images (module docstring): ``per_source`` crops of
    ``size`` pixels per DTD image, each defective with probability ``anomaly_ratio``; ``limit`` keeps the first
    source images (a small set for tests)."""
    if split not in SPLITS:
        raise DatasetError(f"anomaly split must be one of {', '.join(SPLITS)}; got {split!r}")
    if not isinstance(size, int) or size < 16:
        raise DatasetError(f"anomaly image size must be an integer of at least 16 pixels; got {size!r}")
    if per_source < 1 or not 0.0 <= anomaly_ratio <= 1.0:
        raise DatasetError("per_source must be at least 1 and anomaly_ratio within [0, 1]")
    from .registry import default_data_root

    textures, defects = SPLITS[split]
    rows = _texture_rows(Path(root) if root is not None else default_data_root(), textures)
    if limit is not None:
        # keep whole classes balanced: the first images of every texture in turn
        by_class = {t: [r for r in rows if r[1] == t] for t in textures}
        rows = sorted(r for t in textures for r in by_class[t][:max(1, -(-limit // len(textures)))])[:limit]
    samples = []
    turn = 0
    for index, (path, texture) in enumerate(rows):
        for k in range(per_source):
            rng = np.random.default_rng([seed, _SPLIT_SEED[split], index, k])
            clean = _crop(path, size, rng)
            if rng.uniform() < anomaly_ratio:
                kind = defects[turn % len(defects)]
                turn += 1
                donor = None
                if kind == "cutpaste":
                    others = [r for r in rows if r[1] != texture] or [r for r in rows if r[0] != path] or rows
                    donor = _crop(others[int(rng.integers(0, len(others)))][0], size, rng)
                image, mask = _defect(kind, clean, rng, donor)
                if not mask.any():  # a defect clipped away entirely: keep the image normal
                    image, mask, kind = clean, np.zeros((size, size), bool), ""
            else:
                image, mask, kind = clean, np.zeros((size, size), bool), ""
            samples.append(AnomalySample(image=image, mask=mask, label=int(bool(kind)), defect=kind,
                                         texture=texture, source=path, clean=clean))
    return AnomalySet(split=split, samples=tuple(samples), size=size, seed=seed)


def write_anomaly_set(data: AnomalySet, folder: str | Path) -> Path:
    """Write the images (``images/NNNN.png``), masks (``masks/NNNN.png``, 255 = defect) and ``manifest.json``
    (per image: file, mask, label, defect, texture) under ``folder``; returns the manifest path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(data.samples):
        image, mask = f"images/{i:04d}.png", f"masks/{i:04d}.png"
        Image.fromarray(sample.image).save(folder / image)
        Image.fromarray((sample.mask * 255).astype(np.uint8)).save(folder / mask)
        rows.append({"image": image, "mask": mask, "label": sample.label, "defect": sample.defect,
                     "texture": sample.texture})
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"split": data.split, "size": data.size, "seed": data.seed, "images": rows},
                                   indent=1), encoding="utf-8")
    return manifest
