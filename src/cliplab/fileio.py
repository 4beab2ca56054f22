"""File helpers shared by every layer: atomic writes (write, fsync, rename) and short stable digests."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def default_cache_root() -> Path:
    """``$CLIPLAB_CACHE``, else ``$XDG_CACHE_HOME/cliplab``, else ``~/.cache/cliplab``: features, models, onnx."""
    if os.environ.get("CLIPLAB_CACHE"):
        return Path(os.environ["CLIPLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cliplab"


def digest(*parts: str) -> str:
    """Short stable hash of strings (joined by newlines)."""
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:24]


def temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path`` unique to this process and call, for write-then-rename."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a temporary file, fsync it and rename it over ``path``: readers see all or nothing."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_save_npy(path: Path, array) -> Path:
    """Write ``array`` (as float32 .npy) to ``path`` atomically."""
    import numpy as np

    return atomic_write(path, lambda handle: np.save(handle, np.ascontiguousarray(array, dtype=np.float32)))


def atomic_write_text(path: Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
