"""Any registered dense method over images of any size, with memory bounded by the window, not the image.

For one image: resize with the aspect kept so the shorter side is ``short_side`` pixels (sides rounded to whole
patches, at least one window: ``cliplab.models.dense.input_size``), cut windows of the model's input size every
``stride`` pixels (the last flush with the edge), run the method on at most ``window_batch`` windows at a time
and add each window's (C, h, w) class probabilities into one (C, H/p, W/p) grid with a count per patch; the mean
over the windows covering a patch is its score. The grid is then upsampled bilinearly (``align_corners=False``)
to the original image size, in strips of rows computed separably so no (C, H, W) array is ever held, and each
pixel takes its arg-max class; where ``background_threshold`` is set, a pixel whose highest probability is below
it becomes the background label.

Departure from mmseg's ``slide_inference`` (what MaskCLIP and CLIP-DINOiser evaluate with): mmseg upsamples each
window's scores to the window's pixels, averages the overlapping windows per pixel and resizes the whole map to
the original size; here the windows are averaged per patch (windows start at whole patches, so each patch is
covered by whole windows) and upsampled once. The two agree where one window covers the image, and differ only in
the bilinear blending at window borders otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import CliplabError
from ..models.dense import DenseSpec, dense_tower, dense_transform, window_starts
from .base import DenseContext
from .registry import create_dense

BACKGROUND = "background"
STRIP_FLOATS = 1 << 21  # the upsampling works on at most this many floats (C x rows x W) at a time: 8 MB


@dataclass(frozen=True)
class SegmentSettings:
    """``short_side``: the resize's shorter side in pixels (None: the model's input size; ``keep_size``: each
    image's own); ``stride``: the sliding
    step in pixels, a multiple of the patch (None: half the window, in whole patches); ``window_batch``: windows
    run at a time; ``background_threshold``: pixels whose best class probability is below it become background."""

    short_side: int | None = None
    stride: int | None = None
    window_batch: int = 8
    background_threshold: float | None = None
    keep_size: bool = False  # True: each image at its own size (rounded to whole patches), ``short_side`` unused

    def __post_init__(self):
        if self.window_batch < 1:
            raise CliplabError(f"window batch must be at least 1; got {self.window_batch}")
        t = self.background_threshold
        if t is not None and not 0.0 <= t <= 1.0:
            raise CliplabError(f"--background-threshold must lie in [0, 1] (a class probability); got {t}")


@dataclass
class Segmentation:
    """One image's result: ``labels`` (H, W) indices into ``class_names``; ``input_size`` the resized (h, w)."""

    labels: np.ndarray
    class_names: list[str]
    input_size: tuple[int, int]
    windows: int
    areas: dict[str, int] = field(default_factory=dict)


