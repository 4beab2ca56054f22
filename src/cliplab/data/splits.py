"""Splits as data: which splits a dataset has, and how a validation split is made where the source has none.

Where a source has a train split but no validation split, ``val`` is a seeded, stratified hold-out of
``HOLDOUT_FRACTION`` of each class of train (``HOLDOUT_SEED``), and ``train`` is the rest: train, val
and test never share an item. The recipe is recorded in ``split_info`` and in every results JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import DatasetError
from .base import ImageDataset, Subset

HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSource:
    """One split a source provides: what it is (for people) and how to load it."""

    description: str
    load: Callable[[], ImageDataset]


def stratified_holdout(labels: np.ndarray, fraction: float = HOLDOUT_FRACTION,
                       seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) item indices: ``round(fraction * n_c)`` items of each class c held out.

    Every class with at least two items gives at least one to the hold-out and keeps at least one.
    Each class is shuffled with its own generator (seed, class), so adding a class changes no other.
    """
    labels = np.asarray(labels)
    kept, held = [], []
    for label in np.unique(labels):
        items = np.flatnonzero(labels == label)
        items = np.random.default_rng([seed, int(label) + 1]).permutation(items)
        n = int(round(fraction * len(items)))
        if len(items) >= 2:
            n = min(max(n, 1), len(items) - 1)
        held.append(items[:n])
        kept.append(items[n:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def available_splits(sources: Mapping[str, SplitSource]) -> dict[str, str]:
    """Split name -> description, including a validation hold-out where train exists without val."""
    out = {name: source.description for name, source in sources.items()}
    if "train" in sources and "val" not in sources:
        out["train"] = f"{sources['train'].description}, less the held-out val items"
        out["val"] = holdout_description()
    return {name: out[name] for name in SPLIT_NAMES if name in out} | {
        name: text for name, text in out.items() if name not in SPLIT_NAMES}


def holdout_description() -> str:
    return f"stratified {HOLDOUT_FRACTION:.0%} hold-out of the source's train split, seed {HOLDOUT_SEED}"


def select_split(name: str, sources: Mapping[str, SplitSource], split: str) -> ImageDataset:
    """The dataset for ``split`` with ``split`` and ``split_info`` set; unknown splits name the known ones."""
    known = available_splits(sources)
    if split not in known:
        raise DatasetError(f"{name}: no split {split!r}; it has {', '.join(known)}")
    made = "train" in sources and "val" not in sources and split in ("train", "val")
    if made:
        full = sources["train"].load()
        kept, held = stratified_holdout(full.labels)
        dataset: ImageDataset = Subset(full, held if split == "val" else kept)
        info = {"split": split, "source": known[split],
                "holdout": {"from": "train", "fraction": HOLDOUT_FRACTION, "seed": HOLDOUT_SEED,
                            "stratified": True}}
    else:
        dataset = sources[split].load()
        info = {"split": split, "source": known[split]}
    dataset.split = split
    dataset.split_info = info
    return dataset
