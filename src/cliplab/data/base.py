"""Dataset base classes: images addressed by index, each with an id, a label and a cache identity."""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

from ..errors import DatasetError
from .images import load_image

NO_LABEL = -1
NO_IMAGE_EXTENSION = "no image extension"  # the ``skipped`` reason of a file left out for its name


class ImageDataset(ABC):
    """Images with class names. Subclasses fill ``class_names`` and ``labels`` (``NO_LABEL`` if none).

    ``item_id(i)`` is a human-readable id (a path relative to the root, or ``file#index``);
    ``identity(i)`` keys the feature cache and changes whenever the image content may have changed.
    """

    name: str = "dataset"
    class_names: list[str]
    labels: np.ndarray
    split: str = "all"  # "train", "val", "test", or "all" for data without splits
    split_info: Mapping = MappingProxyType({"split": "all", "source": "the whole dataset (no splits)"})
    skipped: Sequence[tuple[Path, str]] = ()  # (path, reason) for each thing a folder scan left out
    captions: list[list[str]] | None = None  # per item, for image-caption sources (manifests, COCO)

    @property
    def ignored(self) -> list[Path]:
        """Files a folder scan left out for having no image extension (a subset of ``skipped``)."""
        return [path for path, reason in self.skipped if reason == NO_IMAGE_EXTENSION]

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def item_id(self, index: int) -> str:
        """Readable id of item ``index``."""

    @abstractmethod
    def identity(self, index: int) -> str:
        """Cache identity of item ``index``."""

    @abstractmethod
    def load_image(self, index: int) -> Image.Image:
        """RGB image of item ``index``; raises ImageDecodeError for a bad file."""

    def item_ids(self) -> list[str]:
        return [self.item_id(i) for i in range(len(self))]

    def identities(self) -> list[str]:
        return [self.identity(i) for i in range(len(self))]


def has_labels(dataset: ImageDataset) -> bool:
    """True when ``dataset`` has class names and at least one labelled item (a label other than ``NO_LABEL``)."""
    return bool(len(dataset.class_names)) and bool((np.asarray(dataset.labels) != NO_LABEL).any())


def printable(text: str) -> str:
    """``text`` as valid UTF-8: bytes that are not UTF-8 (surrogate-escaped by the OS) become ``\\xNN``.

    ``printable(os.fsdecode(b"caf\\xe9"))`` is ``"caf\\\\xe9"`` (a backslash, then ``xe9``); any other
    lone surrogate becomes ``\\uXXXX``. Valid text is returned unchanged.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate outside the surrogate-escape range
        return "".join(printable(c) if not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF
                       else f"\\u{ord(c):04x}" for c in text)


class FileImageDataset(ImageDataset):
    """Images stored as files under ``root``; identity = path + size + mtime, or content sha256."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        root: Path,
        name: str,
        hash_content: bool = False,
        captions: Sequence[list[str]] | None = None,
    ):
        if len(paths) == 0:
            raise DatasetError(f"{root}: no images found")
        self.paths = [Path(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.root = Path(root)
        self.name = name
        self.hash_content = hash_content
        self.captions = list(captions) if captions is not None else None
        self.row_splits: list[str | None] | None = None  # a manifest's per-row ``split`` field, if any
        self.skipped: list[tuple[Path, str]] = []  # what a folder scan left out, with reasons, for reporting

    def item_id(self, index: int) -> str:
        path = self.paths[index]
        try:
            text = path.relative_to(self.root).as_posix()
        except ValueError:
            text = path.as_posix()
        return printable(text)

    def identity(self, index: int) -> str:
        path = self.paths[index]
        try:
            if self.hash_content:
                with open(path, "rb") as handle:
                    return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()
            stat = path.stat()
        except OSError:
            return f"missing:{printable(os.path.abspath(path))}"
        return f"{printable(os.path.abspath(path))}|{stat.st_size}|{stat.st_mtime_ns}"

    def load_image(self, index: int) -> Image.Image:
        return load_image(self.paths[index])


class ArrayImageDataset(ImageDataset):
    """Images held in a uint8 array (n, H, W[, 3]) read from ``source``.

    Identity = sha1 of each image's pixels, shape and dtype. Loaders that hold a file's images
    unchanged and in order (CIFAR, MNIST) pass ``identity_from_source=True``: the identity is then
    the source file's path + size + mtime + index, which costs nothing to compute.
    """

    def __init__(self, images: np.ndarray, labels, class_names, source: Path, name: str,
                 identity_from_source: bool = False):
        if len(images) == 0:
            raise DatasetError(f"{source}: holds no images")
        if len(images) != len(labels):
            raise DatasetError(f"{source}: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.source = Path(source)
        self.name = name
        self._prefix = None
        if identity_from_source and self.source.is_file():
            stat = self.source.stat()
            self._prefix = f"{self.source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}#"

    def item_id(self, index: int) -> str:
        return f"{self.source.name}#{index}"

    def identity(self, index: int) -> str:
        if self._prefix is not None:
            return f"{self._prefix}{index}"
        image = np.ascontiguousarray(self.images[index])
        digest = hashlib.sha1(f"{image.shape}{image.dtype}".encode())
        digest.update(image.tobytes())
        return "sha1:" + digest.hexdigest()

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")


class Subset(ImageDataset):
    """The items ``indices`` of another dataset (same class names)."""

    def __init__(self, dataset: ImageDataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = dataset.labels[self.indices]
        self.class_names = dataset.class_names
        self.name = dataset.name
        self.split, self.split_info = dataset.split, dataset.split_info
        if dataset.captions is not None:
            self.captions = [dataset.captions[i] for i in self.indices]

    @property
    def skipped(self) -> Sequence[tuple[Path, str]]:
        """What the scan of the whole dataset left out."""
        return self.dataset.skipped

    def item_id(self, index: int) -> str:
        return self.dataset.item_id(int(self.indices[index]))

    def identity(self, index: int) -> str:
        return self.dataset.identity(int(self.indices[index]))

    def load_image(self, index: int) -> Image.Image:
        return self.dataset.load_image(int(self.indices[index]))
