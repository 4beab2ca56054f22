"""``load_dataset``: a dataset by name (with a data root) or by path, one split at a time."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import DatasetError
from .archives import cifar, mnist
from .base import NO_IMAGE_EXTENSION, FileImageDataset, ImageDataset, Subset, printable
from .folders import (
    coco_captions,
    folder_layout,
    image_files,
    image_folder,
    left_out,
    manifest,
    split_folders,
    stray_images_error,
)
from .prompts import builtin_class_names, distinct_class_names
from .splits import SplitSource, available_splits, select_split


@dataclass(frozen=True)
class NamedDataset:
    """A dataset cliplab knows by name: its folder under the data root and the splits its source has."""

    folder: str
    splits: dict[str, tuple[str, Callable[[Path], ImageDataset]]]  # split -> (what it is, loader(location))
    default_split: str = "test"


def _rows(split_value: str) -> Callable[[Path], ImageDataset]:
    return lambda root: rows_with_split(root / "labels.json", split_value)


def _coco(split_value: str) -> Callable[[Path], ImageDataset]:
    return lambda root: coco_captions(root, split=split_value)


_NAMED: dict[str, NamedDataset] = {
    "cifar10": NamedDataset("cifar10", {
        "train": ("data_batch_* pickles", lambda root: cifar(root, "cifar10", "train")),
        "test": ("test_batch pickle", lambda root: cifar(root, "cifar10", "test"))}),
    "cifar100": NamedDataset("cifar100", {
        "train": ("train pickle", lambda root: cifar(root, "cifar100", "train")),
        "test": ("test pickle", lambda root: cifar(root, "cifar100", "test"))}),
    "mnist": NamedDataset("mnist", {
        "train": ("train-*-idx files", lambda root: mnist(root, "train")),
        "test": ("t10k-*-idx files", lambda root: mnist(root, "test"))}),
    "fashion_mnist": NamedDataset("fashion_mnist", {
        "train": ("train-*-idx files", lambda root: mnist(root, "train", "fashion_mnist")),
        "test": ("t10k-*-idx files", lambda root: mnist(root, "test", "fashion_mnist"))}),
    "imagenet": NamedDataset("imagenet", {
        "train": ("train/<wnid>/ folders", lambda root: imagenet_folder(root / "train")),
        "test": ("val/<wnid>/ folders (ImageNet's validation set, the usual test set)",
                 lambda root: imagenet_folder(root / "val"))}),
    "imagenette": NamedDataset("imagenette_sample", {
        "train": ("labels.json rows with split 'train'", _rows("train")),
        "test": ("labels.json rows with split 'val' (ImageNet validation images)", _rows("val"))}),
    "dtd": NamedDataset("dtd_sample", {
        "test": ("all images of labels.json (the sample has no official split)",
                 lambda root: manifest(root / "labels.json"))}),
    "coco": NamedDataset("coco_mini", {
        "train": ("captions.json entries with split 'train2017'", _coco("train2017")),
        "test": ("captions.json entries with split 'val2017'", _coco("val2017"))}),
}


def rows_with_split(path: Path, split_value: str) -> ImageDataset:
    """A manifest restricted to rows whose ``split`` field equals ``split_value``."""
    dataset = manifest(path)
    if dataset.row_splits is None:
        raise DatasetError(f"{path}: rows have no 'split' field")
    keep = [i for i, value in enumerate(dataset.row_splits) if value == split_value]
    if not keep:
        raise DatasetError(f"{path}: no rows with split {split_value!r}")
    return Subset(dataset, keep)


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1k synset ids in class-index order (sorted)."""
    entry = resources.files("cliplab.data") / "meta" / "imagenet_wnids.json"
    return json.loads(entry.read_text())["wnids"]


def imagenet_folder(folder: Path) -> ImageDataset:
    """ImageNet-style ``<wnid>/`` folders labelled with the 1,000-class index and CLIP_benchmark's names.

    A folder holding a subset of the synsets keeps the classes it has, in index order.
    """
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not found (expected ImageNet-style <wnid>/ folders)")
    wnids = imagenet_wnids()
    names = distinct_class_names(builtin_class_names("imagenet") or [])
    by_wnid = dict(zip(wnids, names))
    present = [printable(name) for name, _ in folder_layout(folder).folders]
    unknown = [w for w in present if w not in by_wnid]
    if unknown:
        raise DatasetError(f"{folder}: {unknown[0]!r} is not an ImageNet-1k synset id")
    dataset = image_folder(folder, class_names=present, name="imagenet")
    dataset.class_names = [by_wnid[w] for w in present]
    return dataset


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


def dataset_splits(name: str, root: str | Path | None = None) -> dict[str, str]:
    """Split name -> where it comes from, for a named dataset or a dataset path."""
    key = _key(name)
    if key in _NAMED:
        return available_splits({s: SplitSource(d, lambda: None) for s, (d, _) in _NAMED[key].splits.items()})
    return available_splits(_path_sources(Path(name), False))


def named_dataset_folder(name: str) -> str:
    """The folder a named dataset is looked for under the data root."""
    return _NAMED[_key(name)].folder


def default_data_root() -> Path:
    """``$CLIPLAB_DATA``, else ``../shared/datasets`` next to the working directory, else ``./data``."""
    if os.environ.get("CLIPLAB_DATA"):
        return Path(os.environ["CLIPLAB_DATA"])
    for candidate in (Path.cwd().parent / "shared" / "datasets", Path.cwd() / "shared" / "datasets"):
        if candidate.is_dir():
            return candidate
    return Path("data")


def _key(name: str | Path) -> str:
    return str(name).lower().replace("-", "_")


