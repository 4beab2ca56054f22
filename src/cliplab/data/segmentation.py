"""Semantic segmentation datasets: images with a per-pixel class-index mask (``IGNORE_INDEX`` = not scored).

Two named sets (``load_segmentation(name, split=)``; ``segmentation_names()``):

- ``coco_mini_seg``: the COCO-2017 images of ``coco_mini`` that have official instance annotations
  (``instances_val2017.json`` -> split ``test``, 79 images; ``instances_train2017.json`` -> ``train``, 80;
  ``all``: both, 159). Masks are decoded with pycocotools (``COCO.annToMask``: polygons and RLE) into a
  COCO-Object style semantic map: index 0 is ``background`` (no annotation), index ``i`` in 1..80 is the
  ``i``-th COCO category in ascending category id (1 person, 2 bicycle, ..., 80 toothbrush: the order of
  COCO-Object / COCO-Stuff's first 80 "thing" labels), and ``IGNORE_INDEX`` (255) marks pixels covered by a crowd
  annotation or by two non-crowd annotations of different categories (COCO-Stuff's tooling asserts that each
  pixel has one label; cliplab ignores the overlap instead of letting the later annotation win).
- ``mosaic``: a seeded mosaic of CIFAR-10 images, ``k`` x ``k`` tiles of 32 px (a 64 x 64 image for k = 2),
  each tile one CIFAR-10 image whose class labels every pixel of the tile (exact masks, no ignore, no
  background; class names = CIFAR-10's). Split ``test`` draws the tiles from CIFAR-10's test images, ``train``
  from its train images (the named ``cifar10`` train split), so a method that trains on mosaic train never sees a
  test image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DatasetError
from .images import load_image

IGNORE_INDEX = 255
BACKGROUND = "background"
COCO_SPLITS = {"test": ("val2017",), "train": ("train2017",), "all": ("val2017", "train2017")}
MOSAIC_SPLITS = ("test", "train")


class SegmentationDataset:
    """Images with per-pixel class indices. ``class_names[i]`` names index ``i``; ``background_index`` is the
    index of a background class (None when every pixel belongs to a named class); ``IGNORE_INDEX`` is never
    scored."""

    name: str = "segmentation"
    split: str = "test"
    class_names: list[str]
    background_index: int | None = None
    ignore_index: int = IGNORE_INDEX
    default_short_side: int | None = None  # the resize the set is evaluated at (None: each image's own size)

    def __len__(self) -> int:
        raise NotImplementedError

    def item_id(self, index: int) -> str:
        raise NotImplementedError

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def load_mask(self, index: int) -> np.ndarray:
        """(H, W) uint8 class indices of item ``index`` (``IGNORE_INDEX`` where not scored)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "items": len(self), "classes": len(self.class_names),
                "background_index": self.background_index, "ignore_index": self.ignore_index}


def _pycocotools():
    try:
        from pycocotools.coco import COCO
    except ImportError as exc:
        raise DatasetError("coco_mini_seg needs pycocotools (pip install pycocotools)") from exc
    return COCO


def coco_semantic_mask(coco, image_id: int, category_index: dict[int, int]) -> np.ndarray:
    """The semantic map of one COCO image (module docstring): 0 background, ``category_index[category_id]`` where
    one category's non-crowd annotations cover the pixel, ``IGNORE_INDEX`` on crowd regions and on pixels two
    different categories claim."""
    info = coco.imgs[image_id]
    out = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    claimed = np.zeros(out.shape, dtype=bool)
    crowd = np.zeros(out.shape, dtype=bool)
    conflict = np.zeros(out.shape, dtype=bool)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None)):
        mask = coco.annToMask(ann).astype(bool)
        if ann.get("iscrowd", 0):
            crowd |= mask
            continue
        index = category_index[ann["category_id"]]
        conflict |= mask & claimed & (out != index)
        out[mask & ~claimed] = index
        claimed |= mask
    out[crowd | conflict] = IGNORE_INDEX
    return out


