"""Indexed image files as the service may serve them: regular image files still inside the indexed folder.

The check runs at request time on the file as it is now, not as it was indexed: the stored path is resolved
(symlinks followed, ``..`` removed) and must lie inside the resolved indexed folder; the file is opened without
following a final symlink, must be a regular file (not a device, FIFO or folder), and on Linux the opened file's
own path (``/proc/self/fd``) is checked again, so a link swapped in between the check and the open is caught.
Its bytes must be an image PIL can identify and ``verify()``; the answer streams from that same open file.

The indexed folder is the source folder of a folder build, the manifest's folder for a manifest build (rows with
``../`` or absolute paths outside it are refused), and the common folder of the indexed files otherwise (named
datasets, parquet shards). An index built with ``serve_outside`` (``cliplab index build --serve-outside``)
lets links and rows lead outside that folder; each file must then still be a regular image file with the size
and modification time it was indexed with, so a link swapped to another file is refused.
"""

from __future__ import annotations

import io
import os
import stat as stat_module
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

STREAM_CHUNK = 1 << 16
_PROC_FD = Path("/proc/self/fd")


class NotServed(Exception):
    """A file the service will not serve: ``status`` (403 refused, 404 gone) and a one-line ``reason``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class OpenedImage:
    """An image file opened for serving: its handle (at offset 0), ``fstat`` and media type."""

    handle: BinaryIO
    stat: os.stat_result
    media_type: str

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes in chunks; closes the handle at the end."""
        try:
            while chunk := self.handle.read(STREAM_CHUNK):
                yield chunk
        finally:
            self.handle.close()

    def close(self) -> None:
        self.handle.close()


def indexed_folder(manifest: dict, paths: Iterable[str] = ()) -> Path | None:
    """The folder an index covers: its source folder, a manifest's folder, else the common folder of
    ``paths`` (the indexed files); None when there are no files."""
    source = manifest.get("source") or {}
    kind, location = source.get("kind"), source.get("location")
    if location and kind in ("folder", "dataset-object"):
        return Path(location)
    if location and kind == "dataset":
        return Path(location).parent
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths if p}
    if not folders:
        return None
    try:
        return Path(os.path.commonpath(sorted(folders)))
    except ValueError:  # different drives (Windows)
        return None


def _resolved(path: str) -> str:
    """``path`` with every symlink followed and ``..`` removed."""
    return os.path.realpath(path)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _opened_path(fd: int) -> str | None:
    """The path the kernel gives the open file ``fd`` (Linux), or None where it cannot tell."""
    try:
        return os.readlink(_PROC_FD / str(fd))
    except OSError:
        return None


class ImageFiles:
    """Opens indexed image files for serving under the rules in the module docstring."""

    def __init__(self, root: Path | None, serve_outside: bool = False):
        self.root = root
        self.real_root = _resolved(str(root)) if root is not None else None
        self.serve_outside = bool(serve_outside)

    @classmethod
    def for_index(cls, index) -> ImageFiles:
        """The rules for an open ``SearchIndex`` (its manifest's source and ``serve_outside`` flag)."""
        manifest = getattr(index, "manifest", None) or {}
        source = manifest.get("source") or {}
        paths: Iterable[str] = ()
        if not source.get("location") or source.get("kind") not in ("folder", "dataset-object", "dataset"):
            paths = (row.path for row in index._store.all_items())
        return cls(indexed_folder(manifest, paths), bool(manifest.get("serve_outside", False)))

    def open(self, stored_path: str, size: int | None = None, mtime: float | None = None) -> OpenedImage:
        """Open the file stored as ``stored_path`` (with the indexed ``size`` and ``mtime``) for serving, or
        raise ``NotServed``."""
        if not stored_path:
            raise NotServed(404, "is not a file")
        real = _resolved(os.path.abspath(stored_path))
        if not self.serve_outside and not self._inside(real):
            raise NotServed(403, "its file lies outside the indexed folder (a symlink or a ../ path leads out); "
                                 "not served unless the index was built with --serve-outside")
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise NotServed(404, "is no longer on disk; run `cliplab index update`") from None
        except OSError:  # ELOOP: a symlink swapped in after the path was resolved; EACCES, EISDIR...
            raise NotServed(403, "its file cannot be opened as a regular file inside the indexed folder") from None
        facts = os.fstat(fd)
        if not stat_module.S_ISREG(facts.st_mode):  # a folder, FIFO, device or socket
            os.close(fd)
            raise NotServed(403, "its file is not a regular file")
        handle = os.fdopen(fd, "rb")
        try:
            if not self.serve_outside:
                where = _opened_path(fd)
                if where is not None and not self._inside(where):
                    raise NotServed(403, "its file lies outside the indexed folder (changed while opening)")
            elif size is not None and mtime is not None and (facts.st_size != size or facts.st_mtime != mtime):
                raise NotServed(404, "changed since it was indexed; run `cliplab index update`")
            media_type = _image_type(fd)
            handle.seek(0)
            return OpenedImage(handle, facts, media_type)
        except BaseException:
            handle.close()
            raise

    def _inside(self, real: str) -> bool:
        return self.real_root is not None and _inside(real, self.real_root)


def _image_type(fd: int) -> str:
    """The media type of the image in open file ``fd`` (identified and verified by PIL); NotServed otherwise."""
    reader = io.BufferedReader(io.FileIO(fd, "rb", closefd=False))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(reader)
            kind = image.format
            image.verify()
    except Exception:  # PIL raises many types on files that are not images
        raise NotServed(404, "is no longer a readable image file") from None
    finally:
        reader.close()
    return Image.MIME.get(kind or "", "application/octet-stream")
