"""``ImageFeatures``: embedded data as a value (read-only features, labels, ids, provenance) and its splits."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import DatasetError, LabelError
from ..fileio import atomic_write_text


def _read_only(array: np.ndarray) -> np.ndarray:
    if array.flags.writeable:
        array = array.view()
        array.flags.writeable = False
    return array


@dataclass(frozen=True)
class ImageFeatures:
    """Embeddings of a dataset's decodable images, in dataset order, with where they came from.

    ``features[k]`` (read-only, L2-normalised float32) belongs to item ``item_ids[k]`` with label
    ``labels[k]`` (``-1``: unlabelled) and dataset index ``indices[k]``. ``failures`` lists every item
    that could not be decoded as (item id, reason). ``model`` holds the model's names as
    CLIP_benchmark writes them (``model``, ``pretrained``), its ``model_id`` and a weights note.
    """

    features: np.ndarray
    labels: np.ndarray
    item_ids: list[str]
    indices: np.ndarray
    class_names: list[str] = field(default_factory=list)
    dataset: str = ""
    split: str = "all"
    split_info: dict = field(default_factory=dict)
    model_id: str = ""
    model: dict = field(default_factory=dict)
    cache_key: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)
    computed: int = 0  # items this call encoded (the rest came from the cache)
    repairs: list[str] = field(default_factory=list)  # what the cache repaired on the way (one line each)

    def __post_init__(self):
        object.__setattr__(self, "features", _read_only(np.asanyarray(self.features)))
        object.__setattr__(self, "labels", _read_only(np.asarray(self.labels, dtype=np.int64)))
        object.__setattr__(self, "indices", _read_only(np.asarray(self.indices, dtype=np.int64)))
        if not (len(self.features) == len(self.labels) == len(self.item_ids) == len(self.indices)):
            raise DatasetError(f"{self.dataset}: features, labels, item ids and indices differ in length")

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1]) if self.features.ndim == 2 else 0

    def subset(self, rows: Sequence[int] | np.ndarray) -> ImageFeatures:
        """The rows ``rows`` (positions or a boolean mask), in that order; failures are not carried over."""
        rows = np.asarray(rows)
        positions = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        return replace(self, features=np.asarray(self.features[positions]), labels=self.labels[positions],
                       item_ids=[self.item_ids[i] for i in positions], indices=self.indices[positions],
                       failures=[], computed=0, repairs=[])

    def labelled(self) -> ImageFeatures:
        """Only the rows with a label (the list of failed items is kept)."""
        return replace(self.subset(self.labels >= 0), failures=self.failures, computed=self.computed)

    def take(self, item_ids: Sequence[str]) -> ImageFeatures:
        """The rows of the given item ids, in that order; an id not here is an error naming it."""
        position = {item: i for i, item in enumerate(self.item_ids)}
        missing = [item for item in item_ids if item not in position]
        if missing:
            raise DatasetError(f"{self.dataset} ({self.split}): item {missing[0]!r} is not among these features"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return self.subset([position[item] for item in item_ids])

    def few_shot(self, k: int, seed: int = 1, val_k: int | None = None) -> FewShotSplit:
        """``k`` items per class for fitting and ``val_k`` (default ``min(k, 4)``) others for validation.

        Each class's labelled rows are shuffled with their own generator (seed, class), as CoOp's
        protocol draws shots per class; shots and validation never share an item. A class with too few
        items is an error naming it and the largest ``k`` that would work.
        """
        val_k = check_shot_counts(self.labels, self.class_names, k, val_k, f"{self.dataset} ({self.split})")
        shots, val = [], []
        for label in range(len(self.class_names)) if self.class_names else np.unique(self.labels[self.labels >= 0]):
            rows = np.flatnonzero(self.labels == label)
            rows = np.random.default_rng([seed, int(label)]).permutation(rows)
            shots += rows[:k].tolist()
            val += rows[k:k + val_k].tolist()
        record = {"dataset": self.dataset, "split": self.split, "shots": k, "val_shots": val_k, "seed": seed,
                  "train_ids": [self.item_ids[i] for i in shots], "val_ids": [self.item_ids[i] for i in val]}
        return FewShotSplit(self.subset(shots), self.subset(val), record)

    def apply_split(self, record: dict | str | Path) -> FewShotSplit:
        """Repeat a saved few-shot split (a record or its JSON file) on these features, by item id."""
        if not isinstance(record, dict):
            record = load_split(record)
        if record.get("dataset") not in (None, self.dataset):
            raise DatasetError(f"split file is for dataset {record['dataset']!r}, these features are {self.dataset!r}")
        return FewShotSplit(self.take(record["train_ids"]), self.take(record["val_ids"]), record)


def check_shot_counts(labels, class_names, k: int, val_k: int | None = None, where: str = "the data") -> int:
    """``val_k`` (default ``min(k, 4)``) after checking every class has ``k + val_k`` labelled items; a class with
    too few is an error naming it and the largest ``k`` that would work. Cheap: callers check before embedding."""
    if k < 1:
        raise LabelError(f"shots must be at least 1, got {k}")
    val_k = min(k, 4) if val_k is None else val_k
    labels = np.asarray(labels)
    for label in range(len(class_names)) if len(class_names) else np.unique(labels[labels >= 0]):
        count = int(np.sum(labels == label))
        if count < k + val_k:
            name = class_names[label] if len(class_names) else str(label)
            room = max(0, count - min(val_k, max(0, count - 1)))
            raise LabelError(f"class {name!r} has {count} image(s) in {where}; {k} shots + {val_k} validation "
                             f"need {k + val_k}" + (f": use at most {room} shots" if room else ""))
    return val_k


@dataclass(frozen=True)
class FewShotSplit:
    """Few-shot fitting rows, disjoint validation rows, and the record that repeats the draw exactly."""

    train: ImageFeatures
    val: ImageFeatures
    record: dict

    def save(self, path: str | Path) -> Path:
        """Write the record (item ids, k, seed, dataset, split) as JSON, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(self.record, indent=1))


def load_split(path: str | Path) -> dict:
    """A split record written by :meth:`FewShotSplit.save`; a malformed file is an error naming it."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable split file ({exc})") from exc
    if not isinstance(record, dict) or not all(isinstance(record.get(k), list) for k in ("train_ids", "val_ids")):
        raise DatasetError(f"{path}: a split file needs 'train_ids' and 'val_ids' lists")
    return record