def load_dataset(
    name_or_path: str | Path, root: str | Path | None = None, split: str | None = None, hash_content: bool = False
) -> ImageDataset:
    """One split of a named dataset (``cifar10``, ``mnist``, ...) under ``root``, or of a path.

    ``split`` is ``train``, ``val`` or ``test`` (default: ``test`` for named datasets, the whole data
    for paths without splits); see :func:`dataset_splits`. Paths: a folder of class sub-folders
    (ImageFolder), a folder whose top level is ``train/``, ``val/``, ``test/`` class folders, a flat
    folder of images (unlabelled: labels ``NO_LABEL``, no class names), or a ``.csv``/``.jsonl``/``.json``
    manifest (rows may carry a ``split`` field). Images beside class or split folders are an error;
    what folder scans leave out is in ``dataset.skipped`` with reasons. Named datasets use
    CLIP_benchmark's class names where cliplab ships them. The split is kept on the dataset
    (``dataset.split``, ``dataset.split_info``).
    """
    key = _key(name_or_path)
    if key in _NAMED:
        entry = _NAMED[key]
        base = Path(root) if root is not None else default_data_root()
        location = base / entry.folder if (base / entry.folder).exists() else base
        if not location.exists():
            raise DatasetError(f"{key}: data not found under {base.absolute()} (pass --data-root or set "
                               "CLIPLAB_DATA; default: ../shared/datasets beside the working folder, else ./data)")
        sources = {s: SplitSource(d, _bind(loader, location)) for s, (d, loader) in entry.splits.items()}
        dataset = select_split(key, sources, split or entry.default_split)
        curated = builtin_class_names(key)
        if curated and _same_classes(curated, dataset.class_names):
            dataset.class_names = distinct_class_names(curated)
        dataset.name = key
        return dataset
    path = Path(name_or_path)
    if os.path.islink(path) and not path.exists():
        raise DatasetError(f"{printable(str(path))}: a symlink that leads nowhere (dangling, or a loop)")
    if not (path.is_dir() or (path.is_file() and path.suffix in (".csv", ".jsonl", ".json"))):
        raise DatasetError(f"unknown dataset {str(name_or_path)!r}: not a folder or manifest, and not one of "
                           f"{', '.join(dataset_names())}")
    sources = _path_sources(path, hash_content)
    if sources:
        default = next((s for s in ("test", "val", "train") if s in available_splits(sources)), None)
        if split is None and default is None:
            raise DatasetError(f"{printable(str(path))}: its rows name the splits {', '.join(sorted(sources))} "
                               "(none is test, val or train): choose one with --split NAME")
        return select_split(str(path), sources, split or default)
    if split not in (None, "all"):
        raise DatasetError(f"{path}: has no splits (no train/ val/ test/ folders, no 'split' field); it is read "
                           f"whole: leave out --split {split}")
    return user_folder(path, hash_content) if path.is_dir() else manifest(path, hash_content=hash_content)


def user_folder(path: Path, hash_content: bool = False) -> FileImageDataset:
    """A folder without splits: class sub-folders (:func:`image_folder`), or a flat folder of images read
    unlabelled (ids relative to the folder). An empty folder, or one with no image files, is a DatasetError."""
    layout = folder_layout(path)
    if layout.folders:
        return image_folder(path, hash_content)
    if not layout.images:
        if not layout.others and not layout.skipped:
            raise DatasetError(f"{printable(str(path))}: empty folder (expected images, or class sub-folders "
                               "ROOT/<class>/<image>)")
        raise DatasetError(f"{printable(str(path))}: no image files"
                           + left_out(sorted(layout.skipped + [(p, NO_IMAGE_EXTENSION) for p in layout.others])))
    dataset = image_files(layout.images, hash_content)
    dataset.root = Path(os.path.abspath(path))
    dataset.name = printable(dataset.root.name)
    dataset.skipped = sorted(layout.skipped + [(p, NO_IMAGE_EXTENSION) for p in layout.others])
    return dataset


def _bind(loader: Callable[[Path], ImageDataset], location: Path) -> Callable[[], ImageDataset]:
    return lambda: loader(location)


def _path_sources(path: Path, hash_content: bool) -> dict[str, SplitSource]:
    """The splits a user's folder or manifest holds: split folders, or a manifest's ``split`` field."""
    if path.is_dir():
        folders = split_folders(path)
        if not folders:
            return {}
        top = folder_layout(path)
        if top.images:
            raise stray_images_error(top, "split")
        outside = sorted(top.skipped + [(p, "not inside a split folder") for p in top.others])
        raw = sorted({name for folder in folders.values() for name, _ in folder_layout(folder).folders})
        classes = [printable(name) for name in raw]
        name = printable(Path(os.path.abspath(path)).name)

        def load(folder: Path) -> Callable[[], ImageDataset]:
            def build() -> ImageDataset:
                dataset = image_folder(folder, hash_content, class_names=classes, name=name)
                dataset.root = path  # item ids keep the split folder (train/cat/1.png): unique across splits
                dataset.skipped = sorted(outside + dataset.skipped)
                return dataset
            return build

        return {split: SplitSource(f"{folder.name}/ folder", load(folder)) for split, folder in folders.items()}
    if path.is_file() and path.suffix in (".csv", ".jsonl", ".json"):
        whole = manifest(path, hash_content=hash_content)
        if whole.row_splits is None:
            return {}
        values = sorted({v for v in whole.row_splits if v is not None})
        return {value: SplitSource(f"rows with split {value!r}", _rows_of(whole, value)) for value in values}
    return {}


def _rows_of(whole: FileImageDataset, value: str) -> Callable[[], ImageDataset]:
    return lambda: Subset(whole, [i for i, v in enumerate(whole.row_splits or []) if v == value])