class CocoSegmentation(SegmentationDataset):
    """``coco_mini_seg``: COCO instance annotations as COCO-Object semantic maps (module docstring)."""

    default_short_side = 448  # CLIP-DINOiser's COCO test scale (2048, 448), aspect kept

    def __init__(self, root: Path, split: str = "test"):
        if split not in COCO_SPLITS:
            raise DatasetError(f"coco_mini_seg has the splits {', '.join(COCO_SPLITS)}; got {split!r}")
        COCO = _pycocotools()
        self.root, self.split, self.name = Path(root), split, "coco_mini_seg"
        self._items: list[tuple[object, int, Path]] = []
        categories = None
        for part in COCO_SPLITS[split]:
            path = self.root / f"instances_{part}.json"
            if not path.is_file():
                raise DatasetError(f"coco_mini_seg: {path} not found (pass --data-root or set CLIPLAB_DATA)")
            coco = _quiet(COCO, path)
            cats = sorted(coco.cats.values(), key=lambda c: c["id"])
            if categories is None:
                categories = cats
            elif [c["id"] for c in cats] != [c["id"] for c in categories]:
                raise DatasetError(f"coco_mini_seg: {path} has other categories than the first annotation file")
            for image_id in sorted(coco.imgs):
                file = self.root / "images" / part / coco.imgs[image_id]["file_name"]
                if file.is_file():
                    self._items.append((coco, image_id, file))
        self.category_ids = [int(c["id"]) for c in categories]
        self.category_index = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.class_names = [BACKGROUND] + [str(c["name"]) for c in categories]
        self.background_index = 0
        if not self._items:
            raise DatasetError(f"coco_mini_seg: no annotated image found under {self.root / 'images'}")

    def __len__(self) -> int:
        return len(self._items)

    def item_id(self, index: int) -> str:
        return str(self._items[index][2].relative_to(self.root))

    def load_image(self, index: int) -> Image.Image:
        return load_image(self._items[index][2])

    def load_mask(self, index: int) -> np.ndarray:
        coco, image_id, _ = self._items[index]
        return coco_semantic_mask(coco, image_id, self.category_index)


def _quiet(COCO, path: Path):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its loading progress
        return COCO(str(path))


@dataclass(frozen=True)
class MosaicSpec:
    """How a mosaic set is drawn: ``count`` images of ``k`` x ``k`` tiles, tile indices drawn with ``seed``."""

    count: int = 200
    k: int = 2
    seed: int = 0


class MosaicSegmentation(SegmentationDataset):
    """``mosaic``: k x k CIFAR-10 tiles per image with their exact masks (module docstring)."""

    def __init__(self, tiles, split: str = "test", spec: MosaicSpec = MosaicSpec()):
        if spec.k < 1 or spec.count < 1:
            raise DatasetError(f"mosaic needs k >= 1 and count >= 1; got k={spec.k}, count={spec.count}")
        self.tiles, self.split, self.spec, self.name = tiles, split, spec, "mosaic"
        self.class_names = list(tiles.class_names)
        need = spec.count * spec.k * spec.k
        rng = np.random.default_rng([spec.seed, MOSAIC_SPLITS.index(split) if split in MOSAIC_SPLITS else 9])
        order = rng.permutation(len(tiles))
        if need > len(order):  # more tiles than images: draw again (an image may then repeat)
            order = np.concatenate([order, rng.integers(0, len(tiles), need - len(order))])
        self.tile_indices = order[:need].reshape(spec.count, spec.k, spec.k)
        self.tile_labels = np.asarray(tiles.labels)[self.tile_indices]
        self.tile_size = np.asarray(tiles.load_image(0)).shape[0]
        self.default_short_side = None

    def __len__(self) -> int:
        return self.spec.count

    def item_id(self, index: int) -> str:
        return f"mosaic-{self.split}-k{self.spec.k}-s{self.spec.seed}#{index}"

    def load_image(self, index: int) -> Image.Image:
        k, t = self.spec.k, self.tile_size
        out = np.zeros((k * t, k * t, 3), dtype=np.uint8)
        for r in range(k):
            for c in range(k):
                tile = np.asarray(self.tiles.load_image(int(self.tile_indices[index, r, c])).convert("RGB"))
                out[r * t:(r + 1) * t, c * t:(c + 1) * t] = tile
        return Image.fromarray(out)

    def load_mask(self, index: int) -> np.ndarray:
        t = self.tile_size
        return np.kron(self.tile_labels[index], np.ones((t, t), dtype=np.int64)).astype(np.uint8)


SEGMENTATION_SETS = {"coco_mini_seg": "COCO-2017 instance annotations of coco_mini as COCO-Object semantic maps "
                                      "(background + 80 classes; splits test = val2017, train, all)",
                     "mosaic": "k x k CIFAR-10 tiles with exact masks (test from CIFAR-10 test, train from train)"}


def segmentation_names() -> list[str]:
    return list(SEGMENTATION_SETS)


def load_segmentation(name: str, root: str | Path | None = None, split: str | None = None, *,
                      mosaic: MosaicSpec = MosaicSpec()) -> SegmentationDataset:
    """Segmentation set ``name`` (``coco_mini_seg`` | ``mosaic``) under the data root, one split (default test)."""
    from .registry import default_data_root, load_dataset

    key = str(name).lower().replace("-", "_")
    base = Path(root) if root is not None else default_data_root()
    split = split or "test"
    if key == "coco_mini_seg":
        return CocoSegmentation(base / "coco_mini" if (base / "coco_mini").is_dir() else base, split)
    if key == "mosaic":
        if split not in MOSAIC_SPLITS:
            raise DatasetError(f"mosaic has the splits {', '.join(MOSAIC_SPLITS)}; got {split!r}")
        return MosaicSegmentation(load_dataset("cifar10", root=base, split=split), split, mosaic)
    raise DatasetError(f"unknown segmentation dataset {name!r}; known: {', '.join(SEGMENTATION_SETS)}")
