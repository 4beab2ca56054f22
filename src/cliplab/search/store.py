"""SQLite metadata of a search index: one row per indexed item (stable int64 id) and one per caption."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = """
CREATE TABLE items (
    id INTEGER PRIMARY KEY,      -- the FAISS id; never reused
    key TEXT NOT NULL UNIQUE,    -- the dataset's item id (relative path), what updates match on
    path TEXT NOT NULL,          -- absolute file path ('' for items that are not files)
    size INTEGER,
    mtime REAL,
    identity TEXT NOT NULL,      -- the feature-cache identity (path|size|mtime_ns or sha256): changes with the file
    caption TEXT,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE captions (
    id INTEGER PRIMARY KEY,      -- row of captions.npy
    item INTEGER NOT NULL,
    text TEXT NOT NULL
);
"""


@dataclass
class ItemRow:
    """One indexed item as stored."""

    id: int
    key: str
    path: str
    size: int | None
    mtime: float | None
    identity: str
    caption: str | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "size": self.size, "mtime": self.mtime, "caption": self.caption,
                "extra": dict(self.extra)}


def write_store(path: Path, items: Iterable[ItemRow], captions: Iterable[tuple[int, int, str]] = ()) -> None:
    """Create the database at ``path`` (a new file in a build folder) holding ``items`` and ``captions``."""
    connection = sqlite3.connect(path)
    try:
        connection.executescript(SCHEMA)
        connection.executemany(
            "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ((r.id, r.key, r.path, r.size, r.mtime, r.identity, r.caption, json.dumps(r.extra)) for r in items))
        connection.executemany("INSERT INTO captions VALUES (?, ?, ?)", captions)
        connection.commit()
    finally:
        connection.close()


class Store:
    """Read-only access to an index's database, safe to share between threads (one lock)."""

    def __init__(self, path: Path):
        self.path = path
        self._connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._connection.close()

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._connection.execute(sql, args).fetchall()

    def items(self, ids: Iterable[int]) -> dict[int, ItemRow]:
        """Rows of ``ids`` (unknown ids are absent)."""
        ids = [int(i) for i in ids]
        out: dict[int, ItemRow] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._rows(f"SELECT * FROM items WHERE id IN ({marks})", tuple(chunk)):
                out[row[0]] = _item(row)
        return out

    def all_items(self) -> list[ItemRow]:
        return [_item(row) for row in self._rows("SELECT * FROM items ORDER BY id")]

    def captions(self) -> list[tuple[int, int, str]]:
        """(row, item id, text) of every stored caption, by row."""
        return [tuple(row) for row in self._rows("SELECT id, item, text FROM captions ORDER BY id")]

    def caption_rows(self, rows: Iterable[int]) -> dict[int, tuple[int, str]]:
        """(item id, text) of caption ``rows`` (unknown rows are absent)."""
        rows = [int(r) for r in rows]
        out: dict[int, tuple[int, str]] = {}
        for start in range(0, len(rows), 500):
            chunk = rows[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row, item, text in self._rows(f"SELECT id, item, text FROM captions WHERE id IN ({marks})",
                                              tuple(chunk)):
                out[row] = (item, text)
        return out

    def count(self) -> int:
        return self._rows("SELECT COUNT(*) FROM items")[0][0]


def _item(row: tuple) -> ItemRow:
    return ItemRow(row[0], row[1], row[2], row[3], row[4], row[5], row[6], json.loads(row[7] or "{}"))
