"""Dense features as a value: ``embed_dense(backbone, dataset, cache_dir, spec=DenseSpec(...)) -> DenseFeatures``.

Patch tokens (L2-normalised float32, joint space) with their (h, w) grid, extracted as ``models/dense.py`` says,
stored in the feature cache (``features/cache.py``: atomic shards with sha256 sidecars, an SQLite index rebuilt
from them when damaged, damaged shards dropped and recomputed, every repair reported). The cache key says what
was extracted (:func:`cliplab.models.dense.dense_key`: model id, preprocessing, encoding, path, resolved layer,
input mode, resolution, stride), so no two extractions share an entry, and each patch grid has its own space::

    <root>/dense-<key>/            meta.json (the key), the failures of items that could not be decoded
    <root>/dense-<key>-<h>x<w>/    rows of h*w*d floats (an item's (h, w, d) tokens, flattened), views

Finished batches are stored as they come (a killed run keeps them; a rerun computes only the missing items),
and reads are memory-mapped views in dataset order. ``cliplab cache --verify/--repair`` covers these spaces
like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.base import ImageDataset
from ..errors import CliplabError, FeatureError
from ..fileio import digest
from ..models.backbone import Backbone
from ..models.dense import DenseSpec, dense_key, dense_tokens, dense_transform
from ..models.fingerprint import config_json
from .cache import DamagedShardsError, FeatureCache, cache_root
from .embed import _Decoded, default_workers, model_record

__all__ = ["DenseFeatures", "DenseSpec", "dense_cache_key", "embed_dense"]


def _read_only(array: np.ndarray) -> np.ndarray:
    if array.flags.writeable:
        array = array.view()
        array.flags.writeable = False
    return array


@dataclass(frozen=True)
class DenseFeatures:
    """Patch tokens of a dataset's decodable images, in dataset order.

    Item ``k`` (id ``item_ids[k]``, label ``labels[k]``, dataset index ``indices[k]``) has the grid
    ``grids[k] == (h, w)`` and tokens ``grid(k)`` of shape (h, w, d). ``parts`` holds, per distinct grid, a
    read-only (m, h*w, d) array (memory-mapped from the cache); ``rows[k] = (part, row)``. ``tokens`` is the
    (n, h*w, d) array when every item shares one grid. ``failures`` lists every item that could not be
    decoded as (item id, reason); ``key`` says what was extracted; ``cache_key`` where it lives.
    """

    parts: tuple[tuple[tuple[int, int], np.ndarray], ...]
    rows: np.ndarray  # (n, 2): part number, row in that part
    labels: np.ndarray
    item_ids: list[str]
    indices: np.ndarray
    class_names: list[str] = field(default_factory=list)
    dataset: str = ""
    split: str = "all"
    model_id: str = ""
    model: dict = field(default_factory=dict)
    key: dict = field(default_factory=dict)
    cache_key: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)
    computed: int = 0  # items this call extracted (the rest came from the cache)
    repairs: list[str] = field(default_factory=list)

    def __post_init__(self):
        object.__setattr__(self, "parts", tuple((tuple(int(v) for v in g), _read_only(np.asanyarray(a)))
                                                for g, a in self.parts))
        object.__setattr__(self, "rows", _read_only(np.asarray(self.rows, dtype=np.int64).reshape(-1, 2)))
        object.__setattr__(self, "labels", _read_only(np.asarray(self.labels, dtype=np.int64)))
        object.__setattr__(self, "indices", _read_only(np.asarray(self.indices, dtype=np.int64)))
        if not (len(self.rows) == len(self.labels) == len(self.item_ids) == len(self.indices)):
            raise FeatureError(f"{self.dataset}: dense rows, labels, item ids and indices differ in length")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.parts[0][1].shape[-1]) if self.parts else 0

    @property
    def grids(self) -> list[tuple[int, int]]:
        """The (h, w) patch grid of every item."""
        return [self.parts[int(p)][0] for p, _ in self.rows]

    @property
    def grid_shape(self) -> tuple[int, int] | None:
        """The grid all items share, or None when they differ (aspect-kept or sliding input of mixed sizes)."""
        shapes = {self.parts[int(p)][0] for p in np.unique(self.rows[:, 0])}
        return next(iter(shapes)) if len(shapes) == 1 else None

    def grid(self, k: int) -> np.ndarray:
        """Tokens of item ``k`` as (h, w, d)."""
        part, row = (int(v) for v in self.rows[k])
        (h, w), array = self.parts[part]
        return array[row].reshape(h, w, -1)

    @property
    def tokens(self) -> np.ndarray:
        """(n, h*w, d): memory-mapped when the items are one part's rows in order; FeatureError for mixed grids."""
        if len(self) == 0:
            return np.zeros((0, 0, self.dim), np.float32)
        if self.grid_shape is None:
            shapes = sorted({f"{h}x{w}" for h, w in self.grids})
            raise FeatureError(f"{self.dataset}: items have different patch grids ({', '.join(shapes)}); "
                               "read them one at a time with grid(k)")
        part = int(self.rows[0, 0])
        array = self.parts[part][1]
        rows = self.rows[:, 1]
        if len(rows) == len(array) and np.array_equal(rows, np.arange(len(array))):
            return array
        return _read_only(array[rows])

    def take(self, indices: Sequence[int]) -> DenseFeatures:
        """The items at dataset indices ``indices``, in that order (e.g. to align with an ``ImageFeatures``);
        FeatureError naming one that has no tokens here."""
        where = {int(i): k for k, i in enumerate(self.indices)}
        missing = [int(i) for i in indices if int(i) not in where]
        if missing:
            raise FeatureError(f"{self.dataset}: dataset item {missing[0]} has no dense features "
                               f"({len(missing)} missing)")
        picks = [where[int(i)] for i in indices]
        return DenseFeatures(
            parts=self.parts, rows=self.rows[picks], labels=self.labels[picks],
            item_ids=[self.item_ids[k] for k in picks], indices=self.indices[picks], class_names=self.class_names,
            dataset=self.dataset, split=self.split, model_id=self.model_id, model=self.model, key=self.key,
            cache_key=self.cache_key, failures=self.failures, computed=self.computed, repairs=self.repairs)


