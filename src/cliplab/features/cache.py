"""FeatureCache: an atomic, resumable, multi-process-safe store of embeddings on disk.

Layout of one cache space (one model + one preprocessing)::

    <root>/<space>/meta.json           model id, preprocessing, dimension
    <root>/<space>/index.sqlite        identity -> (shard, row); identity -> failure reason; shard checksums
    <root>/<space>/shards/<uuid>.npy   float32 (k, d) blocks, each written once, atomically
    <root>/<space>/shards/<uuid>.json  the block's identities, size and sha256 (to verify it, rebuild the index)
    <root>/<space>/views/<key>.npy     a dataset's features in dataset order, read memory-mapped
    <root>/<space>/views/<key>.json    which dataset items those rows are, which items failed, the view's
                                       width, dtype, rows, sha256 and the shards it was gathered from

A shard and its sidecar are renamed into place before its rows are registered, so a crash leaves at
worst an unregistered shard (ignored) and never a registered row without data. SQLite in WAL mode with
``INSERT OR IGNORE`` lets several processes fill one space at once.

The cache repairs itself: a damaged index database is rebuilt from the shard sidecars, a missing,
truncated or altered shard is dropped from the index (its items are recomputed by the run that found it),
and a damaged view is deleted and rebuilt. Each repair is logged and listed in ``repairs``.

Nothing corrupted is served: a shard's and a view's sha256 is checked the first time this process reads
the file (again whenever its size, mtime or inode changes), a view's header must match the width, dtype
and rows of its sidecar and space, and a view is invalid once a shard it was gathered from is dropped.
A cache space that cannot be written (a shared, read-only cache) is opened read-only: what it holds is
served, views it lacks are gathered in memory, and only writes (new items, repairs) are refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..errors import CacheError, DimensionMismatchError
from ..fileio import atomic_write, atomic_write_text, default_cache_root, temporary_name

log = logging.getLogger(__name__)
T = TypeVar("T")

SQL_BATCH = 500
VIEW_MAX_AGE = 30 * 24 * 3600.0  # stored views unused this long are removed by collect_garbage
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (identity TEXT PRIMARY KEY, shard TEXT NOT NULL, row INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS failures (identity TEXT PRIMARY KEY, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, rows INTEGER NOT NULL, bytes INTEGER NOT NULL,
                                   sha256 TEXT NOT NULL);
"""
NOT_WRITABLE = ("readonly", "read-only", "unable to open")
VIEW_DTYPE = "float32"
_VERIFIED: dict[tuple, str] = {}  # (path, size, mtime, ctime, inode) -> sha256 read in this process


class CacheNotWritableError(CacheError):
    """The cache folder (or its index) cannot be written."""


def _stat_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


def _remember(path: Path, sha: str) -> None:
    """Record ``sha`` as the verified hash of ``path`` as it is now (a file this process just wrote)."""
    with contextlib.suppress(OSError):
        _VERIFIED[_stat_key(path)] = sha


def file_sha256_once(path: Path) -> str:
    """sha256 of ``path``, hashed once per process for as long as its size, mtime, ctime and inode stay."""
    key = _stat_key(path)
    if key not in _VERIFIED:
        with open(path, "rb") as handle:
            _VERIFIED[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _VERIFIED[key]


class DamagedShardsError(CacheError):
    """Registered shards were missing or unreadable; they have been dropped from the index."""

    def __init__(self, shards: list[str], message: str):
        super().__init__(message)
        self.shards = shards


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a float32 .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32))
    return buffer.getvalue()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where feature spaces live: ``cache_dir`` as given, else ``<default cache root>/features``."""
    return Path(cache_dir) if cache_dir is not None else default_cache_root() / "features"


def cache_spaces(root: str | Path, repair: bool = False) -> list[FeatureCache]:
    """Every cache space under ``root``; without ``repair`` a damaged index is reported (``damaged``), not rebuilt."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [FeatureCache(root, p.name, repair=repair) for p in sorted(root.iterdir())
            if (p / "index.sqlite").is_file() or (p / "meta.json").is_file()]


