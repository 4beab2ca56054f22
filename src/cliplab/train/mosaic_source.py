"""A pretraining source that yields boxes: seeded mosaics of labelled images with their exact tile boxes.

Source spec (what ``cliplab pretrain SOURCE`` and ``PretrainConfig.source`` take): ``mosaic`` or
``mosaic:KEY=VALUE,KEY=VALUE`` with the keys

- ``tiles``: the labelled dataset the tiles come from (a named dataset or a path; default ``cifar10``), read on the
  run's ``--split`` (CIFAR-10's ``train``: the train images less the held-out ``val`` items, never a test image);
- ``k``: tiles per side (default 2: a 2 x 2 mosaic);
- ``descriptions``: a description file (CuPL / DCLIP ``{class: [texts]}``, matched to the tiles' class names) for
  the region texts (no commas in the path); without it the region texts are the caption templates filled with the
  tile's class name.

Each epoch draws a fresh mosaic set with ``data.segmentation.MosaicSegmentation`` (the ``mosaic`` segmentation set,
seeded by (seed, epoch)): ``len(tiles) // k^2`` mosaics, each tile image used once per epoch. A batch is the
``clip`` batch (``images``, ``tokens``, ``text_index``, ``items``: the tiles' indices in the tile dataset,
(n, k, k)) plus ``boxes`` (n k^2, 5: image index, x1, y1, x2, y2 in the model input's pixels, the exact tile grid),
``region_tokens``, ``region_text_index`` and ``region_labels`` (the tile classes): what the ``cloc`` and ``grain``
objectives read. Per image, its caption is one template (drawn uniformly per image) filled with the tiles' class
names in reading order ("a photo of a cat, dog, ship and frog."). Region texts: one text per class per batch (a
template, or one of the class's descriptions, drawn per step), so two regions of one class never have each
other's text as a negative. All draws come from a generator seeded by (seed, global step): batch j of epoch e is
the same whenever it is read, so a resumed run repeats an uninterrupted one.

Augmentation: horizontal flips only (a flipped mosaic is the mirrored tiles in mirrored column order, so the boxes
stay the exact grid and the labels follow); ``crop_scale`` is not used (a random resized crop would cut tiles).
The held-out check of a mosaic run is zero-shot top-1 on the tile dataset's ``--eval-split`` (whole images).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..data import has_labels, load_dataset
from ..data.base import ImageDataset, Subset
from ..data.prompts import fill_template, load_templates
from ..data.segmentation import MosaicSegmentation, MosaicSpec
from ..errors import CliplabError, DatasetError
from .augment import to_model_input
from .pairs import _fit_square, open_stream

PREFIX = "mosaic"
KEYS = ("tiles", "k", "descriptions")


@dataclass(frozen=True)
class MosaicSource:
    """A parsed ``mosaic[:key=value,...]`` source spec (module docstring)."""

    tiles: str = "cifar10"
    k: int = 2
    descriptions: str | None = None


def parse_mosaic_source(source: str) -> MosaicSource | None:
    """The spec of a mosaic source, None for any other source; a malformed spec is one line."""
    text = str(source)
    if text != PREFIX and not text.startswith(PREFIX + ":"):
        return None
    values: dict = {}
    for item in filter(None, text[len(PREFIX) + 1:].split(",")):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in KEYS or not value:
            raise CliplabError(f"source {text!r}: write mosaic:KEY=VALUE,... with keys {', '.join(KEYS)} "
                               f"(got {item!r})")
        values[key] = value
    if "k" in values:
        if not values["k"].isdigit() or int(values["k"]) < 1:
            raise CliplabError(f"source {text!r}: k must be a whole number >= 1")
        values["k"] = int(values["k"])
    return MosaicSource(**values)


def is_box_source(source: str) -> bool:
    """True for a source whose batches carry boxes (a mosaic source)."""
    return parse_mosaic_source(source) is not None


def tile_source(source: str) -> str:
    """The dataset a mosaic source draws its tiles from (its splits are the source's); other sources unchanged."""
    spec = parse_mosaic_source(source)
    return spec.tiles if spec is not None else source


def check_box_source(loss: str, source: str) -> None:
    """One line when objective ``loss`` trains on boxes and ``source`` yields none."""
    from . import engine

    engine.list_objectives()
    if getattr(engine._OBJECTIVES.get(loss), "needs_boxes", False) and not is_box_source(source):
        from .config import PretrainOptionError

        raise PretrainOptionError(f"--loss {loss} trains on region boxes and the source {source!r} yields none; "
                                  "use a source with boxes: mosaic (CIFAR-10 train tiles) or "
                                  "mosaic:tiles=DATASET,k=K")


def open_source(source: str, split: str | None, image_size: int, templates: str, data_root: str | None,
                progress: bool = True, need_captions: bool = True, **options):
    """The stream of ``source``: a ``MosaicStream`` for a mosaic source (its held-out check, ``need_captions``
    False, is the tile dataset's split as a plain stream), else ``pairs.open_stream``."""
    spec = parse_mosaic_source(source)
    if spec is None or not need_captions:
        return open_stream(tile_source(source), split, image_size, templates, data_root, progress, need_captions,
                           **options)
    tiles = load_dataset(spec.tiles, root=data_root, split=split)
    descriptions = None
    if spec.descriptions is not None:
        from ..data.descriptions import load_descriptions

        descriptions = load_descriptions(spec.descriptions, tiles.class_names)
    return MosaicStream(tiles, image_size, templates, k=spec.k, descriptions=descriptions, **options)


def names_caption(names: Sequence[str]) -> str:
    """``a, b and c``: the tile names in reading order."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class MosaicStream:
    """Mosaic pairs with exact tile boxes and region texts, in seeded epochs (module docstring)."""

    yields_boxes = True
    caption_source = "templates"

    def __init__(self, tiles: ImageDataset, image_size: int, templates: str | Sequence[str] = "generic", *,
                 k: int = 2, descriptions: dict[str, list[str]] | None = None,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
        if not has_labels(tiles):
            raise DatasetError(f"{tiles.name}: mosaic tiles need class labels")
        labels = np.asarray(tiles.labels)
        if (labels < 0).any():
            tiles = Subset(tiles, np.flatnonzero(labels >= 0).tolist())
        if k < 1:
            raise DatasetError(f"mosaic needs k >= 1; got {k}")
        self.tiles, self.k, self.image_size = tiles, int(k), int(image_size)
        self.count = len(tiles) // (self.k * self.k)
        if self.count < 1:
            raise DatasetError(f"{tiles.name}: {len(tiles)} labelled images make no {k} x {k} mosaic")
        self.templates = load_templates(templates)
        self.descriptions = [list(descriptions[c]) for c in tiles.class_names] if descriptions is not None else None
        self.mean, self.std = torch.tensor(tuple(mean)), torch.tensor(tuple(std))
        self.skipped: list[tuple[str, str]] = []
        self.caption_count = len(self.templates)
        self.labels_known = True

    def __len__(self) -> int:
        return self.count

    @property
    def class_names(self) -> list[str]:
        return list(self.tiles.class_names)

    @property
    def item_ids(self) -> list[str]:
        """The tile images' ids (what a held-out split must not share)."""
        return self.tiles.item_ids()

    def per_epoch(self, batch_size: int) -> int:
        per_epoch = self.count // batch_size
        if per_epoch == 0:
            from .config import PretrainOptionError

            raise PretrainOptionError(f"--batch-size {batch_size} is larger than the {self.count} mosaics of an "
                                      "epoch")
        return per_epoch

    def mosaics(self, epoch: int, seed: int) -> MosaicSegmentation:
        """Epoch ``epoch``'s mosaic set (a ``MosaicSegmentation`` seeded by (seed, epoch))."""
        draw = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        return MosaicSegmentation(self.tiles, getattr(self.tiles, "split", "train"),
                                  MosaicSpec(count=self.count, k=self.k, seed=draw))

    def boxes(self, n: int) -> torch.Tensor:
        """(n k^2, 5) exact tile boxes of ``n`` images in reading order, in model-input pixels."""
        edges = torch.arange(self.k + 1, dtype=torch.float32) * (self.image_size / self.k)
        r, c = torch.meshgrid(torch.arange(self.k), torch.arange(self.k), indexing="ij")
        one = torch.stack([edges[c.ravel()], edges[r.ravel()], edges[c.ravel() + 1], edges[r.ravel() + 1]], dim=1)
        index = torch.arange(n, dtype=torch.float32).repeat_interleave(self.k * self.k).unsqueeze(1)
        return torch.cat([index, one.repeat(n, 1)], dim=1)

    def batches(self, epoch: int, start: int = 0, *, seed: int, batch_size: int, tokenize, crop_scale: float = 0.5,
                flip: bool = True, channels_last: bool = False) -> Iterator[dict]:
        """Batches ``start``.. of ``epoch`` (module docstring); ``crop_scale`` is not used."""
        per_epoch = self.per_epoch(batch_size)
        mosaic = self.mosaics(epoch, seed)
        names = self.class_names
        for position in range(start, per_epoch):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * per_epoch + position)
            rows = np.arange(position * batch_size, (position + 1) * batch_size)
            caption_draws = torch.rand(len(rows), generator=generator)
            text_draws = torch.rand(len(names), generator=generator)
            mirror = (torch.rand(len(rows), generator=generator) < 0.5) if flip else torch.zeros(len(rows), dtype=bool)
            uint8 = torch.from_numpy(np.stack([_fit_square(mosaic.load_image(int(i)), self.image_size) for i in rows]))
            images = to_model_input(uint8, self.mean, self.std)
            images[mirror] = images[mirror].flip(-1)
            labels = torch.from_numpy(mosaic.tile_labels[rows].astype(np.int64))
            items = torch.from_numpy(mosaic.tile_indices[rows].astype(np.int64))
            labels[mirror], items[mirror] = labels[mirror].flip(-1), items[mirror].flip(-1)
            captions = [fill_template(self.templates[int(u * len(self.templates))],
                                      names_caption([names[j] for j in row.ravel().tolist()]))
                        for u, row in zip(caption_draws.tolist(), labels)]
            unique = list(dict.fromkeys(captions))
            where = {t: j for j, t in enumerate(unique)}
            region_labels = labels.reshape(-1)
            present = list(dict.fromkeys(region_labels.tolist()))  # classes in first-occurrence order
            texts = [self._region_text(c, float(text_draws[c])) for c in present]
            row_of = {c: j for j, c in enumerate(present)}
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield {"images": images, "tokens": tokenize(unique),
                   "text_index": torch.tensor([where[t] for t in captions], dtype=torch.long), "items": items,
                   "boxes": self.boxes(len(rows)), "region_tokens": tokenize(texts),
                   "region_text_index": torch.tensor([row_of[c] for c in region_labels.tolist()], dtype=torch.long),
                   "region_labels": region_labels}

    def _region_text(self, label: int, u: float) -> str:
        if self.descriptions is not None:
            options = self.descriptions[label]
            return options[int(u * len(options))]
        return fill_template(self.templates[int(u * len(self.templates))], self.class_names[label])
