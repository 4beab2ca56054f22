"""Safe image decoding: every file becomes an RGB image or an ImageDecodeError naming the reason."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError

_STUB_FORMATS = {"BUFR", "GRIB", "HDF5", "MPEG", "EPS", "WMF", "PDF"}  # need external handlers, or write-only
IMAGE_EXTENSIONS = frozenset(
    ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and fmt not in _STUB_FORMATS
) | {".jfif"}
BACKGROUND = (255, 255, 255)


def is_image_path(path: Path) -> bool:
    """True for file names with an image extension (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` to an RGB PIL image, or raise ImageDecodeError saying why.

    Handles: EXIF orientation; palette and alpha images (composited on white); 16-bit and 32-bit
    grayscale (scaled to 8 bits, not clipped); CMYK; 1-bit. Refuses: empty files, non-images,
    truncated or corrupt files, and images above Pillow's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS`` x 2, about 179 megapixels).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(str(path), "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(ImageOps.exif_transpose(image) or image)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(str(path), "file not found", permanent=False) from None
    except PermissionError as exc:
        raise ImageDecodeError(str(path), f"permission denied ({exc.strerror})", permanent=False) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(str(path), "not an image (unrecognised content)") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(str(path), f"too large, refused by the decompression-bomb guard: {exc}") from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(str(path), f"truncated or corrupt: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:  # an operating-system error (I/O, too many open files), not the content
            raise ImageDecodeError(str(path), f"could not read: {exc.strerror}", permanent=False) from None
        raise ImageDecodeError(str(path), f"truncated or corrupt: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping high-bit-depth data."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _scale_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit-depth intensities to 0..255: 16-bit and 32-bit integers by 65535, floats by 1 or 255."""
    top = 65535.0
    if mode == "F":
        top = 1.0 if float(array.max(initial=0)) <= 1.0 else 255.0
    return np.clip(np.rint(array.astype(np.float64) / top * 255.0), 0, 255).astype(np.uint8)
