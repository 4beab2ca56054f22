"""Image-caption pairs for pretraining.

``PairStream`` (what ``pretrain`` uses) reads pairs as training needs them: a first pass keeps only the
indices of usable items (a caption that is text, an image file whose header opens), and each batch decodes
its images then, so memory does not grow with the number of pairs beyond the dataset's own list of items.
``PairBank`` (the earlier reader, kept for ``benchmarks/train_memory.py``) decodes every image once into a
uint8 array held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data import has_labels, load_dataset
from ..data.base import ImageDataset, Subset
from ..data.prompts import fill_template, load_templates
from ..errors import DatasetError, ImageDecodeError
from .augment import random_resized_crop, to_model_input


@dataclass
class PairBank:
    """``images`` (n, S, S, 3) uint8 and, per image, the indices of its captions in ``captions``.

    ``labels``/``class_names`` are kept for zero-shot checks; ``skipped`` lists (item, reason) for
    every image or caption left out, so nothing is dropped silently.
    """

    images: torch.Tensor
    caption_ids: list[list[int]]
    captions: list[str]
    labels: np.ndarray
    class_names: list[str]
    item_ids: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    caption_source: str = "captions"

    def __len__(self) -> int:
        return len(self.caption_ids)


def _fit_square(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop to ``size`` x ``size``, as RGB uint8."""
    image = image.convert("RGB")
    if image.size != (size, size):
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def _clean_captions(raw, item: str, skipped: list[tuple[str, str]]) -> list[str]:
    good = []
    for number, caption in enumerate(raw or []):
        if not isinstance(caption, str):
            skipped.append((item, f"caption {number} is not text ({type(caption).__name__})"))
        elif not caption.strip():
            skipped.append((item, f"caption {number} is empty"))
        else:
            good.append(" ".join(caption.split()))
    return good


def caption_lists(dataset: ImageDataset, templates: str | Sequence[str]) -> tuple[list[list[str]], str]:
    """Per item, its captions: the dataset's own, else templates x the item's class name."""
    if dataset.captions is not None:
        return [list(c) if isinstance(c, list | tuple) else [c] for c in dataset.captions], "captions"
    if not has_labels(dataset):
        raise DatasetError(f"{dataset.name}: has neither captions nor class labels to make captions from")
    filled = [[fill_template(t, name) for t in load_templates(templates)] for name in dataset.class_names]
    return [filled[label] if label >= 0 else [] for label in dataset.labels], "templates"


def build_bank(dataset: ImageDataset, image_size: int, templates: str | Sequence[str] = "generic",
               progress: bool = True, need_captions: bool = True) -> PairBank:
    """Decode every image once (skipping and recording failures) and attach its captions."""
    per_item, kind = caption_lists(dataset, templates) if need_captions else ([[]] * len(dataset), "none")
    images, caption_ids, labels, item_ids, skipped = [], [], [], [], []
    index: dict[str, int] = {}
    for i in tqdm(range(len(dataset)), desc=f"decoding {dataset.name}", disable=not progress, leave=False):
        item = dataset.item_id(i)
        texts = _clean_captions(per_item[i], item, skipped) if need_captions else []
        if need_captions and not texts:
            skipped.append((item, "no usable caption"))
            continue
        try:
            array = _fit_square(dataset.load_image(i), image_size)
        except ImageDecodeError as exc:
            skipped.append((item, exc.reason))
            continue
        except (OSError, ValueError) as exc:
            skipped.append((item, f"{type(exc).__name__}: {exc}"))
            continue
        images.append(array)
        caption_ids.append([index.setdefault(t, len(index)) for t in texts])
        labels.append(int(dataset.labels[i]))
        item_ids.append(item)
    captions = list(index)
    if not images:
        reasons = "; ".join(f"{i}: {r}" for i, r in skipped[:3])
        raise DatasetError(f"{dataset.name}: no usable image-caption pairs ({reasons})")
    bank = torch.from_numpy(np.stack(images))
    return PairBank(bank, caption_ids, captions, np.asarray(labels, dtype=np.int64), list(dataset.class_names),
                    item_ids, skipped, kind)


