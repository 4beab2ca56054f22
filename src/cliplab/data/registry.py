"""``load_dataset``: a dataset by name (with a data root) or by path."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import DatasetError
from .archives import cifar, mnist
from .base import ImageDataset, Subset
from .folders import coco_captions, image_folder, manifest
from .prompts import builtin_class_names

# name -> (sub-folder of the data root, loader(root, split))
_NAMED: dict[str, tuple[str, Callable[[Path, str], ImageDataset]]] = {
    "cifar10": ("cifar10", lambda root, split: cifar(root, "cifar10", split)),
    "cifar100": ("cifar100", lambda root, split: cifar(root, "cifar100", split)),
    "mnist": ("mnist", lambda root, split: mnist(root, split)),
    "fashion_mnist": ("fashion_mnist", lambda root, split: mnist(root, split, "fashion_mnist")),
    "coco": ("coco_mini", lambda root, split: coco_captions(root, split=None if split == "test" else split)),
    "imagenette": ("imagenette_sample", lambda root, split: manifest_split(root / "labels.json", split)),
    "dtd": ("dtd_sample", lambda root, split: manifest(root / "labels.json")),
}
_SPLIT_ALIASES = {"test": "val", "val": "val", "train": "train"}


def manifest_split(path: Path, split: str) -> ImageDataset:
    """A JSON manifest restricted to rows whose ``split`` matches (``test`` means ``val`` here)."""
    dataset = manifest(path)
    wanted = _SPLIT_ALIASES.get(split, split)
    keep = [i for i, item_id in enumerate(dataset.item_ids()) if item_id.split("/")[0] == wanted]
    if not keep:
        raise DatasetError(f"{path}: no rows in split {split!r}")
    return Subset(dataset, keep)


def _same_classes(curated: list[str], found: list[str]) -> bool:
    """Curated names replace the dataset's only where they are the same classes in the same order
    (spelling aside: underscores, case); numeric folder names, for example, keep their own names."""
    if len(curated) != len(found):
        return False
    def norm(name: str) -> str:
        return name.replace("_", " ").replace("-", " ").lower()
    agree = sum(norm(a) == norm(b) for a, b in zip(curated, found))
    return agree >= 0.9 * len(found)


def dataset_names() -> list[str]:
    """Names ``load_dataset`` knows."""
    return sorted(_NAMED)


def default_data_root() -> Path:
    """``$CLIPLAB_DATA``, else ``../shared/datasets`` next to the working directory, else ``./data``."""
    if os.environ.get("CLIPLAB_DATA"):
        return Path(os.environ["CLIPLAB_DATA"])
    for candidate in (Path.cwd().parent / "shared" / "datasets", Path.cwd() / "shared" / "datasets"):
        if candidate.is_dir():
            return candidate
    return Path("data")


def load_dataset(
    name_or_path: str | Path, root: str | Path | None = None, split: str = "test", hash_content: bool = False
) -> ImageDataset:
    """A named dataset (``cifar10``, ``mnist``, ...) under ``root`` or a path.

    Paths: a folder of class sub-folders (ImageFolder) or a ``.csv``/``.jsonl``/``.json`` manifest.
    Named datasets use CLIP_benchmark's class names where cliplab ships them.
    """
    key = str(name_or_path).lower().replace("-", "_")
    if key in _NAMED:
        folder, loader = _NAMED[key]
        base = Path(root) if root is not None else default_data_root()
        location = base / folder if (base / folder).exists() else base
        if not location.exists():
            raise DatasetError(f"{key}: data not found under {base} (pass --data-root or set CLIPLAB_DATA)")
        dataset = loader(location, split)
        curated = builtin_class_names(key)
        if curated and _same_classes(curated, dataset.class_names):
            dataset.class_names = curated
        dataset.name = key
        return dataset
    path = Path(name_or_path)
    if path.is_dir():
        return image_folder(path, hash_content)
    if path.is_file() and path.suffix in (".csv", ".jsonl", ".json"):
        return manifest(path, hash_content=hash_content)
    raise DatasetError(
        f"unknown dataset {str(name_or_path)!r}: not a folder or manifest, and not one of {', '.join(dataset_names())}"
    )
