"""The index a running service answers from, reloaded when ``cliplab index update`` (or a build) publishes a new
one.

``cliplab index build/update`` publish a finished folder with renames, the manifest last, so a published index
is always whole. Each request takes a snapshot (``LiveIndex.current()``): one ``stat`` of ``manifest.json``
tells whether a new version was published since the snapshot was loaded (another file: inode, size or time
differ). If so, one request opens it (the others keep answering from the loaded one meanwhile) and swaps the
snapshot in one assignment; requests already running finish on the snapshot they took, which stays usable
(its FAISS index is in memory, its SQLite file stays open after the old folder is deleted) until the last of
them lets go of it. A new version that cannot be served (damaged, or built with another model) is not loaded:
the service keeps answering from the previous one and ``/healthz`` reports why, until a later version loads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CliplabError
from .files import ImageFiles

MANIFEST = "manifest.json"
LOG = logging.getLogger("cliplab.service")


@dataclass
class Snapshot:
    """One loaded version of the index and what requests need with it."""

    index: object  # cliplab.search.SearchIndex
    build_id: str  # identifies this version (ETags change with it)
    files: ImageFiles  # how its image files are served
    root: str | None  # the indexed folder names are shown relative to
    lock: threading.Lock = field(default_factory=threading.Lock)  # its FAISS index and SQLite rows


def build_id(index) -> str:
    """What identifies this build of the index: its manifest's digest (ids are reassigned by a rebuild)."""
    try:
        return hashlib.sha256((Path(index.root) / MANIFEST).read_bytes()).hexdigest()[:16]
    except OSError:
        return hashlib.sha256(repr(sorted((getattr(index, "manifest", None) or {}).items())).encode()).hexdigest()[:16]


def _stamp(folder: Path) -> tuple | None:
    try:
        facts = os.stat(folder / MANIFEST)
    except OSError:  # between the two renames of a publish, or removed: nothing new to load yet
        return None
    return facts.st_dev, facts.st_ino, facts.st_size, facts.st_mtime_ns


class LiveIndex:
    """The current ``Snapshot`` of the index in ``index_dir``, queried with ``backbone``."""

    def __init__(self, index_dir, backbone):
        self.folder = Path(index_dir)
        self.backbone = backbone
        self.error: str | None = None  # set while the newest published version is not the one served
        self.loads = 0
        self._reloading = threading.Lock()
        self._stamp = _stamp(self.folder)
        self._snapshot = self._load()  # a missing, broken or other-model index raises here

    def _load(self) -> Snapshot:
        from ..search import SearchIndex

        index = SearchIndex.open(self.folder)
        try:
            index.check_model(self.backbone)
            files = ImageFiles.for_index(index)
        except BaseException:
            index.close()
            raise
        source = (getattr(index, "manifest", None) or {}).get("source") or {}
        root = source.get("location") if source.get("kind") == "folder" else None
        self.loads += 1
        return Snapshot(index, build_id(index), files, root)

    def current(self) -> Snapshot:
        """The snapshot to answer this request from: the newest published version that could be loaded."""
        stamp = _stamp(self.folder)
        if stamp is None or stamp == self._stamp or not self._reloading.acquire(blocking=False):
            return self._snapshot
        try:
            stamp = _stamp(self.folder)
            if stamp is not None and stamp != self._stamp:
                try:
                    self._snapshot = self._load()
                    self.error = None
                except (CliplabError, OSError, RuntimeError) as exc:  # the error may name folders: logged only
                    self.error = "a newer version of the index could not be loaded; the server's log says why"
                    LOG.warning("%s: still serving the previous index version: %s", self.folder,
                                str(exc).splitlines()[0][:500])
                self._stamp = stamp  # tried: the next attempt waits for the next published version
        finally:
            self._reloading.release()
        return self._snapshot
