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


HOLDOUT_FILE_FORMAT = "cliplab-holdout/1"


def holdout_splits(dataset: ImageDataset, fraction: float, seed: int = HOLDOUT_SEED,
                   val_fraction: float = HOLDOUT_FRACTION) -> dict[str, ImageDataset]:
    """train/val/test of a labelled dataset without splits (a folder of class sub-folders): ``test`` is a
    seeded, stratified ``fraction`` of each class, ``val`` a stratified ``val_fraction`` of the rest, ``train``
    what remains; no item is in two. Each part has ``split`` and ``split_info`` (the recipe) set."""
    if not 0 < fraction < 1:
        raise DatasetError(f"--holdout {fraction:g}: give the test fraction, strictly between 0 and 1 (e.g. 0.2)")
    if getattr(dataset, "split", "all") != "all":
        raise DatasetError(f"{dataset.name}: already has splits (train/ val/ test/ or a 'split' field); "
                           "leave out --holdout")
    labels = np.asarray(dataset.labels)
    if not len(labels) or (labels < 0).any():
        raise DatasetError(f"{dataset.name}: --holdout splits a labelled folder (class sub-folders); this one has "
                           "unlabelled images")
    rest, test = stratified_holdout(labels, fraction, seed)
    kept, held = stratified_holdout(labels[rest], val_fraction, seed + 1)
    parts = {"train": rest[kept], "val": rest[held], "test": test}
    recipe = {"from": "all", "test_fraction": fraction, "val_fraction_of_rest": val_fraction, "seed": seed,
              "stratified": True}
    out = {}
    for split, indices in parts.items():
        part = Subset(dataset, indices)
        part.split = split
        part.split_info = {"split": split, "source": f"seeded stratified hold-out of the whole folder "
                           f"(test {fraction:g}, val {val_fraction:g} of the rest, seed {seed})", "holdout": recipe}
        out[split] = part
    return out


def holdout_record(parts: Mapping[str, ImageDataset]) -> dict:
    """The item ids of each hold-out part, with the recipe: what the split file keeps."""
    first = next(iter(parts.values()))
    return {"format": HOLDOUT_FILE_FORMAT, "dataset": first.name, **dict(first.split_info["holdout"]),
            "splits": {split: part.item_ids() for split, part in parts.items()}}


def apply_holdout_record(dataset: ImageDataset, record: Mapping) -> dict[str, ImageDataset]:
    """The parts a saved :func:`holdout_record` names, by item id (items no longer in the folder are dropped;
    items added since are in no part, so the parts stay as they were)."""
    if record.get("format") != HOLDOUT_FILE_FORMAT:
        raise DatasetError(f"not a cliplab hold-out split file (format {record.get('format')!r})")
    index = {item: i for i, item in enumerate(dataset.item_ids())}
    fresh = holdout_splits(dataset, float(record["test_fraction"]), int(record["seed"]),
                           float(record["val_fraction_of_rest"]))
    out = {}
    for split, ids in record["splits"].items():
        part = Subset(dataset, [index[item] for item in ids if item in index])
        part.split, part.split_info = split, fresh[split].split_info
        out[split] = part
    return out
