"""Seeded ordinal sets for text-driven image ranking (paper 15): real images under increasing severity.

``ordinal_set(property, split)`` draws ``sources`` images of a dataset (CIFAR-10 test by default) with a seeded
generator and shows each at ``levels`` 0..5 of one property: level 0 is the clean image, level k the ImageNet-C
corruption of ``data/corruptions.py`` at severity k (``blur``: ``gaussian_blur``; ``brightness``: ``brightness``).
The target of an item is its level, and the ranking text names the property (``PROPERTIES``). Train and test are
split by source image (a seeded half each by default), so no picture is seen in both.

``numeric_levels(dataset)`` reads ordinal targets from any labelled dataset whose class names are numbers (a
folder with sub-folders ``0/ 1/ 2/``, a manifest with numeric labels).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

from ..errors import CliplabError, DatasetError
from .base import NO_LABEL, ImageDataset
from .corruptions import SEVERITIES, corrupt, corruption_parameter, item_seed

# property -> (corruption, the ranking text)
PROPERTIES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "blur": ("gaussian_blur", "how blurry is the image"),
    "brightness": ("brightness", "how bright is the image"),
})
LEVELS = (0, *SEVERITIES)  # 0: the clean image
SPLITS = ("train", "test", "all")


class OrdinalDataset(ImageDataset):
    """Each of ``base``'s items ``sources`` shown at every level of ``levels`` (source-major order).

    ``targets`` (float) are the levels, ``groups`` the source index of each item (a position in ``base``),
    ``labels`` the level's index in ``levels`` with class names ``"level k"``; ``text`` is the ranking text.
    """

    def __init__(self, base: ImageDataset, sources, prop: str, levels=LEVELS, seed: int = 0, split: str = "all"):
        if prop not in PROPERTIES:
            raise CliplabError(f"unknown ordinal property {prop!r}; choose from {', '.join(PROPERTIES)}")
        levels = tuple(int(k) for k in levels)
        if len(levels) < 2 or len(set(levels)) != len(levels) or sorted(levels) != list(levels):
            raise CliplabError(f"ordinal levels must be two or more increasing integers; got {levels}")
        self.corruption, self.text = PROPERTIES[prop]
        for k in levels:
            if k:
                corruption_parameter(self.corruption, k)
        self.base, self.prop, self.levels, self.seed = base, prop, levels, int(seed)
        self.sources = np.asarray(sources, dtype=np.int64)
        n = len(levels)
        self.groups = np.repeat(self.sources, n)
        self.targets = np.tile(np.asarray(levels, dtype=np.float64), len(self.sources))
        self.labels = np.tile(np.arange(n, dtype=np.int64), len(self.sources))
        self.class_names = [f"level {k}" for k in levels]
        self.name = f"ordinal-{prop}-{base.name}"
        self.split = split
        self.split_info = MappingProxyType({
            "split": split, "source": f"{base.name} {base.split}", "property": prop, "levels": list(levels),
            "sources": len(self.sources), "seed": self.seed,
            "recipe": "sources drawn with numpy default_rng(seed), split by source image"})

    def _where(self, index: int) -> tuple[int, int]:
        source, level = divmod(int(index), len(self.levels))
        return int(self.sources[source]), self.levels[level]

    def item_id(self, index: int) -> str:
        source, level = self._where(index)
        return f"{self.base.item_id(source)}@{self.prop}{level}"

    def identity(self, index: int) -> str:
        source, level = self._where(index)
        base = self.base.identity(source)
        return base if level == 0 else f"{base}|ordinal-v1:{self.corruption}:{level}:seed{self.seed}"

    def load_image(self, index: int) -> Image.Image:
        source, level = self._where(index)
        image = self.base.load_image(source).convert("RGB")
        if level == 0:
            return image
        return corrupt(image, self.corruption, level, item_seed(self.seed, self.base.identity(source)))


def split_sources(count: int, total: int, seed: int = 0, test_fraction: float = 0.5) -> dict[str, np.ndarray]:
    """``count`` distinct positions of ``total`` drawn with ``default_rng(seed)``, split into train and test."""
    if not 0 < test_fraction < 1:
        raise CliplabError(f"test fraction {test_fraction} must lie strictly between 0 and 1")
    if not 2 <= count <= total:
        raise CliplabError(f"ordinal set: {count} source images asked for; give 2 to {total}")
    drawn = np.random.default_rng(seed).choice(total, size=count, replace=False)
    n_test = min(count - 1, max(1, round(count * test_fraction)))
    return {"train": np.sort(drawn[n_test:]), "test": np.sort(drawn[:n_test]), "all": np.sort(drawn)}


def ordinal_set(prop: str = "blur", split: str = "test", *, sources: int = 200, levels=LEVELS, seed: int = 0,
                test_fraction: float = 0.5, base: ImageDataset | None = None, dataset: str = "cifar10",
                root: str | Path | None = None) -> OrdinalDataset:
    """The seeded ordinal set of ``prop`` (``PROPERTIES``): ``sources`` images of ``dataset``'s test split (or of
    ``base``) at every level, the ``split`` part (train | test | all) of a split by source image."""
    if split not in SPLITS:
        raise CliplabError(f"ordinal split {split!r}: choose from {', '.join(SPLITS)}")
    if prop not in PROPERTIES:
        raise CliplabError(f"unknown ordinal property {prop!r}; choose from {', '.join(PROPERTIES)}")
    if base is None:
        from .registry import load_dataset

        base = load_dataset(dataset, root=root, split="test")
    parts = split_sources(sources, len(base), seed, test_fraction)
    return OrdinalDataset(base, parts[split], prop, levels, seed, split)


def numeric_levels(dataset: ImageDataset) -> np.ndarray:
    """Float targets of a labelled dataset whose class names are numbers (``"0"``, ``"2.5"``); a DatasetError
    naming the first class that is not, or an unlabelled item."""
    if isinstance(dataset, OrdinalDataset):
        return dataset.targets.astype(np.float64)
    names = list(getattr(dataset, "class_names", []) or [])
    if not names:
        raise DatasetError(f"{dataset.name}: no classes; ranking targets come from class folders named by numbers "
                           "(0/, 1/, 2/ ...)")
    values = []
    for name in names:
        try:
            values.append(float(name))
        except ValueError:
            raise DatasetError(f"{dataset.name}: class {name!r} is not a number; ranking targets come from class "
                               "folders named by numbers (0/, 1/, 2/ ...)") from None
    labels = np.asarray(dataset.labels)
    if (labels == NO_LABEL).any():
        raise DatasetError(f"{dataset.name}: {int((labels == NO_LABEL).sum())} item(s) have no level (unlabelled)")
    return np.asarray(values, dtype=np.float64)[labels]
