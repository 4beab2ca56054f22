"""``cliplab cache --verify / --repair``: check every shard against the index, and fix what is damaged."""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import closing
from dataclasses import dataclass

import numpy as np

from .cache import FeatureCache, read_shard_record


@dataclass(frozen=True)
class Problem:
    """One damaged part of a cache space: ``kind`` is index, shard or view."""

    space: str
    kind: str
    name: str
    detail: str


def verify_space(cache: FeatureCache) -> list[Problem]:
    """Check the index database, every registered shard (present, size and sha256 as recorded at write time,
    rows that exist, sidecar identities equal to the index's) and every stored view (sidecar, header width and
    dtype, source shards still registered, sha256)."""
    problems: list[Problem] = []
    try:
        with closing(cache._connect()) as db:
            check = db.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            items = db.execute("SELECT identity, shard, row FROM items").fetchall()
            recorded = {name: (rows, size, sha) for name, rows, size, sha in db.execute("SELECT * FROM shards")}
    except sqlite3.DatabaseError as exc:
        return [Problem(cache.space, "index", cache.index_path.name, str(exc).splitlines()[0])]
    by_shard: dict[str, list[tuple[str, int]]] = {}
    for identity, shard, row in items:
        by_shard.setdefault(shard, []).append((identity, row))
    for shard, members in sorted(by_shard.items()):
        detail = _check_shard(cache, shard, members, recorded.get(shard))
        if detail:
            problems.append(Problem(cache.space, "shard", shard, detail))
    for side in sorted((cache.dir / "views").glob("*.json")):
        detail = _check_view(cache, side)
        if detail:
            problems.append(Problem(cache.space, "view", side.stem, detail))
    return problems


def _check_shard(cache: FeatureCache, shard: str, members: list[tuple[str, int]], recorded) -> str | None:
    path = cache.dir / "shards" / shard
    if not path.is_file():
        return "file missing"
    if recorded is not None:
        rows, size, sha = recorded
        if path.stat().st_size != size:
            return f"{path.stat().st_size} bytes, {size} recorded (truncated?)"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha:
            return "checksum differs from the one recorded at write time"
        record = read_shard_record(path.with_suffix(".json"))
        if record is None:
            return "sidecar (identities) missing or unreadable"
        if any(record["identities"][row] != identity for identity, row in members if row < len(record["identities"])):
            return "index rows disagree with the shard's identities"
    try:
        block = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        return f"unreadable ({str(exc).splitlines()[0]})"
    if block.ndim != 2 or max(row for _, row in members) >= len(block):
        return f"shape {block.shape} lacks registered rows"
    return None


def _check_view(cache: FeatureCache, side) -> str | None:
    """A view's problem: unreadable, header or width not the sidecar's, a source shard dropped, checksum."""
    if not side.with_suffix(".npy").is_file():
        return None  # a sidecar written by a run still in progress, or left by a killed one (--gc removes it)
    return cache.view_problem(side.stem)


def repair_space(cache: FeatureCache, problems: list[Problem]) -> list[str]:
    """Fix ``problems`` of ``cache``: rebuild a damaged index, drop damaged shards, delete damaged views."""
    kinds = {p.kind for p in problems}
    if "index" in kinds:
        cache.rebuild_index(next(p.detail for p in problems if p.kind == "index"), force=True)
    shards = [p.name for p in problems if p.kind == "shard"]
    if shards:
        cache.drop_shards(shards, "cliplab cache --repair")
    for problem in problems:
        if problem.kind == "view":
            for suffix in (".npy", ".json"):
                (cache.dir / "views" / f"{problem.name}{suffix}").unlink(missing_ok=True)
            cache.repairs.append(f"damaged view {problem.name} deleted; rebuilt from the shards on next use")
    return list(cache.repairs)
