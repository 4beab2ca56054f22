"""Array datasets in their official files: CIFAR-10/100 python pickles and MNIST idx files.

CIFAR's format is a pickle; it is read with an unpickler that admits only numpy array
reconstruction and plain containers, so a crafted file cannot run code.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .base import ArrayImageDataset
from .folders import image_folder

SAFE_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def safe_unpickle(path: Path) -> dict:
    """Load a CIFAR-style pickle with ``str`` keys, allowing only numpy arrays and builtins."""
    try:
        with open(path, "rb") as handle:
            data = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable pickle ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a dict, found {type(data).__name__}")
    return data


_CIFAR = {
    "cifar10": ("cifar-10-batches-py", {"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]},
                "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", {"test": ["test"], "train": ["train"]}, "meta", "fine_label_names",
                 "fine_labels"),
}


def cifar(root: str | Path, variant: str = "cifar10", split: str = "test"):
    """CIFAR-10 or CIFAR-100 from the official python pickles under ``root``.

    Also accepts the folder-of-images form (``root/<split>/<class>/*.png``). Train batches that are
    absent are skipped (../shared/datasets ships only ``data_batch_1``).
    """
    root = Path(root)
    folder_name, splits, meta_name, names_key, labels_key = _CIFAR[variant]
    folder = root / folder_name if (root / folder_name).is_dir() else root
    if not (folder / meta_name).is_file():
        if (root / split).is_dir():
            return image_folder(root / split)
        raise DatasetError(f"{root}: no {folder_name}/{meta_name} and no {split}/ image folder")
    names = [str(n) for n in safe_unpickle(folder / meta_name)[names_key]]
    files = [folder / f for f in splits[split] if (folder / f).is_file()]
    if not files:
        raise DatasetError(f"{folder}: none of {', '.join(splits[split])} found")
    images, labels = [], []
    for file in files:
        batch = safe_unpickle(file)
        data = np.asarray(batch["data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(batch[labels_key])
    source = files[0] if len(files) == 1 else folder
    return ArrayImageDataset(np.concatenate(images), labels, names, source, variant,
                             identity_from_source=len(files) == 1)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped) as a numpy array; uint8 payloads only, as in MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: unreadable idx file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    payload = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says {shape} but holds {payload.size} bytes")
    return payload.reshape(shape)


def mnist(root: str | Path, split: str = "test", variant: str = "mnist") -> ArrayImageDataset:
    """MNIST or Fashion-MNIST from the original idx files (``t10k-*`` for test, ``train-*`` for train)."""
    root = Path(root)
    prefix = "t10k" if split == "test" else "train"
    images_file = _find(root, f"{prefix}-images-idx3-ubyte")
    labels_file = _find(root, f"{prefix}-labels-idx1-ubyte")
    names = FASHION_MNIST_CLASSES if variant == "fashion_mnist" else MNIST_CLASSES
    return ArrayImageDataset(read_idx(images_file), read_idx(labels_file), names, images_file, variant,
                             identity_from_source=True)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem, root / "raw" / f"{stem}.gz", root / "raw" / stem):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{root}: {stem}[.gz] not found")