class FeatureCache:
    """One cache space, keyed by ``space`` (derived from model id + preprocessing or modality).

    ``repairs`` lists what this object repaired (one line each). With ``repair=False`` a damaged
    index is not rebuilt: ``damaged`` says what is wrong and reads raise CacheError.
    """

    def __init__(self, root: str | Path, space: str, meta: dict | None = None, repair: bool = True):
        self.dir = Path(root) / space
        self.space = space
        self.repairs: list[str] = []
        self.damaged: str | None = None
        self.read_only = False
        self._repair = repair
        try:
            try:
                (self.dir / "shards").mkdir(parents=True, exist_ok=True)
                (self.dir / "views").mkdir(exist_ok=True)
                self._write_meta(meta or {})
            except OSError as exc:
                raise self._not_writable(exc) from exc
            self._run(lambda db: db.executescript(SCHEMA), write=True)
        except CacheNotWritableError:
            if not self._complete():
                raise
            self.read_only = True  # a shared cache someone else filled: serve what it holds
            log.info("cache %s is read-only: reading what it holds", self.dir)
        except CacheError as exc:
            if repair:
                raise
            self.damaged = str(exc)

    def _complete(self) -> bool:
        """The space exists whole on disk (index, meta, shards, views), so it can be read without writing."""
        return all(path.exists() for path in (self.index_path, self.dir / "meta.json", self.dir / "shards",
                                              self.dir / "views"))

    def _not_writable(self, exc: Exception) -> CacheError:
        reason = getattr(exc, "strerror", None) or str(exc)
        return CacheNotWritableError(f"{self.dir}: cache folder is not writable ({reason}); pass --cache-dir DIR or "
                                     "set CLIPLAB_CACHE to a writable folder")

    @property
    def index_path(self) -> Path:
        return self.dir / "index.sqlite"

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            return self._connect_read_only()
        db = sqlite3.connect(self.index_path, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _connect_read_only(self) -> sqlite3.Connection:
        """A read-only connection; ``immutable`` when SQLite cannot create the WAL index beside a read-only file."""
        uri = self.index_path.resolve().as_uri()
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60)
        try:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError:
            db.close()
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=60)

    def _refuse_write(self, what: str) -> None:
        if self.read_only:
            raise CacheNotWritableError(f"{self.dir}: cache folder is read-only and cannot {what}; pass --cache-dir "
                                        "DIR or set CLIPLAB_CACHE to a writable folder")

    def _run(self, work: Callable[[sqlite3.Connection], T], write: bool = False) -> T:
        """Run ``work`` on a connection (in a transaction if ``write``); a damaged index is rebuilt once."""
        if write:
            self._refuse_write("store or repair features")
        for attempt in (1, 2):
            try:
                with closing(self._connect()) as db:
                    if not write:
                        return work(db)
                    with db:
                        return work(db)
            except sqlite3.DatabaseError as exc:
                message = str(exc).lower()
                if isinstance(exc, sqlite3.OperationalError) and "locked" in message:
                    raise CacheError(f"{self.index_path}: the cache index is locked by another process ({exc})") \
                        from exc
                if isinstance(exc, sqlite3.OperationalError) and any(w in message for w in NOT_WRITABLE):
                    raise self._not_writable(exc) from exc
                if attempt == 2 or not self._repair or self.read_only:
                    raise CacheError(f"{self.index_path}: damaged cache index ({exc}); run: cliplab cache "
                                     "--repair") from exc
                self.rebuild_index(f"{exc}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _note(self, message: str) -> None:
        self.repairs.append(message)
        log.warning("cache repaired: %s", message)

    @contextlib.contextmanager
    def _exclusive(self):
        """A lock file serialising repairs between processes."""
        with open(self.dir / ".repair.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _index_healthy(self) -> bool:
        try:
            with closing(self._connect()) as db:
                return db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        except sqlite3.DatabaseError:
            return False

    def rebuild_index(self, why: str, force: bool = False) -> int:
        """Replace a damaged index database by one rebuilt from the shard sidecars; returns items recovered.

        Shards whose sidecar is missing or whose file does not match it are dropped (their items are
        recomputed). Known decoding failures are forgotten (those files are retried).
        """
        with self._exclusive():
            if not force and self._index_healthy():  # another process repaired it meanwhile
                return 0
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.index_path}{suffix}").unlink(missing_ok=True)
            items, shards, dropped = [], [], 0
            for side in sorted((self.dir / "shards").glob("*.json")):
                record = read_shard_record(side)
                shard = side.with_suffix(".npy")
                if record is None or not shard.is_file() or shard.stat().st_size != record["bytes"]:
                    dropped += 1
                    shard.unlink(missing_ok=True)
                    side.unlink(missing_ok=True)
                    continue
                shards.append((shard.name, record["rows"], record["bytes"], record["sha256"]))
                items += [(identity, shard.name, row) for row, identity in enumerate(record["identities"])]
            with closing(self._connect()) as db, db:
                db.executescript(SCHEMA)
                db.executemany("INSERT OR IGNORE INTO items VALUES (?, ?, ?)", items)
                db.executemany("INSERT OR IGNORE INTO shards VALUES (?, ?, ?, ?)", shards)
        self._note(f"{self.index_path}: damaged index database ({why}) rebuilt from {len(shards)} shard(s), "
                   f"{len(items)} item(s) kept" + (f", {dropped} unusable shard(s) dropped" if dropped else ""))
        return len(items)

    def drop_shards(self, shards: Sequence[str], why: str) -> int:
        """Forget damaged shards (index rows, files); their items will be recomputed. Returns items dropped."""
        marks = ",".join("?" * len(shards))

        def forget(db: sqlite3.Connection) -> int:
            count = db.execute(f"SELECT COUNT(*) FROM items WHERE shard IN ({marks})", list(shards)).fetchone()[0]
            db.execute(f"DELETE FROM items WHERE shard IN ({marks})", list(shards))
            db.execute(f"DELETE FROM shards WHERE name IN ({marks})", list(shards))
            return int(count)

        self._refuse_write(f"drop {len(shards)} damaged shard(s) ({why}); its owner can run: cliplab cache --repair")
        dropped = self._run(forget, write=True)
        for shard in shards:
            (self.dir / "shards" / shard).unlink(missing_ok=True)
            (self.dir / "shards" / shard).with_suffix(".json").unlink(missing_ok=True)
        self._note(f"{len(shards)} damaged shard(s) dropped ({why}): {dropped} item(s) will be recomputed")
        self._drop_views_of(set(shards))
        return dropped

    def _drop_views_of(self, shards: set[str]) -> None:
        """Delete the stored views gathered from any of ``shards`` (the array first, then its sidecar)."""
        for side in sorted((self.dir / "views").glob("*.json")):
            try:
                sources = set(json.loads(side.read_text()).get("shards", []))
            except (OSError, ValueError, AttributeError, TypeError):
                continue  # an unreadable sidecar: read_view deletes that view on its own
            if sources & shards:
                side.with_suffix(".npy").unlink(missing_ok=True)
                side.unlink(missing_ok=True)
                self._note(f"view {side.stem} built from a dropped shard deleted; rebuilt from the shards on next use")

    def _write_meta(self, meta: dict) -> None:
        path = self.dir / "meta.json"
        if path.exists() or not meta:
            return
        atomic_write_text(path, json.dumps(meta, indent=2))

    @property
    def meta(self) -> dict:
        path = self.dir / "meta.json"
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            return {}

    # -- writing -------------------------------------------------------------------------
    def add(self, identities: Sequence[str], features: np.ndarray, failures: dict[str, str] | None = None) -> None:
        """Store ``features[i]`` for ``identities[i]`` (one new shard) and record failures."""
        if len(identities) != len(features):
            raise CacheError(f"{len(identities)} identities for {len(features)} feature rows")
        self._check_dim(features)
        rows, shard_rows = [], []
        if len(identities):
            shard = f"{uuid.uuid4().hex}.npy"
            payload = npy_bytes(features)
            record = {"identities": list(identities), "rows": len(identities), "bytes": len(payload),
                      "sha256": hashlib.sha256(payload).hexdigest()}
            try:
                atomic_write_text((self.dir / "shards" / shard).with_suffix(".json"), json.dumps(record))
                atomic_write(self.dir / "shards" / shard, lambda handle: handle.write(payload))
                _remember(self.dir / "shards" / shard, record["sha256"])
            except OSError as exc:
                raise self._not_writable(exc) from exc
            rows = [(identity, shard, row) for row, identity in enumerate(identities)]
            shard_rows = [(shard, record["rows"], record["bytes"], record["sha256"])]

        def register(db: sqlite3.Connection) -> None:
            db.executemany("INSERT OR IGNORE INTO items VALUES (?, ?, ?)", rows)
            db.executemany("INSERT OR IGNORE INTO shards VALUES (?, ?, ?, ?)", shard_rows)
            db.executemany("INSERT OR IGNORE INTO failures VALUES (?, ?)", list((failures or {}).items()))

        self._run(register, write=True)

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

        def query(db: sqlite3.Connection) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
            found: dict[str, tuple[str, int]] = {}
            failed: dict[str, str] = {}
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

        return self._run(query)

    def gather(self, locations: Sequence[tuple[str, int]], out: np.ndarray) -> np.ndarray:
        """Fill ``out[i]`` with the stored row at ``locations[i]``, reading shards memory-mapped.

        Each shard's size and sha256 are checked against the ones recorded at write time the first time
        this process reads it. Shards that are missing, truncated, altered or too short are dropped from
        the index and reported with DamagedShardsError after every healthy row is copied; the caller
        recomputes their items.
        """
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for position, (shard, row) in enumerate(locations):
            by_shard.setdefault(shard, []).append((position, row))
        recorded = self._shard_records(list(by_shard))
        damaged: dict[str, str] = {}
        for shard, pairs in by_shard.items():
            positions, rows = zip(*pairs)
            try:
                self._check_shard_file(shard, recorded.get(shard))
                block = np.load(self.dir / "shards" / shard, mmap_mode="r")
                if block.ndim != 2 or block.shape[1] != out.shape[1] or max(rows) >= len(block):
                    raise ValueError(f"shape {block.shape} does not hold row {max(rows)} of width {out.shape[1]}")
                out[list(positions)] = block[list(rows)]
            except (OSError, ValueError) as exc:
                damaged[shard] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if damaged:
            first = next(iter(damaged.items()))
            why = f"{first[0]}: {first[1]}"
            self.drop_shards(list(damaged), why)
            raise DamagedShardsError(list(damaged), f"{len(damaged)} damaged cache shard(s) dropped ({why})")
        return out

    def _shard_records(self, shards: Sequence[str]) -> dict[str, tuple[int, str]]:
        """shard -> (bytes, sha256) as registered at write time."""
        def query(db: sqlite3.Connection) -> dict[str, tuple[int, str]]:
            found: dict[str, tuple[int, str]] = {}
            for start in range(0, len(shards), SQL_BATCH):
                chunk = list(shards[start: start + SQL_BATCH])
                marks = ",".join("?" * len(chunk))
                for name, size, sha in db.execute(f"SELECT name, bytes, sha256 FROM shards WHERE name IN ({marks})",
                                                  chunk):
                    found[name] = (int(size), str(sha))
            return found

        return self._run(query) if shards else {}

    def _check_shard_file(self, shard: str, recorded: tuple[int, str] | None) -> None:
        """Raise ValueError/OSError unless the shard's size and sha256 are the recorded ones (or its sidecar's)."""
        path = self.dir / "shards" / shard
        if recorded is None:
            record = read_shard_record(path.with_suffix(".json"))
            if record is None:
                raise ValueError("no checksum recorded for it (index row and sidecar missing)")
            recorded = (record["bytes"], record["sha256"])
        size, sha = recorded
        if path.stat().st_size != size:
            raise ValueError(f"{path.stat().st_size} bytes, {size} recorded (truncated?)")
        if file_sha256_once(path) != sha:
            raise ValueError("checksum differs from the one recorded at write time")

    def view_path(self, key: str) -> Path:
        return self.dir / "views" / f"{key}.npy"

    def write_view(
        self, key: str, locations: Sequence[tuple[str, int]], dim: int, indices: Sequence[int],
        failures: dict[int, str],
    ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """Store a dataset's features in dataset order, with which items they are and which failed.

        Rows are gathered straight into a temporary file (no full copy in memory); the sidecar JSON (item
        indices, failure reasons, width, dtype, rows, sha256, source shards) is written before the file is
        renamed into place, so a view file never lacks it. A read-only cache gathers the rows in memory.
        """
        if self.read_only:
            out = self.gather(locations, np.empty((len(locations), dim), dtype=np.float32))
            return out, np.asarray([int(i) for i in indices], dtype=np.int64), dict(failures)
        path = self.view_path(key)
        tmp = temporary_name(path)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(locations), dim))
            try:
                self.gather(locations, out)
            finally:
                out.flush()
                del out
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            side = {"indices": [int(i) for i in indices], "failures": {str(i): r for i, r in failures.items()},
                    "dim": int(dim), "dtype": VIEW_DTYPE, "rows": len(locations), "sha256": file_sha256_once(tmp),
                    "shards": sorted({shard for shard, _ in locations})}
            atomic_write_text(path.with_suffix(".json"), json.dumps(side))
            os.replace(tmp, path)
            _remember(path, side["sha256"])
        except OSError as exc:
            raise self._not_writable(exc) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return self.read_view(key)

    def view_problem(self, key: str) -> str | None:
        """What is wrong with a stored view (None when it is sound); see :meth:`read_view`."""
        opened = self._open_view(key)
        return opened if isinstance(opened, str) else None

    def _open_view(self, key: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]] | str:
        """The view's (features, indices, failures), or one line saying why it must not be served."""
        path, side_path = self.view_path(key), self.view_path(key).with_suffix(".json")
        try:
            side = json.loads(side_path.read_text())
            missing = [k for k in ("indices", "failures", "dim", "dtype", "rows", "sha256", "shards") if k not in side]
            if missing:
                return f"sidecar lacks {', '.join(missing)} (written by an older cliplab?)"
            indices = np.asarray(side["indices"], dtype=np.int64)
            failures = {int(i): str(r) for i, r in side["failures"].items()}
            dim, rows, expected_dim = int(side["dim"]), int(side["rows"]), self.meta.get("dim")
            if side["dtype"] != VIEW_DTYPE or len(indices) != rows or indices.ndim != 1:
                return f"sidecar says {side['dtype']} x {rows} rows for {len(indices)} items"
            if expected_dim is not None and dim != int(expected_dim):
                return f"width {dim}, the cache space holds width {expected_dim}"
            features = np.load(path, mmap_mode="r")
            if features.dtype != np.dtype(VIEW_DTYPE) or features.shape != (rows, dim):
                return f"file holds {features.dtype} {features.shape}, its sidecar {VIEW_DTYPE} ({rows}, {dim})"
            shards = [str(name) for name in side["shards"]]
            gone = sorted(set(shards) - set(self._shard_records(shards)))
            if gone:
                return f"built from {len(gone)} shard(s) no longer in the cache ({gone[0]})"
            if file_sha256_once(path) != side["sha256"]:
                return "checksum differs from the one recorded at write time"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        return features, indices, failures

    def read_view(self, key: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]] | None:
        """(features memory-mapped, item indices, {index: failure reason}) of a stored view, or None.

        A view is served only when its sidecar is whole, its header has the sidecar's dtype, rows and
        width (the space's), every shard it was gathered from is still registered, and its sha256 (checked
        once per process) is the recorded one. Otherwise it is deleted and reported (in a read-only cache
        only reported); the caller rebuilds it from the shards.
        """
        path, side_path = self.view_path(key), self.view_path(key).with_suffix(".json")
        if not path.exists():
            return None
        opened = self._open_view(key)
        if isinstance(opened, str):
            if self.read_only:
                self._note(f"damaged view {path.name} not used ({opened}); gathered from the shards instead")
                return None
            for stale in (path, side_path):
                stale.unlink(missing_ok=True)
            self._note(f"damaged view {path.name} deleted ({opened}); rebuilt from the shards")
            return None
        with contextlib.suppress(OSError):  # the sidecar's mtime is the view's last use, for collect_garbage
            os.utime(side_path)
        return opened

    def collect_garbage(self, min_age_seconds: float = 3600.0,
                        view_max_age_seconds: float = VIEW_MAX_AGE) -> tuple[int, int]:
        """Delete shards no index row points to and leftover temporary files older than ``min_age_seconds``,
        and stored views not used for ``view_max_age_seconds``.

        Orphan shards and temporary files are what a process killed between writing and registering
        leaves behind; the age limit keeps files of runs still in progress. Views are derived data (a
        dataset's rows gathered from the shards): an old one is rebuilt from the shards on next use,
        without recomputing features. Returns (files removed, bytes freed).
        """
        used = self._run(lambda db: {row[0] for row in db.execute("SELECT DISTINCT shard FROM items")})
        cutoff = time.time() - min_age_seconds
        removed = freed = 0
        stale: list[Path] = []
        for path in list((self.dir / "shards").iterdir()) + list((self.dir / "views").glob(".*.tmp")):
            orphan = path.name.endswith(".tmp") or path.with_suffix(".npy").name not in used
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
        return int(self._run(lambda db: db.execute("SELECT COUNT(*) FROM items").fetchone()[0]))


def read_shard_record(path: Path) -> dict | None:
    """A shard's sidecar (identities, rows, bytes, sha256), or None when it is unreadable or inconsistent."""
    try:
        record = json.loads(path.read_text())
        ok = (isinstance(record.get("identities"), list) and record.get("rows") == len(record["identities"])
              and isinstance(record.get("bytes"), int) and isinstance(record.get("sha256"), str))
    except (OSError, ValueError, AttributeError):
        return None
    return record if ok else None
