"""Image-caption pairs for pretraining: images decoded once into a uint8 bank, captions per image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data import has_labels, load_dataset
from ..data.base import ImageDataset
from ..data.prompts import fill_template, load_templates
from ..errors import DatasetError, ImageDecodeError


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