def load_bank(source: str, split: str | None, image_size: int, templates: str, data_root: str | None,
              progress: bool = True, need_captions: bool = True) -> PairBank:
    """``build_bank`` for a named dataset or path (see ``cliplab.data.load_dataset``).

    Without ``need_captions`` (a held-out check), captions are still read when there are no labels.
    """
    dataset = load_dataset(source, root=data_root, split=split)
    need_captions = need_captions or not has_labels(dataset)
    return build_bank(dataset, image_size, templates, progress, need_captions)


# -- streaming ---------------------------------------------------------------------------------
def _item_path(dataset: ImageDataset, index: int) -> Path | None:
    """The file behind item ``index``, where the dataset is (a subset of) files."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, int(dataset.indices[index])
    paths = getattr(dataset, "paths", None)
    return Path(paths[index]) if paths is not None else None


def probe_image(path: Path) -> str | None:
    """Why the file at ``path`` cannot be an image (missing, empty, unrecognised header), else None.

    Reads the header only; a file damaged past its header is found when its batch decodes it.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            image.size  # noqa: B018  (the header is parsed by open)
    except FileNotFoundError:
        return "file not found"
    except PermissionError as exc:
        return f"permission denied ({exc.strerror})"
    except Image.UnidentifiedImageError:
        return "not an image (unrecognised content)"
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class PairStream:
    """Image-caption pairs read as they are needed, in seeded epochs.

    ``usable`` holds the dataset indices of the pairs that train (int64, the only per-pair array kept).
    ``batches(epoch, start)`` yields that epoch's batches: a permutation of the usable pairs drawn from
    (seed, epoch), consecutive slices of ``batch_size`` (no partial batch), each with its images decoded,
    fitted to ``image_size`` (shorter side, centre crop), normalised and augmented (random resized crop and
    flip), one caption per image drawn uniformly, and its distinct captions tokenised once. Caption and
    augmentation draws come from a generator seeded by (seed, global step), so batch k of epoch e is the
    same whenever it is read: a resumed run repeats an uninterrupted one. An image that fails to decode in
    a batch (damaged past its header) is replaced by the next one in the epoch's order that decodes, and
    listed in ``skipped``.
    """

    def __init__(self, dataset: ImageDataset, image_size: int, templates: str | Sequence[str] = "generic",
                 need_captions: bool = True, progress: bool = True, *, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), workers: int = 4):
        self.dataset, self.image_size, self.workers = dataset, int(image_size), max(1, workers)
        self.mean, self.std = torch.tensor(tuple(mean)), torch.tensor(tuple(std))
        self.need_captions = need_captions
        self.skipped: list[tuple[str, str]] = []
        if need_captions:
            self._per_item, self.caption_source = caption_lists(dataset, templates)
        else:
            self._per_item, self.caption_source = None, "none"
        usable, distinct = [], {}  # caption -> first-occurrence rank; kept only for template captions (few)
        for i in tqdm(range(len(dataset)), desc=f"checking {dataset.name}", disable=not progress, leave=False):
            if need_captions:
                texts = _clean_captions(self._per_item[i], dataset.item_id(i), self.skipped)
                if not texts:
                    self.skipped.append((dataset.item_id(i), "no usable caption"))
                    continue
                for text in texts:
                    distinct.setdefault(text, len(distinct))
            path = _item_path(dataset, i)
            reason = probe_image(path) if path is not None else None
            if reason is not None:
                self.skipped.append((dataset.item_id(i), reason))
                continue
            usable.append(i)
        self.usable = np.asarray(usable, dtype=np.int64)
        self.caption_count = len(distinct)
        # Distinct captions of a batch are encoded in the order they first occur in the dataset (what PairBank
        # numbered them by). Template captions are few: their first-occurrence rank is kept; for a source's own
        # captions the rank is (item, position), the same order wherever a caption belongs to one item.
        self._template_rank = distinct if self.caption_source == "templates" else None
        self.labels_known = has_labels(dataset)
        if not len(self.usable):
            reasons = "; ".join(f"{i}: {r}" for i, r in self.skipped[:3])
            raise DatasetError(f"{dataset.name}: no usable image-caption pairs ({reasons})")
        self._failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.usable)

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)

    @property
    def item_ids(self) -> list[str]:
        return [self.dataset.item_id(int(i)) for i in self.usable]

    def captions_of(self, index: int) -> list[str]:
        """The cleaned captions of dataset item ``index``."""
        return _clean_captions(self._per_item[index], "", []) if self._per_item is not None else []

    def _decode(self, index: int) -> np.ndarray | None:
        try:
            return _fit_square(self.dataset.load_image(index), self.image_size)
        except (ImageDecodeError, OSError, ValueError) as exc:
            if index not in self._failed:
                self._failed.add(index)
                reason = exc.reason if isinstance(exc, ImageDecodeError) else f"{type(exc).__name__}: {exc}"
                self.skipped.append((self.dataset.item_id(index), f"{reason} (replaced in its batches)"))
            return None

    def images(self, positions: Sequence[int], order: np.ndarray | None = None) -> torch.Tensor:
        """uint8 (n, S, S, 3) of usable pairs ``positions``; a failure takes the next decodable pair in ``order``."""
        indices = [int(self.usable[p]) for p in positions]
        with ThreadPoolExecutor(self.workers) as pool:
            arrays = list(pool.map(self._decode, indices))
        for k, array in enumerate(arrays):
            if array is None:
                arrays[k], indices[k] = self._replacement(positions[k], order)
        return torch.from_numpy(np.stack(arrays))

    def _replacement(self, position: int, order: np.ndarray | None) -> tuple[np.ndarray, int]:
        order = np.arange(len(self.usable)) if order is None else order
        start = int(np.flatnonzero(order == position)[0])
        for step in range(1, len(order)):
            index = int(self.usable[order[(start + step) % len(order)]])
            array = self._decode(index)
            if array is not None:
                return array, index
        raise DatasetError(f"{self.dataset.name}: no image decodes")

    def per_epoch(self, batch_size: int) -> int:
        per_epoch = len(self.usable) // batch_size
        if per_epoch == 0:
            from .config import PretrainOptionError

            raise PretrainOptionError(f"--batch-size {batch_size} is larger than the {len(self.usable)} usable "
                                      "training pairs")
        return per_epoch

    def batches(self, epoch: int, start: int = 0, *, seed: int, batch_size: int, tokenize, crop_scale: float = 0.5,
                flip: bool = True, channels_last: bool = False) -> Iterator[dict]:
        """Training batches of ``epoch`` from batch ``start`` on: ``{"images", "tokens", "text_index", "items"}``
        (``items``: the dataset indices of the batch's pairs, as drawn; a replaced image keeps its slot)."""
        per_epoch = self.per_epoch(batch_size)
        order = np.random.default_rng([seed, epoch]).permutation(len(self.usable))
        for position in range(start, per_epoch):
            step = epoch * per_epoch + position
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
            items = order[position * batch_size:(position + 1) * batch_size]
            draws = torch.rand(len(items), generator=generator).tolist()
            chosen, rank = [], {}
            for u, p in zip(draws, items):
                index = int(self.usable[p])
                texts = self.captions_of(index)
                j = int(u * len(texts))
                chosen.append(texts[j])
                key = self._template_rank[texts[j]] if self._template_rank is not None else (index, j)
                rank[texts[j]] = min(rank.get(texts[j], key), key)
            unique = sorted(rank, key=rank.__getitem__)
            where = {t: k for k, t in enumerate(unique)}
            images = to_model_input(self.images(items.tolist(), order), self.mean, self.std)
            images = random_resized_crop(images, generator, crop_scale, flip=flip)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield {"images": images, "tokens": tokenize(unique),
                   "text_index": torch.tensor([where[t] for t in chosen], dtype=torch.long),
                   "items": torch.from_numpy(self.usable[items])}

    def eval_batches(self, batch_size: int = 256) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(usable positions, normalised images without augmentation), in order: for held-out checks."""
        for start in range(0, len(self.usable), batch_size):
            positions = np.arange(start, min(start + batch_size, len(self.usable)))
            yield positions, to_model_input(self.images(positions.tolist()), self.mean, self.std)

    def labels(self) -> np.ndarray:
        """The labels of the usable pairs (-1 = none)."""
        return np.asarray(self.dataset.labels, dtype=np.int64)[self.usable]


def open_stream(source: str, split: str | None, image_size: int, templates: str, data_root: str | None,
                progress: bool = True, need_captions: bool = True, **options) -> PairStream:
    """``PairStream`` over a named dataset or path; without ``need_captions`` captions are still read when there
    are no labels (a held-out check by image-to-text recall)."""
    dataset = load_dataset(source, root=data_root, split=split)
    need_captions = need_captions or not has_labels(dataset)
    return PairStream(dataset, image_size, templates, need_captions, progress, **options)
