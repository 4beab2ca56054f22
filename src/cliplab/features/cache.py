"""FeatureCache: an atomic, resumable, multi-process-safe store of embeddings on disk.

Layout of one cache space (one model + one preprocessing)::

    <root>/<space>/meta.json          model id, preprocessing, dimension
    <root>/<space>/index.sqlite       identity -> (shard, row); identity -> failure reason
    <root>/<space>/shards/<uuid>.npy  float32 (k, d) blocks, each written once, atomically
    <root>/<space>/views/<key>.npy    a dataset's features in dataset order, read memory-mapped
    <root>/<space>/views/<key>.json   which dataset items those rows are, and which items failed

A shard is renamed into place before its rows are registered, so a crash leaves at worst an
unregistered shard (ignored) and never a registered row without data. SQLite in WAL mode with
``INSERT OR IGNORE`` lets several processes fill one space at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import numpy as np

from ..errors import CacheError, DimensionMismatchError
from ..fileio import atomic_save_npy, atomic_write_text, temporary_name

SQL_BATCH = 500
VIEW_MAX_AGE = 30 * 24 * 3600.0  # stored views unused this long are removed by collect_garbage
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (identity TEXT PRIMARY KEY, shard TEXT NOT NULL, row INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS failures (identity TEXT PRIMARY KEY, reason TEXT NOT NULL);
"""


