"""Uploaded images: read, decoded and reduced to the model's input inside one bounded section.

An upload's bytes are read, decoded by PIL (only ``UPLOAD_FORMATS``, a pixel-count guard, ``verify()``, JPEG
draft-mode downscaling) and passed through the model's preprocessing while the request holds a decoding slot
(at most ``DECODE_SLOTS`` at once) and its share of a pixel budget (at most ``PIXELS_IN_FLIGHT`` decoded
pixels held by all uploads together). What leaves the section is the model's input tensor (3 x side x side),
so uploads waiting for the model hold kilobytes, not decoded pictures: memory stays flat whatever the number
of concurrent requests. At most ``MAX_WAITING`` uploads queue for a slot; more are answered 503 with
``Retry-After``. So that freed pictures go back to the system instead of staying in glibc's per-thread arenas,
the service fixes glibc's mmap threshold at 1 MiB (``map_large_buffers``) and a large decode is followed by
``malloc_trim``.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import threading
import warnings
from collections.abc import Callable, Iterator

from fastapi import HTTPException, UploadFile
from PIL import Image, ImageOps

# An upload with more pixels is refused before it is decoded (413). 24 Mpx admits full-size photos of common
# cameras (6000x4000); one decoded picture is then at most about 96 MB (PIL keeps RGB as 4 bytes a pixel).
MAX_PIXELS = 24_000_000
UPLOAD_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")  # the only decoders PIL may run on an upload
FORMATS_HINT = "upload a JPEG, PNG, GIF, WebP or BMP file"
DECODE_SLOTS = 3  # uploads read, decoded and preprocessed at the same time (the others wait): bounds CPU
PIXELS_IN_FLIGHT = 32_000_000  # decoded pixels held at once by all uploads (one larger picture runs alone)
MAX_WAITING = 64  # uploads queued for a slot; one more is answered 503 (try again)
DRAFT_SIDE = 512  # JPEGs are decoded at the smallest 1/2, 1/4, 1/8 scale keeping both sides >= this
TRIM_PIXELS = 1_000_000  # after a decode of at least this many pixels, freed memory is handed back (malloc_trim)
MMAP_THRESHOLD = 1 << 20  # allocations this large are mapped on their own and returned when freed (glibc)
CHUNK = 1 << 20


def _fail(status: int, detail: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=detail, headers=headers)


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


class UploadGate:
    """Slots for the decoding section and a budget of decoded pixels, with a bounded queue (503 beyond it)."""

    def __init__(self, slots: int = DECODE_SLOTS, pixels: int = PIXELS_IN_FLIGHT, waiting: int = MAX_WAITING):
        self.slots, self.budget, self.waiting = slots, pixels, waiting
        self._condition = threading.Condition()
        self._busy = self._queued = self._held = 0
        self.peak_pixels = 0  # the most decoded pixels held at once (for tests and benchmarks)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one decoding slot; 503 when ``waiting`` requests already queue for one."""
        with self._condition:
            if self._busy >= self.slots and self._queued >= self.waiting:
                raise _fail(503, "the server is busy with other uploads; try again in a moment",
                            {"Retry-After": "1"})
            self._queued += 1
            try:
                self._condition.wait_for(lambda: self._busy < self.slots)
            finally:
                self._queued -= 1
            self._busy += 1
        try:
            yield
        finally:
            with self._condition:
                self._busy -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def pixels(self, count: int) -> Iterator[None]:
        """Hold ``count`` decoded pixels of the budget (a picture larger than the budget waits to run alone)."""
        with self._condition:
            self._condition.wait_for(lambda: self._held == 0 or self._held + count <= self.budget)
            self._held += count
            self.peak_pixels = max(self.peak_pixels, self._held)
        try:
            yield
        finally:
            with self._condition:
                self._held -= count
                self._condition.notify_all()
            if count >= TRIM_PIXELS:
                release_free_memory()


GATE = UploadGate()


def release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``); a no-op elsewhere."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(ctypes.c_size_t(0))


def map_large_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc map every allocation of ``threshold`` bytes or more on its own, and unmap it when freed.

    glibc's default threshold rises after the first large free; decoded pictures then come from per-thread
    arenas and stay there when freed (measured: 12 threads decoding 4 Mpx PNGs left +190 MB after they ended,
    which ``malloc_trim`` did not return; with a fixed 1 MiB threshold, +3 MB). Process-wide; the service
    sets it in ``create_app``. False where it cannot (not glibc)."""
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(threshold)))


def _libc():
    try:
        return ctypes.CDLL(None)
    except OSError:  # pragma: no cover - no C library to load (not a POSIX system)
        return None


_LIBC = _libc()
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The uploaded file's bytes, read in chunks; 413 as soon as it passes ``limit``, 400 when it is empty."""
    chunks, total = [], 0
    upload.file.seek(0)
    while chunk := upload.file.read(CHUNK):
        total += len(chunk)
        if total > limit:
            raise _fail(413, f"upload larger than the {_mib(limit)} limit")
        chunks.append(chunk)
    if not total:
        raise _fail(400, "the uploaded file is empty")
    return b"".join(chunks)


@contextlib.contextmanager
def _decoding_errors() -> Iterator[None]:
    """PIL's many failures as one-line 413 / 415 answers."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except HTTPException:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(413, f"image too large: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise _fail(415, f"not an image in an accepted format; {FORMATS_HINT}") from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error...) on bad files
        raise _fail(415, f"not a readable image ({type(exc).__name__}: {str(exc)[:200]}); {FORMATS_HINT}") from exc


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The upload opened (not yet decoded): accepted format, pixel guard (413), ``verify()``, JPEG draft
    scale chosen (``size`` is then what will be decoded)."""
    probe = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    width, height = probe.size
    if width * height > max_pixels:
        raise _fail(413, f"image too large: {width}x{height} pixels (limit {max_pixels:,} pixels)")
    probe.verify()
    image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    if image.format == "JPEG" and min(width, height) >= 2 * DRAFT_SIDE:
        image.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))  # DCT scaling: a fraction of the work and memory
    return image


def _load(image: Image.Image) -> Image.Image:
    """Decode an opened image to RGB, EXIF-rotated, without spare copies."""
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    with _decoding_errors():
        return _load(_open(data, max_pixels))


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode untrusted bytes to an RGB image: only ``UPLOAD_FORMATS`` (else 415), pixel guard (413),
    ``verify()``, JPEG draft downscaling, EXIF rotation; at most ``DECODE_SLOTS`` decodes at once."""
    with GATE.slot():
        return _decode(data, max_pixels)


def prepare_upload(upload: UploadFile, limit: int, transform: Callable, max_pixels: int = MAX_PIXELS):
    """The uploaded image as the model's input: ``transform(picture)`` (the backbone's preprocessing), read,
    decoded and transformed inside a decoding slot and the pixel budget; only the result leaves it."""
    with GATE.slot():
        data = read_upload(upload, limit)
        with _decoding_errors():
            image = _open(data, max_pixels)
        with GATE.pixels(image.width * image.height):
            with _decoding_errors():
                picture = _load(image)
            del image, data
            try:
                return transform(picture)
            finally:
                picture.close()
                del picture
