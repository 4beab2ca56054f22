"""Common corruptions at five severities, after ImageNet-C (paper 11: Hendrycks & Dietterich, ICLR 2019).

Severity parameters are those of the authors' ``ImageNet-C/create_c/make_imagenet_c.py``
(github.com/hendrycks/robustness); the operations are re-written with numpy, scipy and PIL:

- ``gaussian_noise``: ``clip(x + N(0, c^2))``, x in [0, 1], c = .08 .12 .18 .26 .38.
- ``gaussian_blur``: Gaussian filter of std ``c * s / 224`` pixels (s = the image's shorter side), c = 1 2 3 4 6;
  per channel, edges replicated, kernel truncated at 4 std (scikit-image's ``gaussian``, which the authors call).
- ``jpeg_compression``: PIL JPEG encode/decode at quality c = 25 18 15 10 7.
- ``contrast``: ``clip((x - m) * c + m)``, m the per-channel mean over the image, c = .4 .3 .2 .1 .05.
- ``brightness``: HSV value ``V -> min(V + c, 1)`` with hue and saturation kept, c = .1 .2 .3 .4 .5. As hue and
  saturation are kept, HSV -> RGB scales each pixel by ``V' / V`` (a black pixel becomes grey ``c``): that
  closed form is computed directly instead of a round trip through HSV.
- ``pixelate``: BOX-resize to ``int(c * W) x int(c * H)`` and BOX-resize back, c = .6 .5 .4 .3 .25.

Departures from the authors' code, all for images that are not 224 x 224:

- ImageNet-C corrupts 224 x 224 centre crops. Only the blur has a size in pixels, so its std is scaled by
  ``s / 224`` (a CIFAR image, s = 32, gets std c / 7: 0.14 ... 0.86 pixels; CIFAR-10-C's own choice is
  0.4 ... 1). Pixelate's factor is relative already (the authors' ``224 * c`` becomes ``W * c``, ``H * c``).
  Noise, JPEG, contrast and brightness act per pixel and need no scaling.
- Results are rounded to uint8 (the authors truncate with ``np.uint8`` and then save a JPEG at quality 85, which
  re-compresses every corruption; here nothing is re-encoded).
- Noise comes from ``numpy.random.default_rng(seed)``, so a (image, severity, seed) triple always gives the
  same picture; :class:`CorruptedDataset` derives one seed per item from its seed and the item's base cache identity.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from ..errors import CliplabError
from .base import ImageDataset

REFERENCE_SIZE = 224  # ImageNet-C corrupts 224 x 224 crops; pixel sizes are scaled by (shorter side) / 224
VERSION = "1"  # part of every corrupted item's cache identity: bump when an operation changes

CORRUPTIONS: Mapping[str, tuple] = MappingProxyType({
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # noise std on [0, 1]
    "gaussian_blur": (1, 2, 3, 4, 6),  # std in pixels at 224 x 224
    "jpeg_compression": (25, 18, 15, 10, 7),  # JPEG quality
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # factor towards the mean
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to the HSV value
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),  # resize factor
})
SEVERITIES = (1, 2, 3, 4, 5)


def corruption_parameter(name: str, severity: int):
    """The ImageNet-C parameter ``c`` of corruption ``name`` at ``severity`` (1..5); CliplabError otherwise."""
    if name not in CORRUPTIONS:
        raise CliplabError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise CliplabError(f"corruption severity must be an integer 1..5, got {severity!r}")
    return CORRUPTIONS[name][int(severity) - 1]


def _to_uint8(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")


def corrupt(image: Image.Image, name: str, severity: int, seed: int = 0) -> Image.Image:
    """``image`` (converted to RGB) under corruption ``name`` at ``severity`` 1..5; same size, RGB.

    Deterministic: only ``gaussian_noise`` draws random numbers, from ``numpy.random.default_rng(seed)``.
    """
    c = corruption_parameter(name, severity)
    image = image.convert("RGB")
    width, height = image.size
    if name == "jpeg_compression":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(c))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return decoded.convert("RGB")
    if name == "pixelate":
        small = (max(1, int(width * c)), max(1, int(height * c)))
        return image.resize(small, Image.Resampling.BOX).resize((width, height), Image.Resampling.BOX)
    x = np.asarray(image, dtype=np.float64) / 255.0
    if name == "gaussian_noise":
        rng = np.random.default_rng(seed)
        return _to_uint8(x + rng.normal(0.0, c, size=x.shape))
    if name == "gaussian_blur":
        sigma = c * min(width, height) / REFERENCE_SIZE
        return _to_uint8(gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0))
    if name == "contrast":
        means = x.mean(axis=(0, 1), keepdims=True)
        return _to_uint8((x - means) * c + means)
    if name == "brightness":
        value = x.max(axis=2, keepdims=True)  # HSV value
        brighter = np.minimum(value + c, 1.0)
        scale = np.divide(brighter, value, out=np.zeros_like(value), where=value > 0)
        return _to_uint8(np.where(value > 0, x * scale, brighter))
    raise AssertionError(name)  # pragma: no cover - every name in CORRUPTIONS is handled above


def item_seed(seed: int, identity: str) -> int:
    """The noise seed of the item with cache ``identity`` in a dataset corrupted with ``seed``.

    A function of the identity (not the index), so one image gets the same noise in any subset or order, and
    a cached feature always matches the image that :meth:`CorruptedDataset.load_image` gives.
    """
    return int.from_bytes(hashlib.sha256(f"{int(seed)}|{identity}".encode()).digest()[:8], "little")


class CorruptedDataset(ImageDataset):
    """``dataset`` with every image corrupted on load (:func:`corrupt`); same items, labels and class names.

    ``identity(i)`` adds the corruption, severity, seed and :data:`VERSION` to the base identity, so the
    feature cache keeps clean and corrupted features apart.
    """

    def __init__(self, dataset: ImageDataset, name: str, severity: int, seed: int = 0):
        corruption_parameter(name, severity)
        self.dataset = dataset
        self.corruption, self.severity, self.seed = name, int(severity), int(seed)
        self.labels = dataset.labels
        self.class_names = dataset.class_names
        self.name = dataset.name
        self.split, self.split_info = dataset.split, dataset.split_info
        self.captions = dataset.captions

    @property
    def skipped(self):
        return self.dataset.skipped

    def item_id(self, index: int) -> str:
        return self.dataset.item_id(index)

    def identity(self, index: int) -> str:
        return (f"{self.dataset.identity(index)}|corrupt-v{VERSION}:{self.corruption}:{self.severity}"
                f":seed{self.seed}")

    def load_image(self, index: int) -> Image.Image:
        image = self.dataset.load_image(index)
        return corrupt(image, self.corruption, self.severity, item_seed(self.seed, self.dataset.identity(index)))