def default_cache_root() -> Path:
    """``$CLIPLAB_CACHE``, else ``$XDG_CACHE_HOME/cliplab``, else ``~/.cache/cliplab``."""
    if os.environ.get("CLIPLAB_CACHE"):
        return Path(os.environ["CLIPLAB_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "cliplab"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where feature spaces live: ``cache_dir`` as given, else ``<default cache root>/features``."""
    return Path(cache_dir) if cache_dir is not None else default_cache_root() / "features"


def cache_spaces(root: str | Path) -> list[FeatureCache]:
    """Every cache space under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [FeatureCache(root, p.name) for p in sorted(root.iterdir()) if (p / "index.sqlite").is_file()]


class FeatureCache:
    """One cache space, keyed by ``space`` (derived from model id + preprocessing or modality)."""

    def __init__(self, root: str | Path, space: str, meta: dict | None = None):
        self.dir = Path(root) / space
        self.space = space
        (self.dir / "shards").mkdir(parents=True, exist_ok=True)
        (self.dir / "views").mkdir(exist_ok=True)
        self._write_meta(meta or {})
        with closing(self._connect()) as db, db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.dir / "index.sqlite", timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _write_meta(self, meta: dict) -> None:
        path = self.dir / "meta.json"
        if path.exists() or not meta:
            return
        atomic_write_text(path, json.dumps(meta, indent=2))

    @property
    def meta(self) -> dict:
        path = self.dir / "meta.json"
        return json.loads(path.read_text()) if path.exists() else {}

    # -- writing -------------------------------------------------------------------------
    def add(self, identities: Sequence[str], features: np.ndarray, failures: dict[str, str] | None = None) -> None:
        """Store ``features[i]`` for ``identities[i]`` (one new shard) and record failures."""
        if len(identities) != len(features):
            raise CacheError(f"{len(identities)} identities for {len(features)} feature rows")
        self._check_dim(features)
        rows = []
        if len(identities):
            shard = f"{uuid.uuid4().hex}.npy"
            atomic_save_npy(self.dir / "shards" / shard, features)
            rows = [(identity, shard, row) for row, identity in enumerate(identities)]
        with closing(self._connect()) as db, db:
            db.executemany("INSERT OR IGNORE INTO items VALUES (?, ?, ?)", rows)
            db.executemany("INSERT OR IGNORE INTO failures VALUES (?, ?)", list((failures or {}).items()))

    def _check_dim(self, features: np.ndarray) -> None:
        expected = self.meta.get("dim")
        if features.ndim != 2 or (expected is not None and features.shape[1] != expected):
            raise DimensionMismatchError(
                f"cache {self.dir}: features of shape {features.shape} do not match dimension {expected}"
            )

    # -- reading -------------------------------------------------------------------------
    def lookup(self, identities: Sequence[str]) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
        """Which identities are stored (-> shard, row) and which are known failures (-> reason)."""
        unique = list(dict.fromkeys(identities))
        found: dict[str, tuple[str, int]] = {}
        failed: dict[str, str] = {}
        with closing(self._connect()) as db:
            for start in range(0, len(unique), SQL_BATCH):
                chunk = unique[start : start + SQL_BATCH]
                marks = ",".join("?" * len(chunk))
                for identity, shard, row in db.execute(
                    f"SELECT identity, shard, row FROM items WHERE identity IN ({marks})", chunk
                ):
                    found[identity] = (shard, row)
                for identity, reason in db.execute(
                    f"SELECT identity, reason FROM failures WHERE identity IN ({marks})", chunk
                ):
                    failed[identity] = reason
        return found, failed

    def gather(self, locations: Sequence[tuple[str, int]], out: np.ndarray) -> np.ndarray:
        """Fill ``out[i]`` with the stored row at ``locations[i]``, reading shards memory-mapped."""
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for position, (shard, row) in enumerate(locations):
            by_shard.setdefault(shard, []).append((position, row))
        for shard, pairs in by_shard.items():
            try:
                block = np.load(self.dir / "shards" / shard, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise CacheError(f"{self.dir / 'shards' / shard}: unreadable cache shard ({exc})") from exc
            positions, rows = zip(*pairs)
            out[list(positions)] = block[list(rows)]
        return out

    def view_path(self, key: str) -> Path:
        return self.dir / "views" / f"{key}.npy"

    def write_view(
        self, key: str, locations: Sequence[tuple[str, int]], dim: int, indices: Sequence[int],
        failures: dict[int, str],
    ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """Store a dataset's features in dataset order, with which items they are and which failed.

        Rows are gathered straight into the new file (no full copy in memory); the sidecar JSON
        (item indices, failure reasons) is written first, so a view file never lacks it.
        """
        path = self.view_path(key)
        side = {"indices": [int(i) for i in indices], "failures": {str(i): r for i, r in failures.items()}}
        atomic_write_text(path.with_suffix(".json"), json.dumps(side))
        tmp = temporary_name(path)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(locations), dim))
        self.gather(locations, out)
        out.flush()
        del out
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return self.read_view(key)

    def read_view(self, key: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]] | None:
        """(features memory-mapped, item indices, {index: failure reason}) of a stored view, or None."""
        path = self.view_path(key)
        try:
            side = json.loads(path.with_suffix(".json").read_text())
            features = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        indices = np.asarray(side["indices"], dtype=np.int64)
        if len(indices) != len(features):
            return None
        with contextlib.suppress(OSError):  # the sidecar's mtime is the view's last use, for collect_garbage
            os.utime(path.with_suffix(".json"))
        return features, indices, {int(i): r for i, r in side["failures"].items()}

    def collect_garbage(self, min_age_seconds: float = 3600.0,
                        view_max_age_seconds: float = VIEW_MAX_AGE) -> tuple[int, int]:
        """Delete shards no index row points to and leftover temporary files older than ``min_age_seconds``,
        and stored views not used for ``view_max_age_seconds``.

        Orphan shards and temporary files are what a process killed between writing and registering
        leaves behind; the age limit keeps files of runs still in progress. Views are derived data (a
        dataset's rows gathered from the shards): an old one is rebuilt from the shards on next use,
        without recomputing features. Returns (files removed, bytes freed).
        """
        with closing(self._connect()) as db:
            used = {row[0] for row in db.execute("SELECT DISTINCT shard FROM items")}
        cutoff = time.time() - min_age_seconds
        removed = freed = 0
        stale: list[Path] = []
        for path in list((self.dir / "shards").iterdir()) + list((self.dir / "views").glob(".*.tmp")):
            orphan = path.name.endswith(".tmp") or path.name not in used
            if orphan and path.stat().st_mtime < cutoff:
                stale.append(path)
        view_cutoff = time.time() - view_max_age_seconds
        for side in (self.dir / "views").glob("*.json"):
            if side.stat().st_mtime < view_cutoff:
                stale += [side.with_suffix(".npy"), side]  # the array first: a view never lacks its sidecar
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                path.unlink()
                removed, freed = removed + 1, freed + size
        return removed, freed

    def disk_usage(self) -> int:
        """Bytes used by this space (index, shards, views)."""
        return sum(p.stat().st_size for p in self.dir.rglob("*") if p.is_file())

    def __len__(self) -> int:
        with closing(self._connect()) as db:
            return int(db.execute("SELECT COUNT(*) FROM items").fetchone()[0])
