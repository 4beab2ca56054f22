"""Parquet embedding shards: what ``cliplab embed --engine ray`` writes and ``cliplab index build`` reads.

A shards folder holds ``part-00000.parquet``, ``part-00001.parquet``... with columns ``path`` (string),
``size`` (int64), ``mtime`` (float64), ``identity`` (string), ``caption`` (string, nullable: the first
caption), ``embedding`` (fixed_size_list<float32, dim>, L2-normalised) and ``captions`` (list<string>: every
caption of the item, empty when none), and ``shards.json`` = {"model_id", "dim", "preprocess_id",
"encoding_id", "count", "shards": [names], "failures": [[path, reason], ...]}. Parts written before the
``captions`` column existed are read with it filled from ``caption``.

A row is one (path, identity) pair: identical files at different paths (``--hash-content``) each get their row,
sharing one embedding.

Every file is written to a hidden temporary name and renamed (readers see all or nothing); ``shards.json``
is written last, so a folder without it, or with a leftover temporary file, is incomplete. Each part also
carries the model fields in its parquet schema metadata, so a rerun (``ShardWriter``) reuses every complete
part of the same model and embeds only the items they lack.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ShardsError
from ..fileio import atomic_write, atomic_write_text

SHARDS_FILE = "shards.json"
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
META_KEYS = ("model_id", "dim", "preprocess_id", "encoding_id")
SCHEMA_KEY = b"cliplab.shards"
SHARD_ROWS = 4096
COLUMNS = ("path", "size", "mtime", "identity", "caption", "embedding", "captions")
LEGACY_COLUMNS = COLUMNS[:-1]  # parts written before the captions column
RERUN = "run `cliplab embed --engine ray ... --shards` again"


def part_name(number: int) -> str:
    """``part-00042.parquet``."""
    return f"part-{number:05d}.parquet"


def is_shards_folder(folder: str | Path) -> bool:
    """Whether ``folder`` looks like a shards folder (holds ``shards.json``)."""
    return (Path(folder) / SHARDS_FILE).is_file()


def shard_schema(meta: dict) -> pa.Schema:
    """The parquet schema of a part, its model fields (``META_KEYS``) in the schema metadata."""
    fields = {key: meta[key] for key in META_KEYS}
    return pa.schema([
        pa.field("path", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("mtime", pa.float64(), nullable=False),
        pa.field("identity", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=True),
        pa.field("embedding", pa.list_(pa.float32(), int(meta["dim"])), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
    ], metadata={SCHEMA_KEY: json.dumps(fields, sort_keys=True).encode()})


def caption_list(value) -> list[str]:
    """Every caption of a row from ``None``, one string, or a sequence of strings (empty ones dropped)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    return [str(text) for text in value if text]


def make_table(meta: dict, paths: Sequence[str], sizes, mtimes, identities: Sequence[str],
               captions: Sequence | None, embeddings) -> pa.Table:
    """One part's rows as a table; checks lengths, the dimension and that embeddings are finite.

    ``captions[i]``: None, the item's caption, or the list of all its captions (``caption`` is the first)."""
    dim = int(meta["dim"])
    vectors = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32).reshape(-1, dim) if len(paths)
                                   else np.zeros((0, dim), np.float32))
    n = len(paths)
    every = [[] for _ in range(n)] if captions is None else [caption_list(c) for c in captions]
    captions = [texts[0] if texts else None for texts in every]
    lengths = {len(sizes), len(mtimes), len(identities), len(captions), len(vectors)}
    if lengths != {n}:
        raise ShardsError(f"shard rows disagree in length: {n} paths, {len(identities)} identities, "
                          f"{len(vectors)} embeddings")
    if not np.isfinite(vectors).all():
        raise ShardsError("embeddings hold NaN or infinite values")
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    columns = [pa.array(list(paths), pa.string()), pa.array(np.asarray(sizes, np.int64)),
               pa.array(np.asarray(mtimes, np.float64)), pa.array(list(identities), pa.string()),
               pa.array(captions, pa.string()), embedding, pa.array(every, pa.list_(pa.string()))]
    return pa.Table.from_arrays(columns, schema=shard_schema(meta))


def table_embeddings(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as a float32 (n, dim) array."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


def _temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(".*.tmp") if p.name.startswith((".part-", "." + SHARDS_FILE)))


