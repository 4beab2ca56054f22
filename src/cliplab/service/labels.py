"""The label sets of ``/classify``: each computed once, outside any shared lock, and kept within bounds.

A label set's zero-shot head is computed by the caller's ``compute(names)`` (the service builds it with the one
provider, ``eval.inputs.build_head``); only its class weights and logit scale are kept. Lookups take a short
lock; the computation runs outside it, so a new label set never stalls answers for known ones, and two
different new sets are computed at the same time (at most ``COMPUTE_SLOTS``: each encodes up to 64 labels x
the templates). Requests for a set that is being computed wait for that one computation. The ``MEMORY_SETS``
most recently used sets stay in memory; with a ``folder`` the sets are also stored on disk (one ``.npz`` each,
named by a digest of the model, method, templates and labels), at most ``DISK_SETS`` files and ``DISK_BYTES``
bytes: the least recently used are deleted when a new one is written. A stored file that does not match its
key (another label list, a wrong shape, a non-finite value) is deleted and computed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MEMORY_SETS = 64
DISK_SETS = 256
DISK_BYTES = 64 * 2**20
COMPUTE_SLOTS = 2


@dataclass
class LabelHead:
    """What ``/classify`` needs of a fitted zero-shot head: (d, C) class weights and the logit scale."""

    weights_: np.ndarray
    logit_scale_: float


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    value: LabelHead | None = None
    error: BaseException | None = None


class LabelSets:
    """Label set -> ``LabelHead``: computed once, outside the lookup lock, kept in memory and on disk within
    bounds (see the module docstring). ``identity``: what else the weights depend on (model, templates...)."""

    def __init__(self, compute: Callable[[list[str]], object], identity: dict, folder: str | Path | None = None,
                 *, dim: int | None = None, memory: int = MEMORY_SETS, disk_sets: int = DISK_SETS,
                 disk_bytes: int = DISK_BYTES, compute_slots: int = COMPUTE_SLOTS):
        self._compute = compute
        self._identity = json.dumps(identity, sort_keys=True, default=str)
        self.folder = Path(folder) if folder is not None else None
        self.dim = dim
        self.memory, self.disk_sets, self.disk_bytes = memory, disk_sets, disk_bytes
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(compute_slots)
        self._sets: OrderedDict[tuple[str, ...], LabelHead] = OrderedDict()
        self._pending: dict[tuple[str, ...], _Pending] = {}

    def get(self, names: Sequence[str]) -> LabelHead:
        """The head of label set ``names`` (in this order)."""
        key = tuple(names)
        with self._lock:
            found = self._sets.get(key)
            if found is not None:
                self._sets.move_to_end(key)
                return found
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return pending.value
        try:
            pending.value = self._stored(key) or self._computed(key)
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            with self._lock:
                del self._pending[key]
                if pending.value is not None:
                    self._sets[key] = pending.value
                    while len(self._sets) > self.memory:
                        self._sets.popitem(last=False)
            pending.done.set()
        return pending.value

    def _computed(self, key: tuple[str, ...]) -> LabelHead:
        with self._slots:
            head = self._compute(list(key))
        result = LabelHead(np.asarray(head.weights_), float(head.logit_scale_))
        self._store(key, result)
        return result

    # ------------------------------------------------------------------------------------------- disk

    def path(self, key: Sequence[str]) -> Path | None:
        """The file of label set ``key`` on disk (None without a folder)."""
        if self.folder is None:
            return None
        digest = hashlib.sha256(json.dumps([self._identity, list(key)]).encode("utf-8", "surrogatepass"))
        return self.folder / f"{digest.hexdigest()[:32]}.npz"

    def _stored(self, key: tuple[str, ...]) -> LabelHead | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                names = json.loads(str(data["names"]))
                weights = np.array(data["weights"])
                scale = float(data["logit_scale"])
            good = (names == list(key) and weights.ndim == 2 and weights.shape[1] == len(key)
                    and (self.dim is None or weights.shape[0] == self.dim) and np.isfinite(weights).all()
                    and np.isfinite(scale))
        except (OSError, ValueError, KeyError, TypeError):
            good = False
        if not good:
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: the last to be collected
        return LabelHead(weights, scale)

    def _store(self, key: tuple[str, ...], head: LabelHead) -> None:
        path = self.path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp")
            with open(scratch, "wb") as handle:
                np.savez(handle, names=np.array(json.dumps(list(key))), weights=head.weights_,
                         logit_scale=np.array(head.logit_scale_))
            os.replace(scratch, path)
        except OSError:  # a read-only or full disk: the set stays in memory only
            return
        self.collect()

    def collect(self) -> None:
        """Delete the least recently used stored sets beyond ``disk_sets`` files or ``disk_bytes`` bytes (and
        scratch files left by a killed write)."""
        if self.folder is None or not self.folder.is_dir():
            return
        files = []
        for entry in os.scandir(self.folder):
            try:
                facts = entry.stat()
            except OSError:
                continue
            if entry.name.endswith(".tmp"):
                if facts.st_mtime < time.time() - 3600:
                    Path(entry.path).unlink(missing_ok=True)
            elif entry.name.endswith(".npz"):
                files.append((facts.st_mtime_ns, facts.st_size, entry.path))
        files.sort(reverse=True)  # newest first
        kept = total = 0
        full = False
        for _, size, path in files:
            full = full or kept >= self.disk_sets or total + size > self.disk_bytes
            if full:
                Path(path).unlink(missing_ok=True)
            else:
                kept += 1
                total += size
