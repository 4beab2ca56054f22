"""Augmented views of training images, embedded through the same cache as plain images.

Few-shot methods (Tip-Adapter's cache keys, Tip-Adapter-F, GDA) and prompt learners embed several
randomly augmented views of each training image. A view is a dataset item of its own, keyed in the
cache by (image identity, augmentation, view index, seed), so views resume like plain embedding and a
second run recomputes nothing. The crop of view ``v`` of item ``i`` is drawn from a generator seeded
with (seed, v, i): the same seed gives the same pixels in any order, with any number of workers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.base import ImageDataset
from .values import ImageFeatures

DEFAULT_VIEWS = 10


@dataclass(frozen=True)
class Augmentation:
    """Random resized crop (area ``scale``, aspect 3/4..4/3, bicubic) to ``size`` px, then a horizontal flip
    with probability 1/2: the train transform of CoOp, Tip-Adapter and GDA's code."""

    size: int = 224
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    @property
    def id(self) -> str:
        return f"rrc{self.size}-s{self.scale[0]:g}-{self.scale[1]:g}-r{self.ratio[0]:.4g}-{self.ratio[1]:.4g}" + (
            "-flip" if self.flip else "")

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        width, height = image.size
        area = width * height
        box = (0, 0, width, height)  # fallback after 10 misses, as torchvision: the central crop
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = float(np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1]))))
            w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                box = (left, top, left + w, top + h)
                break
        else:
            side = min(width, height)
            box = ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
        out = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out


class AugmentedViews(ImageDataset):
    """``views`` augmented copies of every item of ``dataset``: item ``v * n + i`` is view ``v`` of item ``i``."""

    def __init__(self, dataset: ImageDataset, views: int = DEFAULT_VIEWS, seed: int = 0,
                 augmentation: Augmentation | None = None):
        self.dataset, self.views, self.seed = dataset, views, seed
        self.augmentation = augmentation or Augmentation()
        self.labels = np.tile(dataset.labels, views)
        self.class_names = dataset.class_names
        self.name = dataset.name
        self.split, self.split_info = dataset.split, dataset.split_info

    def _split(self, index: int) -> tuple[int, int]:
        return divmod(index, len(self.dataset))

    def item_id(self, index: int) -> str:
        view, item = self._split(index)
        return f"{self.dataset.item_id(item)}#view{view}"

    def identity(self, index: int) -> str:
        view, item = self._split(index)
        return f"{self.dataset.identity(item)}#{self.augmentation.id}:seed{self.seed}:view{view}"

    def load_image(self, index: int) -> Image.Image:
        view, item = self._split(index)
        key = hashlib.sha256(f"{self.seed}|{view}|{self.dataset.identity(item)}".encode("utf-8", "surrogatepass"))
        rng = np.random.default_rng(int.from_bytes(key.digest()[:8], "little"))
        return self.augmentation(self.dataset.load_image(item), rng)


def stack_views(features: ImageFeatures, views: int) -> np.ndarray:
    """Features of ``AugmentedViews`` as (views, n, d), rows aligned with the base dataset's items.

    Every view of an item must be present (an image that failed to decode fails in every view).
    """
    n = len(features.indices) // views
    if n * views != len(features.indices):
        raise ValueError(f"{len(features.indices)} view rows are not {views} views of the same items")
    order = np.argsort(features.indices, kind="stable")
    stacked = np.asarray(features.features)[order].reshape(views, n, -1)
    return stacked


def view_base_ids(features: ImageFeatures, views: int) -> list[str]:
    """The base item ids of the rows of :func:`stack_views` (view 0's ids without the view tag)."""
    order = np.argsort(features.indices, kind="stable")
    return [features.item_ids[i].rsplit("#view", 1)[0] for i in order[: len(order) // views]]
