"""Seeded counting scenes: N CIFAR-10 objects pasted on DTD textures, with exact point annotations.

Each scene is a ``size`` x ``size`` RGB image: a random crop of one DTD texture (``dtd_sample``) resized to the
scene, then ``N`` CIFAR-10 images, each resized to a square of ``object_min``..``object_max`` pixels, pasted at
random positions (a position is redrawn, up to 100 times, while its centre lies closer than ``min_gap`` times the
object's side to an earlier centre; after that it is kept). ``N`` is drawn uniformly from
``min_count``..``max_count`` (0 to 50 by default). The point of an object is its square's centre ``(x, y)`` in
pixels; its class is the CIFAR-10 label.

Scene ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split code, i])``, so any scene is rebuilt
alone and identically. The splits come from disjoint source images: ``test`` pastes CIFAR-10 test images on the
odd-numbered DTD images of each texture class (positions 1, 3, ... within the class in ``labels.json`` order),
``train`` pastes CIFAR-10 train images (the named ``cifar10`` train split) on the even-numbered ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DatasetError

SPLITS = ("test", "train")


@dataclass(frozen=True)
class CountingSpec:
    """How scenes are drawn: ``count`` scenes of ``size`` px, ``min_count``..``max_count`` objects each, object
    sides ``object_min``..``object_max`` px, drawn with ``seed``."""

    count: int = 100
    size: int = 192
    min_count: int = 0
    max_count: int = 50
    object_min: int = 14
    object_max: int = 20
    min_gap: float = 0.75
    seed: int = 0

    def __post_init__(self):
        if self.count < 1 or self.size < 8:
            raise DatasetError(f"counting scenes need count >= 1 and size >= 8; got count={self.count}, "
                               f"size={self.size}")
        if not 0 <= self.min_count <= self.max_count:
            raise DatasetError(f"counting scenes need 0 <= min_count <= max_count; got {self.min_count}, "
                               f"{self.max_count}")
        if not 1 <= self.object_min <= self.object_max <= self.size:
            raise DatasetError(f"counting scenes need 1 <= object_min <= object_max <= size; got {self.object_min}, "
                               f"{self.object_max}, {self.size}")


@dataclass(frozen=True)
class CountingScene:
    """One scene: the image, object centres ``points`` (n, 2) as (x, y) pixels, their CIFAR-10 ``labels``."""

    image: Image.Image
    points: np.ndarray
    labels: np.ndarray
    texture: str

    @property
    def count(self) -> int:
        return int(len(self.points))


class CountingScenes:
    """``count`` seeded scenes of one split (module docstring); ``scenes[i]`` builds scene ``i``."""

    def __init__(self, objects, textures: list[tuple[Path, str]], split: str = "test",
                 spec: CountingSpec = CountingSpec()):
        if split not in SPLITS:
            raise DatasetError(f"counting scenes have the splits {', '.join(SPLITS)}; got {split!r}")
        if not textures or len(objects) == 0:
            raise DatasetError("counting scenes need at least one texture and one object image")
        self.objects, self.textures, self.split, self.spec = objects, textures, split, spec
        self.name = "counting"
        self.object_labels = np.asarray(objects.labels)

    def __len__(self) -> int:
        return self.spec.count

    def item_id(self, index: int) -> str:
        return f"counting-{self.split}-s{self.spec.seed}#{index}"

    def counts(self) -> np.ndarray:
        """The true count of every scene (cheap: the draws only, no image is built)."""
        return np.array([self._draw_count(self._rng(i)) for i in range(len(self))])

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed, SPLITS.index(self.split), index])

    def _draw_count(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.spec.min_count, self.spec.max_count + 1))

    def __getitem__(self, index: int) -> CountingScene:
        if not 0 <= index < len(self):
            raise IndexError(index)
        spec, rng = self.spec, self._rng(index)
        n = self._draw_count(rng)
        path, texture = self.textures[int(rng.integers(len(self.textures)))]
        canvas = _texture_crop(path, spec.size, rng)
        centres, labels = [], []
        for _ in range(n):
            side = int(rng.integers(spec.object_min, spec.object_max + 1))
            for _attempt in range(100):
                left, top = (int(v) for v in rng.integers(0, spec.size - side + 1, size=2))
                centre = (left + side / 2, top + side / 2)
                if all((centre[0] - x) ** 2 + (centre[1] - y) ** 2 >= (spec.min_gap * side) ** 2 for x, y in centres):
                    break
            item = int(rng.integers(len(self.objects)))
            patch = self.objects.load_image(item).convert("RGB").resize((side, side), Image.BICUBIC)
            canvas.paste(patch, (left, top))
            centres.append(centre)
            labels.append(int(self.object_labels[item]))
        points = np.asarray(centres, dtype=np.float32).reshape(-1, 2)
        return CountingScene(canvas, points, np.asarray(labels, dtype=np.int64), texture)

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, **{k: getattr(self.spec, k) for k in
                                                          self.spec.__dataclass_fields__},
                "textures": len(self.textures), "object_images": len(self.objects)}


def _texture_crop(path: Path, size: int, rng: np.random.Generator) -> Image.Image:
    texture = Image.open(path).convert("RGB")
    width, height = texture.size
    side = min(width, height)
    crop = int(rng.integers(max(1, side // 2), side + 1))
    left, top = int(rng.integers(0, width - crop + 1)), int(rng.integers(0, height - crop + 1))
    return texture.crop((left, top, left + crop, top + crop)).resize((size, size), Image.BICUBIC)


def split_textures(rows: list[tuple[Path, str]], split: str) -> list[tuple[Path, str]]:
    """The textures of ``split``: within each class (rows in their file order), even positions for train, odd
    positions for test."""
    seen: dict[str, int] = {}
    out = []
    for path, name in rows:
        position = seen.get(name, 0)
        seen[name] = position + 1
        if position % 2 == (0 if split == "train" else 1):
            out.append((path, name))
    return out


def block_counts(points: np.ndarray, height: int, width: int, block: int) -> np.ndarray:
    """Objects per ``block`` x ``block`` cell: (ceil(height/block), ceil(width/block)) counts of the points
    (x, y) whose cell is (floor(y/block), floor(x/block)), points on the far edge kept in the last cell."""
    rows, cols = -(-height // block), -(-width // block)
    out = np.zeros((rows, cols), dtype=np.float32)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(points):
        r = np.clip(np.floor(points[:, 1] / block).astype(int), 0, rows - 1)
        c = np.clip(np.floor(points[:, 0] / block).astype(int), 0, cols - 1)
        np.add.at(out, (r, c), 1.0)
    return out


def load_counting_scenes(root: str | Path | None = None, split: str = "test",
                         spec: CountingSpec = CountingSpec()) -> CountingScenes:
    """Counting scenes of ``split`` (test | train) from CIFAR-10 and ``dtd_sample`` under the data root."""
    import json

    from .registry import default_data_root, load_dataset

    if split not in SPLITS:
        raise DatasetError(f"counting scenes have the splits {', '.join(SPLITS)}; got {split!r}")
    base = Path(root) if root is not None else default_data_root()
    manifest = base / "dtd_sample" / "labels.json"
    try:
        rows = json.loads(manifest.read_text())["images"]
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"{manifest}: cannot read the DTD textures ({exc})") from exc
    textures = [(manifest.parent / row["image"], str(row["class_name"])) for row in rows]
    objects = load_dataset("cifar10", root=base, split=split)
    return CountingScenes(objects, split_textures(textures, split), split, spec)