def bilinear_weights(out_size: int, in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (i0, i1) and weight of i1 for each output position of a 1-D bilinear resize with
    ``align_corners=False``, as ``torch.nn.functional.interpolate`` computes them (negative sources clamped to 0)."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, (src - i0).float()


def upsample_argmax(grid: torch.Tensor, size: tuple[int, int], background_threshold: float | None = None,
                    background_label: int | None = None, strip_floats: int = STRIP_FLOATS) -> np.ndarray:
    """Arg-max class of the bilinear upsampling of ``grid`` (C, h, w) to ``size`` (H, W), in strips of rows; the
    same as ``interpolate(grid[None], size, mode="bilinear", align_corners=False)[0].argmax(0)`` without holding
    the (C, H, W) array. Pixels whose maximum is below ``background_threshold`` get ``background_label``."""
    classes, h, w = grid.shape
    height, width = size
    r0, r1, rw = bilinear_weights(height, h)
    c0, c1, cw = bilinear_weights(width, w)
    dtype = np.uint8 if classes < 255 else np.int32
    out = np.empty((height, width), dtype=dtype)
    rows = max(1, strip_floats // max(1, classes * width))
    for top in range(0, height, rows):
        sl = slice(top, min(height, top + rows))
        lo, hi = int(r0[sl].min()), int(r1[sl].max()) + 1  # the grid rows this strip reads
        part = grid[:, lo:hi]
        across = part[:, :, c0] * (1 - cw) + part[:, :, c1] * cw  # (C, hi - lo, W)
        wgt = rw[sl].view(1, -1, 1)
        strip = across[:, r0[sl] - lo] * (1 - wgt) + across[:, r1[sl] - lo] * wgt  # (C, rows, W)
        best, labels = strip.max(dim=0)
        if background_threshold is not None:
            labels[best < background_threshold] = background_label
        out[sl] = labels.numpy().astype(dtype)
    return out


class Segmenter:
    """A dense method set up for one backbone and label set: ``segment(image) -> Segmentation``.

    ``class_names`` are the labels; ``background_index`` names one of them as background (a dataset's background
    class), or None. With ``settings.background_threshold`` the background is not a text class: the method scores
    the other classes and low-confidence pixels become background (``background_index``, else a ``background``
    label appended at the end). Without it every name, ``background`` included, is a text class. ``synonyms``
    (``{class: [names]}``) replaces the text weights by GKC's synonym classifier (``cliplab.dense.gkc``).
    """

    def __init__(self, backbone, method: str, class_names: list[str], *, templates="imagenet7",
                 params: dict | None = None, settings: SegmentSettings = SegmentSettings(),
                 background_index: int | None = None, guidance=None, cache_dir=None, synonyms=None):
        from ..features.text import class_weights

        self.backbone, self.settings = backbone, settings
        self.method = create_dense(method, **(params or {}))
        names = list(class_names)
        threshold = settings.background_threshold
        if threshold is not None and background_index is None:
            names.append(BACKGROUND)
            background_index = len(names) - 1
        self.class_names, self.background_index = names, background_index
        self.scored = [i for i in range(len(names)) if threshold is None or i != background_index]
        if not self.scored:
            raise CliplabError("nothing to segment: the only class is the background")
        self.tower = dense_tower(backbone)
        self._transforms: dict[int | None, object] = {}
        self.stride = _stride(self.tower, settings.stride)
        needs = self.method.needs
        weights = None
        if "text_weights" in needs and synonyms:  # GKC's synonym classifier, for any method (dense/gkc.py)
            from .gkc import synonym_classifier

            weights = torch.from_numpy(synonym_classifier(backbone, [names[i] for i in self.scored], synonyms,
                                                          templates, cache_dir=cache_dir).weights)
        elif "text_weights" in needs:
            weights = torch.from_numpy(class_weights(backbone, [names[i] for i in self.scored], templates,
                                                     cache_dir=cache_dir))
        self.method.setup(DenseContext(backbone, [names[i] for i in self.scored],
                                       text_weights=weights,
                                       tower=self.tower if "tower" in needs else None,
                                       guidance=guidance if "guidance" in needs else None,
                                       cache_dir=cache_dir))

    @torch.no_grad()
    def score_grid(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(C_scored, H/p, W/p) mean window probabilities of one preprocessed image (3, H, W), and the window
        count."""
        (wh, ww), (ph, pw) = self.tower.image_size, self.tower.patch
        height, width = tensor.shape[-2:]
        offsets = [(t, left) for t in window_starts(height, wh, self.stride)
                   for left in window_starts(width, ww, self.stride)]
        total = count = None
        model = self.backbone.model
        training = model.training
        model.eval()
        try:
            for start in range(0, len(offsets), self.settings.window_batch):
                chunk = offsets[start:start + self.settings.window_batch]
                batch = torch.stack([tensor[:, t:t + wh, left:left + ww] for t, left in chunk])
                scores = self.method.patch_scores(batch.to(self.backbone.device, torch.float32)).float().cpu()
                if total is None:
                    total = torch.zeros((scores.shape[1], height // ph, width // pw))
                    count = torch.zeros((1, height // ph, width // pw))
                for (t, left), s in zip(chunk, scores):
                    total[:, t // ph:(t + wh) // ph, left // pw:(left + ww) // pw] += s
                    count[:, t // ph:(t + wh) // ph, left // pw:(left + ww) // pw] += 1
        finally:
            model.train(training)
        return total / count, len(offsets)

    def transform(self, image: Image.Image) -> torch.Tensor:
        """The preprocessed (3, H, W) input of ``image``: aspect kept, whole patches, at least one window."""
        short = min(image.size) if self.settings.keep_size else self.settings.short_side
        if short not in self._transforms:
            spec = DenseSpec(input="sliding", resolution=short, stride=self.settings.stride)
            self._transforms[short] = dense_transform(self.backbone, spec)
        return self._transforms[short](image)

    def segment(self, image: Image.Image) -> Segmentation:
        tensor = self.transform(image)
        grid, windows = self.score_grid(tensor)
        threshold = self.settings.background_threshold
        scored = upsample_argmax(grid, (image.size[1], image.size[0]), threshold,
                                 None if threshold is None else -1)
        labels = _remap(scored, self.scored, self.background_index)
        counts = _areas(labels, len(self.class_names))
        areas = {name: int(counts[i]) for i, name in enumerate(self.class_names)}
        return Segmentation(labels, self.class_names, tuple(tensor.shape[-2:]), windows, areas)


def _remap(scored: np.ndarray, classes: list[int], background: int | None) -> np.ndarray:
    """Indices into the scored classes (-1, stored as the dtype's maximum in uint8, = background) -> indices into
    all names, through a lookup table (one output array, no wider copy of the image)."""
    if scored.dtype == np.uint8:
        table = np.full(256, background if background is not None else 0, dtype=np.uint8)
        table[:len(classes)] = classes
        return table[scored]
    table = np.asarray(classes + [background if background is not None else 0], dtype=np.int32)
    return table[np.where((scored < 0) | (scored >= len(classes)), len(classes), scored)]


def _areas(labels: np.ndarray, count: int, rows: int = 256) -> np.ndarray:
    """Pixels per label, counted a block of rows at a time (no int64 copy of the whole map)."""
    total = np.zeros(count, dtype=np.int64)
    for top in range(0, labels.shape[0], rows):
        total += np.bincount(labels[top:top + rows].ravel(), minlength=count)[:count]
    return total


def _stride(tower, stride: int | None) -> int:
    patch = tower.patch[0]
    if stride is None:
        return max(patch, (min(tower.image_size) // 2) // patch * patch)
    if stride % patch or tower.patch[0] != tower.patch[1]:
        raise CliplabError(f"sliding stride {stride} is not a multiple of the patch size {patch}")
    return stride


def window_count(size: tuple[int, int], window: tuple[int, int], stride: int) -> int:
    """How many windows cover an image of ``size`` (h, w) pixels."""
    return math.prod(len(window_starts(s, w, stride)) for s, w in zip(size, window))