def dense_cache_key(backbone: Backbone, spec: DenseSpec = DenseSpec()) -> tuple[str, dict]:
    """(space prefix ``dense-<digest>``, the key dict) for ``backbone`` and ``spec``."""
    key = dense_key(backbone, spec)
    return "dense-" + digest(config_json(key)), key


class _Store:
    """The cache spaces of one extraction: failures in ``dense-<key>``, tokens in ``dense-<key>-<h>x<w>``."""

    def __init__(self, root: Path, prefix: str, key: dict):
        self.root, self.prefix, self.key, self.dim = root, prefix, key, int(key["dim"])
        self.base = FeatureCache(root, prefix, {**key, "modality": "dense"})
        self.spaces: dict[tuple[int, int], FeatureCache] = {}
        for path in sorted(root.glob(f"{prefix}-*x*")):
            grid = _parse_grid(path.name[len(prefix) + 1:])
            if grid is not None and path.is_dir():
                self.space(grid)

    def space(self, grid: tuple[int, int]) -> FeatureCache:
        if grid not in self.spaces:
            h, w = grid
            meta = {**self.key, "modality": "dense", "grid": [h, w], "dim": h * w * self.dim, "token_dim": self.dim}
            self.spaces[grid] = FeatureCache(self.root, f"{self.prefix}-{h}x{w}", meta)
        return self.spaces[grid]

    @property
    def repairs(self) -> list[str]:
        return [line for cache in (self.base, *self.spaces.values()) for line in cache.repairs]

    def lookup(self, identities: Sequence[str]) -> tuple[dict[str, tuple[tuple[int, int], str, int]], dict[str, str]]:
        """identity -> (grid, shard, row) for stored items; identity -> reason for known failures."""
        found: dict[str, tuple[tuple[int, int], str, int]] = {}
        for grid, cache in sorted(self.spaces.items()):
            stored, _ = cache.lookup(identities)
            for identity, (shard, row) in stored.items():
                found.setdefault(identity, (grid, shard, row))
        _, failed = self.base.lookup(identities)
        return found, failed

    def grid_for(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The patch grid of a preprocessed image of ``shape`` (..., H, W)."""
        ph, pw = self.key["patch"]
        return shape[-2] // ph, shape[-1] // pw

    def stored(self, grid: tuple[int, int], identities: list[str]) -> bool:
        """Whether every identity already has tokens of ``grid`` (one small index query)."""
        if grid not in self.spaces:
            return False
        found, _ = self.spaces[grid].lookup(identities)
        return len(found) == len(set(identities))

    def add(self, grid: tuple[int, int], identities: list[str], tokens: np.ndarray) -> None:
        self.space(grid).add(identities, tokens.reshape(len(identities), -1))

    def add_failures(self, failures: dict[str, str]) -> None:
        if failures:
            self.base.add([], np.zeros((0, self.dim), np.float32), failures)


def _parse_grid(text: str) -> tuple[int, int] | None:
    h, _, w = text.partition("x")
    return (int(h), int(w)) if h.isdigit() and w.isdigit() else None


def embed_dense(
    backbone: Backbone,
    dataset: ImageDataset,
    cache_dir: str | Path | None = None,
    *,
    spec: DenseSpec = DenseSpec(),
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
) -> DenseFeatures:
    """Patch tokens of every image of ``dataset`` as ``spec`` says, through the cache.

    Only items missing from the cache are extracted (an interrupted run resumes from its finished batches);
    images that cannot be decoded are listed in ``failures`` with their reason (remembered when the file is at
    fault), never dropped silently. A damaged cache is repaired on the way (``repairs``).
    """
    prefix, key = dense_cache_key(backbone, spec)
    store = _Store(cache_root(cache_dir), prefix, key)
    identities = dataset.identities()
    computed, transient = 0, {}
    for attempt in range(3):
        found, failed = store.lookup(identities)
        missing = [i for i, ident in enumerate(identities)
                   if ident not in found and ident not in failed and i not in transient]
        if missing:
            more, count = _compute(backbone, dataset, missing, identities, store, spec, batch_size, num_workers,
                                   progress)
            transient, computed = {**transient, **more}, computed + count
            found, failed = store.lookup(identities)
        try:
            parts, rows, ok = _views(store, identities, found, keep=not transient)
            break
        except DamagedShardsError:
            if attempt == 2:
                raise
    reasons = {i: failed[ident] for i, ident in enumerate(identities) if ident in failed and ident not in found}
    reasons = {**reasons, **transient}
    return DenseFeatures(
        parts=parts, rows=rows, labels=np.asarray(dataset.labels)[ok], item_ids=[dataset.item_id(i) for i in ok],
        indices=ok, class_names=list(dataset.class_names), dataset=dataset.name, split=dataset.split,
        model_id=backbone.model_id, model=model_record(backbone), key=key,
        cache_key=f"{prefix}/{digest(*identities)}",
        failures=[(dataset.item_id(i), reasons[i]) for i in sorted(reasons)],
        computed=computed, repairs=store.repairs)


def _views(store: _Store, identities: list[str], found: dict, keep: bool):
    """Per grid, the stored items' tokens in dataset order (a memory-mapped view; kept in the cache unless this
    run had transient failures); returns (parts, rows, dataset indices)."""
    by_grid: dict[tuple[int, int], list[int]] = {}
    for i, ident in enumerate(identities):
        if ident in found:
            by_grid.setdefault(found[ident][0], []).append(i)
    parts, where = [], {}
    for number, (grid, items) in enumerate(sorted(by_grid.items())):
        cache = store.space(grid)
        locations = [found[identities[i]][1:] for i in items]
        width = grid[0] * grid[1] * store.dim
        view_key = digest(*(f"{i}:{identities[i]}" for i in items))  # which items, and where in the dataset
        view = cache.read_view(view_key) if keep else None
        if view is not None:
            flat = view[0]
        elif keep:
            flat = cache.write_view(view_key, locations, width, items, {})[0]
        else:
            flat = cache.gather(locations, np.empty((len(items), width), np.float32))
        parts.append((grid, flat.reshape(len(items), grid[0] * grid[1], store.dim)))
        where.update({i: (number, row) for row, i in enumerate(items)})
    ok = np.asarray(sorted(where), dtype=np.int64)
    rows = np.asarray([where[int(i)] for i in ok], dtype=np.int64).reshape(-1, 2)
    return tuple(parts), rows, ok


def _collate(batch):
    good = [(i, t) for i, t, _ in batch if t is not None]
    bad = [(i, failure) for i, t, failure in batch if t is None]
    return good, bad


def _compute(backbone, dataset, missing, identities, store, spec, batch_size, num_workers, progress
             ) -> tuple[dict[int, str], int]:
    """Extract items ``missing`` into the cache, storing each batch as it finishes (also when interrupted);
    return this run's transient failures and how many items were extracted."""
    workers = default_workers(backbone.device) if num_workers is None else num_workers
    if len(missing) <= batch_size:
        workers = 0
    loader = DataLoader(_Decoded(dataset, missing, dense_transform(backbone, spec)), batch_size=batch_size,
                        shuffle=False, num_workers=workers, collate_fn=_collate)
    transient: dict[int, str] = {}
    extracted = 0
    bar = tqdm(total=len(missing), unit="img", desc="dense features", disable=not progress, leave=False)
    try:
        for good, bad in loader:
            by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
            for index, tensor in good:
                by_shape.setdefault(tuple(tensor.shape), []).append((index, tensor))
            for shape, group in by_shape.items():
                ids = [identities[i] for i, _ in group]
                if store.stored(store.grid_for(shape), ids):  # another process stored them meanwhile
                    continue
                tokens = dense_tokens(backbone, torch.stack([t for _, t in group]), spec).numpy()
                store.add(tuple(tokens.shape[1:3]), ids, tokens)
                extracted += len(group)
            permanent = {identities[i]: reason for i, (reason, lasting) in bad if lasting}
            transient.update({i: reason for i, (reason, lasting) in bad if not lasting})
            store.add_failures(permanent)
            bar.update(len(good) + len(bad))
    except RuntimeError as exc:
        if "DataLoader worker" in str(exc):
            raise CliplabError(f"an image-decoding worker process died ({exc}); finished work is cached. "
                               "Rerun with --workers 0 to decode in the main process") from exc
        raise
    finally:
        bar.close()
    return transient, extracted