def _part_meta(path: Path) -> dict:
    """The model fields a part's schema carries; ShardsError naming the file when unreadable."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise ShardsError(f"{path}: not a readable parquet shard ({exc}); {RERUN}") from exc
    try:
        return json.loads((schema.metadata or {})[SCHEMA_KEY])
    except (KeyError, ValueError) as exc:
        raise ShardsError(f"{path}: no cliplab shard metadata in its schema; {RERUN}") from exc


def _check_part(path: Path, table: pa.Table, meta: dict) -> pa.Table:
    """The part checked against the schema; a legacy part (no ``captions``) gets it from ``caption``."""
    expected = shard_schema(meta)
    if table.column_names == list(LEGACY_COLUMNS) and pa.types.is_string(table.schema.field("caption").type):
        first = table.column("caption").to_pylist()
        table = table.append_column("captions", pa.array([[c] if c else [] for c in first], pa.list_(pa.string())))
    if table.column_names != list(COLUMNS):
        raise ShardsError(f"{path}: columns {table.column_names}, expected {list(COLUMNS)}")
    for field in expected:
        actual = table.schema.field(field.name).type
        if field.name == "embedding":  # the list's child field name (item, element) may differ
            ok = (pa.types.is_fixed_size_list(actual) and actual.value_type == pa.float32()
                  and actual.list_size == field.type.list_size)
        else:
            ok = actual == field.type
        if not ok:
            raise ShardsError(f"{path}: column {field.name} is {actual}, expected {field.type}")
    return table


def read_shards(folder: str | Path) -> tuple[dict, pa.Table]:
    """``(meta, table)`` of a complete shards folder: ``meta`` is ``shards.json``, ``table`` every listed part
    in order. ShardsError (one line naming the file) for a missing/half-written folder or a malformed part."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardsError(f"{folder}: no such shards folder")
    meta_path = folder / SHARDS_FILE
    if not meta_path.is_file():
        raise ShardsError(f"{meta_path}: missing, so the shards in {folder} are incomplete; {RERUN}")
    leftovers = _temporaries(folder)
    if leftovers:
        raise ShardsError(f"{leftovers[0]}: a half-written file, so {folder} is incomplete (a write is running "
                          f"or was interrupted); {RERUN}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShardsError(f"{meta_path}: unreadable JSON ({exc})") from exc
    missing = [k for k in (*META_KEYS, "count", "shards", "failures") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ShardsError(f"{meta_path}: missing field(s) {', '.join(missing)}")
    if not isinstance(meta["dim"], int) or meta["dim"] < 1:
        raise ShardsError(f"{meta_path}: dim must be a positive integer, got {meta['dim']!r}")
    if not isinstance(meta["shards"], list) or not all(isinstance(n, str) and PART_RE.match(n)
                                                       for n in meta["shards"]):
        raise ShardsError(f"{meta_path}: shards must be a list of part-NNNNN.parquet names")
    fields = {key: meta[key] for key in META_KEYS}
    tables = []
    for name in meta["shards"]:
        path = folder / name
        if not path.is_file():
            raise ShardsError(f"{path}: listed in {SHARDS_FILE} but missing; {RERUN}")
        if _part_meta(path) != fields:
            raise ShardsError(f"{path}: written for another model or dimension than {meta_path} says")
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise ShardsError(f"{path}: not a readable parquet shard ({exc}); {RERUN}") from exc
        table = _check_part(path, table, meta)
        if table.num_rows and not np.isfinite(table_embeddings(table)).all():
            raise ShardsError(f"{path}: embeddings hold NaN or infinite values")
        tables.append(table.cast(shard_schema(meta)).replace_schema_metadata(None))
    schema = shard_schema(meta).remove_metadata()
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if table.num_rows != meta["count"]:
        raise ShardsError(f"{meta_path}: count {meta['count']} but the parts hold {table.num_rows} rows")
    return meta, table


class ShardWriter:
    """Writes a shards folder a part at a time; resumes: complete parts of the same model are kept.

    Rows are keyed by ``(path, identity)``: identical files at different paths each keep their row. ``wanted``
    (the keys of the items to store) drops parts holding items no longer wanted (their other items are
    embedded again). ``done`` is the set of keys already stored: skip those. ``close()`` writes the last
    part and then ``shards.json``.
    """

    def __init__(self, folder: str | Path, meta: dict, wanted: Iterable[tuple[str, str]] | None = None,
                 shard_rows: int = SHARD_ROWS):
        self.folder = Path(folder)
        self.meta = {key: meta[key] for key in META_KEYS}
        self.meta["dim"] = int(self.meta["dim"])
        self.shard_rows = shard_rows
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in _temporaries(self.folder):  # from an interrupted run
            leftover.unlink(missing_ok=True)
        wanted = None if wanted is None else set(wanted)
        self.parts: dict[int, str] = {}
        self.counts: dict[int, int] = {}
        self.done: set[tuple[str, str]] = set()
        self.reused = 0
        for path in sorted(self.folder.glob("part-*.parquet")):
            match = PART_RE.match(path.name)
            if not match:
                continue
            try:
                fields = _part_meta(path)
                stored = pq.read_table(path, columns=["path", "identity"])
                keys = list(zip(stored.column("path").to_pylist(), stored.column("identity").to_pylist()))
            except (ShardsError, OSError, pa.ArrowException):
                self._drop(path)  # damaged: its items are embedded again
                continue
            if fields != self.meta:
                raise ShardsError(f"{path}: holds embeddings of {fields.get('model_id')} "
                                  f"({fields.get('encoding_id')}, dim {fields.get('dim')}), not of "
                                  f"{self.meta['model_id']} ({self.meta['encoding_id']}); "
                                  "use another --shards folder or delete this one")
            if wanted is not None and not set(keys) <= wanted:
                self._drop(path)
                continue
            number = int(match.group(1))
            self.parts[number], self.counts[number] = path.name, len(keys)
            self.done.update(keys)
            self.reused += 1
        self.failures: list[tuple[str, str]] = []
        self.written = 0
        self._rows: dict[str, list] = {key: [] for key in COLUMNS}

    def _drop(self, path: Path) -> None:
        (self.folder / SHARDS_FILE).unlink(missing_ok=True)  # it may list this part: the folder is incomplete
        path.unlink(missing_ok=True)

    def add(self, paths, sizes, mtimes, identities, captions, embeddings) -> None:
        """Buffer rows (a (path, identity) already stored is skipped); write full parts. ``captions[i]``: None,
        a caption or the list of all the item's captions."""
        vectors = np.asarray(embeddings, dtype=np.float32).reshape(len(paths), self.meta["dim"])
        captions = [None] * len(paths) if captions is None else list(captions)
        for path, size, mtime, identity, texts, vector in zip(paths, sizes, mtimes, identities, captions, vectors,
                                                               strict=True):
            if (path, identity) in self.done:
                continue
            self.done.add((path, identity))
            texts = caption_list(texts)
            row = (path, size, mtime, identity, texts[0] if texts else None, vector, texts)
            for key, value in zip(COLUMNS, row, strict=True):
                self._rows[key].append(value)
            if len(self._rows["path"]) >= self.shard_rows:
                self.flush()

    def fail(self, path: str, reason: str) -> None:
        """Record an item that could not be embedded (listed in ``shards.json`` ``failures``)."""
        self.failures.append((str(path), str(reason)))

    def flush(self) -> None:
        """Write the buffered rows as the next part (atomically)."""
        rows = self._rows
        if not rows["path"]:
            return
        table = make_table(self.meta, rows["path"], rows["size"], rows["mtime"], rows["identity"],
                           rows["captions"], np.stack(rows["embedding"]))
        number = max(self.parts, default=-1) + 1
        name = part_name(number)
        atomic_write(self.folder / name, lambda handle: pq.write_table(table, handle))
        self.parts[number], self.counts[number] = name, table.num_rows
        self.written += table.num_rows
        self._rows = {key: [] for key in COLUMNS}

    def close(self) -> dict:
        """Write the last part, then ``shards.json``; return its content."""
        self.flush()
        numbers = sorted(self.parts)
        failures = sorted(set(self.failures))
        meta = {**self.meta, "count": sum(self.counts[n] for n in numbers),
                "shards": [self.parts[n] for n in numbers], "failures": [list(f) for f in failures]}
        atomic_write_text(self.folder / SHARDS_FILE, json.dumps(meta, indent=1) + "\n")
        return meta


def write_shards(folder: str | Path, *, model_id: str, dim: int, preprocess_id: str, encoding_id: str,
                 paths: Sequence[str], sizes, mtimes, identities: Sequence[str],
                 captions: Sequence | None, embeddings, failures: Iterable[tuple[str, str]] = (),
                 shard_rows: int = SHARD_ROWS) -> dict:
    """Write a complete shards folder for these rows (reusing complete parts of the same model already
    there); return the ``shards.json`` content. One row per (path, identity): the same file content at two
    paths is two rows. ``captions[i]``: None, a caption, or the list of all the item's captions."""
    meta = {"model_id": model_id, "dim": int(dim), "preprocess_id": preprocess_id, "encoding_id": encoding_id}
    if math.prod(np.shape(embeddings)) != len(paths) * int(dim):
        raise ShardsError(f"embeddings of shape {np.shape(embeddings)} for {len(paths)} rows of dimension {dim}")
    writer = ShardWriter(folder, meta, wanted=list(zip(paths, identities, strict=True)), shard_rows=shard_rows)
    writer.add(paths, sizes, mtimes, identities, captions, embeddings)
    for path, reason in failures:
        writer.fail(path, reason)
    return writer.close()
