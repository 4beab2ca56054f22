"""Text-to-image and image-to-image search: a FAISS index plus SQLite metadata in one folder.

Layout of an index folder (every file is listed, with size and sha256, in ``manifest.json``, written last):

- ``index.faiss``: an ``IndexIDMap2`` over the chosen index, inner-product metric (cosine: vectors are
  L2-normalised); ids are the stable int64 row ids of ``items.sqlite``.
- ``vectors.npy`` / ``ids.npy``: the embeddings and their ids, so an update or a change of index type never
  needs the images or the feature cache again.
- ``items.sqlite``: path, size, mtime, cache identity, caption and extra fields of each id; caption rows.
- ``captions.npy``: the embedded captions (image-to-text search), when the source has captions.

A build or update holds an exclusive ``fcntl.flock`` on ``.NAME.lock`` beside the index folder (a second
writer fails with one line), writes into a hidden folder beside the target and renames it into place; the old
index is set aside as ``.NAME.old-*`` first, and when a kill lands between the two renames the next writer or
reader puts it back (before anything reads the manifest: ``index_manifest``). ``SearchIndex.open`` refuses a
folder whose manifest is missing or whose files do not match it. Ids continue from the previous build's
``next_id``: an id never names another image.

Every published folder holds ``cliplab-index.json`` (format name, marker version and a fresh id, repeated in the
manifest as ``index_id``). A build replaces only an empty folder, one with that marker, or an index written
before markers (a manifest listing the folder's own files at their sizes), and never a folder holding files of
its own: a user's ``manifest.json`` or ``vectors.npy`` is left alone.

Index types (``index_type``): ``flat`` (exact), ``ivf`` (IVF, nlist ~ sqrt(n), trained on ~64 seeded vectors
a cell with 15 k-means iterations: seconds at 1M x 512), ``ivfpq`` (IVF with
product quantisation, ~d/8 bytes a vector, lossy), ``hnsw`` (HNSW32 graph), any FAISS factory string, or
``auto``: exact below ``EXACT_MAX`` vectors, IVF above. The modality gap: text embeddings sit far from
image embeddings (cosine ~0.3 to their best images, clip-retrieval issue 76), so a text query's nearest
images are spread over many IVF cells and HNSW neighbourhoods. So a build of at least ``CALIBRATE_MIN``
vectors measures recall@10 against exact search for image queries and for the model's own text queries and
raises ``nprobe`` (from nlist/16, at least 16, up to 4x that) or ``efSearch`` (from 256 up to 1024) until both
reach 0.95 (``search/calibrate.py``); the estimate is in the manifest and the report, and a collection where the
cap falls short says so. The parameters can be overridden at build (``search_params``: then only measured) or
open time.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.base import FileImageDataset, ImageDataset, Subset
from ..errors import CliplabError, ModelMismatchError, SearchIndexError, UnknownItemError
from ..fileio import atomic_write_text
from .store import ItemRow, Store, write_store

FORMAT_VERSION = 1
EXACT_MAX = 50_000  # "auto": exact search below this many vectors, IVF above
HNSW_M = 32
HNSW_EF_SEARCH = 256  # text-like recall@10 0.956 at 128, 0.999 at 256 (200k); margin for 1M
HNSW_EF_CONSTRUCTION = 80
IVF_TRAIN_PER_LIST = 64  # training vectors per IVF cell (FAISS warns below 39, the old 256 took > 10 min at 1M)
IVF_NITER = 15  # k-means iterations for the coarse quantiser
IVF_MIN_NPROBE = 16
IVF_NPROBE_FRACTION = 1 / 16  # the calibration's first rung (search/calibrate.py); 1M: p99 < 20 ms
CALIBRATE_MIN = 10_000  # builds of at least this many vectors choose their search breadth by measured recall
MANIFEST = "manifest.json"
REBUILD = "run cliplab index build again"
MARKER = "cliplab-index.json"
MARKER_FORMAT = "cliplab-search-index"
MARKER_VERSION = 1
_OURS = {MANIFEST, MARKER, "index.faiss", "vectors.npy", "ids.npy", "items.sqlite", "captions.npy"}


@dataclass
class Hit:
    """One search result: the item id, its cosine score, file path, first caption and extra fields."""

    id: int
    score: float
    path: str
    caption: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class CaptionHit:
    """One image-to-text result: the caption row, its text, score, and the item it describes."""

    id: int
    score: float
    text: str
    item: int
    path: str


@dataclass
class IndexReport:
    """What a build or update did."""

    index_dir: Path
    count: int
    index_type: str
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    computed: int = 0  # images this call encoded (the rest came from the feature cache)
    captions: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    rebuilt: bool = True  # False when an update added to and removed from the trained index in place
    seconds: float = 0.0
    calibration: dict | None = None  # a build's measured recall@10 and chosen search breadth (search/calibrate.py)


# ----------------------------------------------------------------------------------------------- index types

def ivf_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: ~sqrt(n) (1000 at 1M), at most n / 39 (FAISS's points-per-centroid floor)."""
    return max(1, min(round(math.sqrt(max(n, 1))), n // 39 if n >= 39 else 1))


def index_spec(index_type: str, n: int, dim: int) -> tuple[str, str, dict]:
    """(kind, FAISS factory string, search parameters) for ``index_type`` and ``n`` vectors of ``dim``."""
    kind = (index_type or "auto").strip()
    if kind.lower() == "auto":
        kind = "flat" if n < EXACT_MAX else "ivf"
    lowered = kind.lower()
    nlist = ivf_nlist(n)
    nprobe = min(nlist, max(IVF_MIN_NPROBE, round(nlist * IVF_NPROBE_FRACTION)))
    if lowered == "flat":
        return "flat", "Flat", {}
    if lowered == "ivf":
        return "ivf", f"IVF{nlist},Flat", {"nprobe": nprobe}
    if lowered == "ivfpq":
        m = next(m for m in (dim // 8, dim // 4, dim // 2, dim) if m >= 1 and dim % m == 0)
        bits = 8 if n >= 256 * 39 else 4
        return "ivfpq", f"IVF{nlist},PQ{m}x{bits}", {"nprobe": nprobe}
    if lowered == "hnsw":
        return "hnsw", f"HNSW{HNSW_M},Flat", {"efSearch": HNSW_EF_SEARCH}
    if re.match(r"^(IVF|HNSW|PQ|OPQ|PCA|Flat|LSH|SQ|RR|NSG|IDMap)", kind):
        params = {"nprobe": nprobe} if "IVF" in kind else {"efSearch": HNSW_EF_SEARCH} if "HNSW" in kind else {}
        return "factory", kind, params
    raise CliplabError(f"index type {index_type!r}: use auto, flat, ivf, ivfpq, hnsw or a FAISS factory string")


def min_train_vectors(factory: str) -> int:
    """The fewest vectors FAISS can train ``factory`` on (IVF cells; 2**bits per product quantiser)."""
    need = 0
    for match in re.finditer(r"IVF(\d+)", factory):
        need = max(need, int(match.group(1)))
    for match in re.finditer(r"(?<![A-Za-z])(?:PQ|OPQ)(\d+)(?:x(\d+))?", factory):
        if match.group(0).startswith("OPQ"):
            continue
        need = max(need, 2 ** int(match.group(2) or 8))
    return need


def check_trainable(index_type: str, factory: str, n: int) -> None:
    """CliplabError (one line) when ``n`` vectors are too few to train ``factory``."""
    need = min_train_vectors(factory)
    if n < need:
        raise CliplabError(f"index type {index_type or factory} ({factory}) needs at least {need} vectors to train, "
                           f"the source has {n}; use flat (or auto)")


def train_sample_size(factory: str, n: int) -> int:
    """How many of ``n`` vectors train ``factory``: ~64 per IVF cell (FAISS warns below 39), else 64 per PQ
    centroid."""
    match = re.search(r"IVF(\d+)", factory)
    per = IVF_TRAIN_PER_LIST * (int(match.group(1)) if match else 256)
    return min(n, max(per, min_train_vectors(factory)))


def _faiss():
    import faiss

    return faiss


def _make_index(factory: str, vectors: np.ndarray, ids: np.ndarray, seed: int = 0, *,
                requested: str | None = None):
    """A trained ``IndexIDMap2(factory)`` holding ``vectors`` under ``ids`` (trained on
    ``train_sample_size(factory, n)`` seeded samples)."""
    faiss = _faiss()
    dim = vectors.shape[1]
    try:
        inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise CliplabError(f"FAISS cannot build index type {factory!r}: {str(exc).splitlines()[0]}") from exc
    if hasattr(inner, "hnsw"):
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if not inner.is_trained:
        check_trainable(requested or factory, factory, len(vectors))
        ivf = faiss.try_extract_index_ivf(inner)
        want = train_sample_size(factory, len(vectors))
        sample = vectors
        if ivf is not None:
            ivf.cp.niter = IVF_NITER
            ivf.cp.seed = seed
            if want < 39 * ivf.nlist:  # a small collection: no FAISS warning about it
                ivf.cp.min_points_per_centroid = 1
        if len(vectors) > want:
            sample = vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), want, replace=False))]
        try:
            inner.train(np.ascontiguousarray(sample, dtype=np.float32))
        except RuntimeError as exc:
            raise CliplabError(f"index type {requested or factory} ({factory}) could not be trained on "
                               f"{len(sample)} vectors: {str(exc).strip().splitlines()[0][:200]}; use flat (or auto)"
                               ) from exc
    index = faiss.IndexIDMap2(inner)
    try:
        _add(index, vectors, ids)
    except RuntimeError as exc:
        raise CliplabError(f"index type {requested or factory} ({factory}): FAISS could not add the vectors: "
                           f"{str(exc).strip().splitlines()[0][:200]}") from exc
    return index


def _add(index, vectors: np.ndarray, ids: np.ndarray, chunk: int = 65536) -> None:
    for start in range(0, len(ids), chunk):
        index.add_with_ids(np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32),
                           np.ascontiguousarray(ids[start:start + chunk], dtype=np.int64))


def _apply_params(index, params: dict) -> None:
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if "nprobe" in params:
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None:
            ivf.nprobe = int(params["nprobe"])
    if "efSearch" in params and hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = int(params["efSearch"])


# ----------------------------------------------------------------------------------------------- sources

@dataclass
class _Source:
    dataset: ImageDataset | None
    record: dict  # how to find it again (manifest "source")
    shards: str | None = None


def _resolve(source, hash_content: bool) -> _Source:
    """A folder (recursive scan), a manifest or named dataset, an ImageDataset, or a parquet-shards folder."""
    from ..data import image_files, load_dataset

    if isinstance(source, ImageDataset):
        root = getattr(source, "root", None)
        return _Source(source, {"kind": "dataset-object", "location": str(root) if root else None})
    text = str(source)
    path = Path(text)
    if path.is_dir() and (path / "shards.json").is_file():
        return _Source(None, {"kind": "shards", "location": str(path.resolve())}, str(path.resolve()))
    if path.is_dir():
        return _Source(image_files([path], hash_content), {"kind": "folder", "location": str(path.resolve())})
    if path.is_file():
        return _Source(load_dataset(path, hash_content=hash_content),
                       {"kind": "dataset", "location": str(path.resolve())})
    return _Source(load_dataset(text, hash_content=hash_content), {"kind": "named", "location": text})


def _rows(dataset: ImageDataset, indices: Sequence[int], ids: Sequence[int],
          extras: dict[str, dict] | None = None) -> list[ItemRow]:
    """Store rows for dataset items ``indices`` under ``ids`` (``extras``: manifest columns by absolute path)."""
    rows = []
    for index, item in zip(indices, ids):
        index = int(index)
        path, size, mtime = "", None, None
        file = _file_of(dataset, index)
        if file is not None:
            path = str(Path(os.path.abspath(file)))
            try:
                stat = file.stat()
                size, mtime = stat.st_size, stat.st_mtime
            except OSError:
                pass
        caption = None
        if dataset.captions is not None and dataset.captions[index]:
            caption = dataset.captions[index][0]
        extra = {**(extras or {}).get(path, {}), "name": dataset.item_id(index)}
        label = int(dataset.labels[index]) if len(dataset.labels) > index else -1
        if label >= 0 and label < len(dataset.class_names):
            extra["label"] = dataset.class_names[label]
        rows.append(ItemRow(int(item), dataset.item_id(index), path, size, mtime, dataset.identity(index), caption,
                            extra))
    return rows


def _file_of(dataset: ImageDataset, index: int) -> Path | None:
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, int(dataset.indices[index])
    if isinstance(dataset, FileImageDataset):
        return dataset.paths[index]
    return None


def _shards_table(folder: str, backbone):
    try:
        from ..features.shards import read_shards
    except ImportError as exc:
        raise CliplabError(f"{folder}: parquet shards need cliplab.features.shards, which this install lacks") from exc
    meta, table = read_shards(folder)
    if meta.get("model_id") != backbone.model_id:
        raise ModelMismatchError(f"{folder}: shards were embedded by model {meta.get('model_id')!r}, "
                                 f"not {backbone.model_id!r}; embed them again or load that model")
    return meta, table


# ----------------------------------------------------------------------------------------------- writing

def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _write_and_publish(target: Path, index, vectors, ids, rows, captions, caption_vectors, manifest: dict) -> None:
    """Write a complete index into a scratch folder beside ``target``, then publish it (the manifest last)."""
    folder = _scratch(target)
    try:
        _write_folder(folder, index, vectors, ids, rows, captions, caption_vectors, manifest)
        _publish(folder, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_folder(folder: Path, index, vectors: np.ndarray, ids: np.ndarray, rows: list[ItemRow],
                  captions: list[tuple[int, int, str]], caption_vectors: np.ndarray | None, manifest: dict) -> None:
    """Write every file of an index into the new folder ``folder``; the manifest last."""
    faiss = _faiss()
    faiss.write_index(index, str(folder / "index.faiss"))
    np.save(folder / "vectors.npy", np.ascontiguousarray(vectors, dtype=np.float32))
    np.save(folder / "ids.npy", np.ascontiguousarray(ids, dtype=np.int64))
    write_store(folder / "items.sqlite", rows, captions)
    if caption_vectors is not None:
        np.save(folder / "captions.npy", np.ascontiguousarray(caption_vectors, dtype=np.float32))
    index_id = uuid.uuid4().hex
    atomic_write_text(folder / MARKER, json.dumps({"format": MARKER_FORMAT, "version": MARKER_VERSION,
                                                   "id": index_id}))
    files = {}
    for name in sorted(_OURS - {MANIFEST}):
        path = folder / name
        if path.exists():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    atomic_write_text(folder / MANIFEST, json.dumps({**manifest, "index_id": index_id, "files": files}, indent=1))


def _olds(target: Path) -> list[Path]:
    """Previous versions set aside by an interrupted publish, newest first."""
    found = [p for p in target.parent.glob(f".{target.name}.old-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _valid_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def _publish(folder: Path, target: Path) -> None:
    """Move the finished ``folder`` to ``target``, replacing an older index there (the caller holds the writer
    lock). The old index is set aside as ``.NAME.old-*`` first; a kill between the two renames leaves it
    there, and ``_recover`` (next writer, or the next reader) puts it back."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    os.rename(folder, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _recover(target: Path) -> None:
    """With the writer lock held: put back the newest valid set-aside version when ``target`` is missing (a
    publish was killed between its renames), then drop the other set-aside versions."""
    olds = _olds(target)
    if not target.exists():
        for old in olds:
            if _valid_manifest(old) is not None:
                os.rename(old, target)
                olds.remove(old)
                break
    if target.exists():
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)


def _lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def writer_lock(target: Path, *, wait: bool = False):
    """Hold the exclusive lock of index ``target`` (``.NAME.lock`` beside it) for a whole build or update;
    SearchIndexError at once when another writer holds it (``wait``: block instead)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    path = _lock_path(target)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise SearchIndexError(f"{target}: another cliplab index build or update is writing this index (lock "
                                   f"{path}); wait for it to finish, then run the command again") from None
        try:
            _recover(target)
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _readable_root(root: Path) -> Path:
    """``root``, or after an interrupted publish the set-aside previous version: put back when no writer is
    busy, read where it lies otherwise."""
    if root.is_dir() or not any(_valid_manifest(old) for old in _olds(root)):
        return root
    try:
        with writer_lock(root):
            pass
    except (SearchIndexError, OSError):  # a writer is publishing, or the parent is read-only: read it in place
        return next((old for old in _olds(root) if _valid_manifest(old) is not None), root)
    return root


def _next_id(target: Path) -> int:
    """The first id a new build of ``target`` may use: ids are never reused by the same index folder (the
    service caches /images/{id})."""
    manifest = _valid_manifest(target) if target.is_dir() else None
    try:
        return max(1, int(manifest["next_id"])) if manifest else 1
    except (KeyError, TypeError, ValueError):
        return 1


def _scratch(target: Path) -> Path:
    """A new hidden folder beside ``target`` (same file system, so the final rename is atomic); removes the
    scratch folders of builds whose process is gone."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.build-*"):
        try:
            pid = int(stale.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass
    folder = target.with_name(f".{target.name}.build-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    folder.mkdir()
    return folder


def check_target(target: Path) -> None:
    """Refuse to replace a folder cliplab did not publish: anything but an empty folder, a folder holding only an
    index's files with cliplab's marker, or an index from before markers (a photo folder, or a user's own
    ``manifest.json``/``vectors.npy``, given as --index-dir by mistake)."""
    if not target.exists():
        return
    if not target.is_dir() or any(p.name not in _OURS for p in target.iterdir()):
        raise SearchIndexError(f"{target}: exists and is not a cliplab search index; choose another --index-dir")
    if any(target.iterdir()) and not published_by_cliplab(target):
        raise SearchIndexError(f"{target}: holds files named like a search index's, but cliplab did not write them "
                               f"(no {MARKER}); choose another --index-dir, or move those files away")


def published_by_cliplab(folder: Path) -> bool:
    """True for a folder cliplab published: its marker (format, a version this cliplab knows, an id), or an
    index written before markers existed (a manifest listing exactly files present at the recorded sizes)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        if (isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT
                and isinstance(marker.get("version"), int) and 1 <= marker["version"] <= MARKER_VERSION
                and isinstance(marker.get("id"), str) and marker["id"]):
            return True
    except (OSError, ValueError, RecursionError):
        pass
    manifest = _valid_manifest(folder)
    if manifest is None or (folder / MARKER).exists() or not isinstance(manifest.get("format_version"), int):
        return False
    files = manifest["files"]
    try:
        return bool(files) and set(files) <= _OURS and all(
            (folder / name).is_file() and (folder / name).stat().st_size == facts["size"]
            for name, facts in files.items())
    except (TypeError, KeyError, OSError):
        return False


def index_manifest(index_dir) -> dict | None:
    """The manifest of the index at ``index_dir`` after recovering an interrupted publish (the set-aside index is
    put back, or read where it lies while a writer is busy); None when there is no index there.

    Read this, not ``manifest.json`` directly: after a kill between the two publish renames the folder is gone
    until a writer or reader recovers it."""
    root = _readable_root(Path(index_dir))
    path = root / MANIFEST
    if not root.is_dir() or not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise SearchIndexError(f"{index_dir}: index is half-written or damaged ({MANIFEST} unreadable); "
                               f"{REBUILD}") from exc
    if not isinstance(manifest, dict):
        raise SearchIndexError(f"{index_dir}: index is half-written or damaged ({MANIFEST} is not an object); "
                               f"{REBUILD}")
    return manifest


def _caption_data(backbone, dataset: ImageDataset | None, positions: Sequence[int], ids: Sequence[int], cache_dir):
    """Caption rows (row, item id, text) and their embeddings for dataset items ``positions`` under ``ids``."""
    if dataset is None or dataset.captions is None:
        return [], None
    rows = [(int(item), text) for pos, item in zip(positions, ids) for text in dataset.captions[int(pos)] if text]
    if not rows:
        return [], None
    from ..features.text import embed_texts

    vectors = embed_texts(backbone, [t for _, t in rows], cache_dir)
    return [(row, item, text) for row, (item, text) in enumerate(rows)], vectors


def _manifest(backbone, kind: str, factory: str, params: dict, requested: str, count: int, next_id: int,
              source: dict, hash_content: bool, failures, model_spec: str | dict | None, trained_on: int,
              train_sample: int) -> dict:
    from ..models.runtime import encoding_key

    kwargs = dict(model_spec) if isinstance(model_spec, dict) else None
    if kwargs is not None:  # "model_spec" stays name[:pretrained] for older readers; "model_kwargs" reloads exactly
        name, pretrained = str(kwargs.get("name") or ""), kwargs.get("pretrained")
        model_spec = f"{name}:{pretrained}" if pretrained and ":" not in name else name or None
    return {
        "format_version": FORMAT_VERSION, "model_id": backbone.model_id, "model_spec": model_spec,
        "model_kwargs": kwargs,
        "preprocess_id": backbone.preprocess_id, "encoding": list(encoding_key(backbone, "image")),
        "dim": int(backbone.embed_dim), "count": int(count), "next_id": int(next_id),
        "index_type": kind, "factory": factory, "requested_type": requested, "search_params": params,
        "trained_on": int(trained_on), "train_sample": int(train_sample),
        "metric": "inner_product", "source": source, "hash_content": hash_content,
        "failures": [list(f) for f in failures], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_index(backbone, source, index_dir, *, cache_dir=None, index_type: str = "auto", batch_size: int = 64,
                workers: int | None = None, progress: bool = True, hash_content: bool = False,
                search_params: dict | None = None, model_spec: str | dict | None = None,
                serve_outside: bool = False) -> IndexReport:
    """Embed ``source`` (through the feature cache) and write a complete index into ``index_dir``.

    ``source``: a folder (scanned recursively), a manifest or named dataset, an ``ImageDataset``, or a folder of
    parquet shards from ``cliplab embed --engine ray`` (its ``shards.json``; no embedding, the model must
    match). Images that cannot be read are listed in the report and the manifest. A damaged index folder is
    replaced; a folder that is not an index is refused. Over an existing index, ids continue from its
    ``next_id``. ``model_spec``: the ``load_model`` keywords (or ``name[:pretrained]``) that reload the model.
    ``serve_outside``: recorded in the manifest (kept by updates); lets ``cliplab serve`` show indexed files that
    lie outside the indexed folder (symlinks leading out, manifest rows with ``../`` paths).
    """
    started = time.perf_counter()
    target = Path(index_dir)
    check_target(target)
    with writer_lock(target):
        check_target(target)
        return _build_locked(backbone, source, target, started, cache_dir=cache_dir, index_type=index_type,
                             batch_size=batch_size, workers=workers, progress=progress, hash_content=hash_content,
                             search_params=search_params, model_spec=model_spec, serve_outside=serve_outside)


def _build_locked(backbone, source, target: Path, started: float, *, cache_dir, index_type, batch_size, workers,
                  progress, hash_content, search_params, model_spec, serve_outside=False) -> IndexReport:
    first_id = _next_id(target)
    resolved = _resolve(source, hash_content)
    skipped = [(str(p), r) for p, r in getattr(resolved.dataset, "skipped", [])]
    if resolved.shards is not None:
        meta, table = _shards_table(resolved.shards, backbone)
        vectors = _shard_vectors(table, backbone.embed_dim)
        ids = np.arange(first_id, first_id + len(vectors), dtype=np.int64)
        rows = _shard_rows(table, ids)
        failures = [tuple(f) for f in meta.get("failures", [])]
        every = (table.column("captions").to_pylist() if "captions" in table.column_names
                 else [[row.caption] if row.caption else [] for row in rows])
        pairs = [(row.id, text) for row, texts in zip(rows, every) for text in (texts or []) if text]
        captions = [(r, int(i), t) for r, (i, t) in enumerate(pairs)]  # every caption of every item
        caption_vectors = None
        if captions:
            from ..features.text import embed_texts

            caption_vectors = embed_texts(backbone, [t for _, _, t in captions], cache_dir)
        computed = 0
    else:
        from ..features.embed import embed_images

        dataset = resolved.dataset
        _, factory, _ = index_spec(index_type, len(dataset), backbone.embed_dim)
        check_trainable(index_type, factory, len(dataset))  # before any image is embedded
        features = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=workers,
                                progress=progress)
        vectors = np.asarray(features.features, dtype=np.float32)
        positions = [int(i) for i in features.indices]
        ids = np.arange(first_id, first_id + len(positions), dtype=np.int64)
        rows = _rows(dataset, positions, ids, _manifest_extras(resolved.record))
        failures = list(features.failures)
        captions, caption_vectors = _caption_data(backbone, dataset, positions, ids, cache_dir)
        computed = features.computed
    kind, factory, params = index_spec(index_type, len(vectors), backbone.embed_dim)
    params = {**params, **(search_params or {})}
    index = _make_index(factory, vectors, ids, requested=index_type)
    calibration = None
    if len(ids) >= CALIBRATE_MIN and kind in ("ivf", "ivfpq", "hnsw"):  # breadth from this collection's recall
        from ..features.text import embed_texts
        from .calibrate import calibrate, text_probe_texts

        names = getattr(resolved.dataset, "class_names", None) if resolved.dataset is not None else None
        texts, text_source = text_probe_texts([t for _, _, t in captions], names)
        params, calibration = calibrate(index, vectors, ids, kind, params, embed_texts(backbone, texts, cache_dir),
                                        tune=kind != "ivfpq" and not search_params)
        calibration["text_queries_from"] = text_source
    manifest = _manifest(backbone, kind, factory, params, index_type, len(ids), first_id + len(ids),
                         resolved.record, hash_content, failures, model_spec, len(ids),
                         _trained_sample(index, factory, len(ids)))
    manifest["calibration"] = calibration
    manifest["serve_outside"] = bool(serve_outside)
    _write_and_publish(target, index, vectors, ids, rows, captions, caption_vectors, manifest)
    return IndexReport(target, len(ids), kind, added=len(ids), computed=computed, captions=len(captions),
                       failures=failures, skipped=skipped, seconds=time.perf_counter() - started,
                       calibration=calibration)


def _trained_sample(index, factory: str, n: int) -> int:
    """How many vectors trained ``index`` (0 for index types that need no training)."""
    return train_sample_size(factory, n) if min_train_vectors(factory) else 0


_STANDARD_COLUMNS = {"path", "image", "label", "caption", "captions", "split"}


def _manifest_extras(record: dict) -> dict[str, dict]:
    """Extra columns of a .csv / .jsonl / .json manifest source (everything but path, label, captions and
    split), keyed by the absolute image path; read row by row."""
    location = record.get("location")
    if record.get("kind") != "dataset" or not location:
        return {}
    path = Path(location)
    suffix = path.suffix.lower()

    def rows():
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                yield from csv.DictReader(handle)
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        yield json.loads(line)
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            yield from (data.get("images", []) if isinstance(data, dict) else data)

    out: dict[str, dict] = {}
    try:
        for row in rows():
            if not isinstance(row, dict):
                continue
            file = row.get("path") or row.get("image")
            extra = {k: v for k, v in row.items() if k not in _STANDARD_COLUMNS and k is not None}
            if file and extra:
                out[os.path.abspath(path.parent / str(file))] = extra
    except (OSError, ValueError, UnicodeDecodeError):  # the dataset loader already read it; extras are optional
        return out
    return out


def _shard_vectors(table, dim: int) -> np.ndarray:
    from ..features.shards import table_embeddings

    vectors = table_embeddings(table)
    if len(vectors) and vectors.shape[1] != dim:
        raise ModelMismatchError(f"shard embeddings have dimension {vectors.shape[1]}, the model {dim}")
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _shard_rows(table, ids: np.ndarray) -> list[ItemRow]:
    data = {name: table.column(name).to_pylist() for name in ("path", "size", "mtime", "identity")}
    captions = table.column("caption").to_pylist() if "caption" in table.column_names else [None] * len(ids)
    # the name shown to users is the file's name: an absolute path never goes into extra (the service shows extra)
    return [ItemRow(int(i), p, p if os.path.isabs(p) else "", s, m, ident or p, c, {"name": os.path.basename(p)})
            for i, p, s, m, ident, c in zip(ids, data["path"], data["size"], data["mtime"], data["identity"], captions)]


def update_index(backbone, index_dir, source=None, *, cache_dir=None, index_type: str | None = None,
                 batch_size: int = 64, workers: int | None = None, progress: bool = True,
                 hash_content: bool | None = None) -> IndexReport:
    """Bring ``index_dir`` up to date with its source: embed only new and changed files (the rest keep their
    vectors and ids), drop deleted ones. ``source`` defaults to the one the index was built from.

    While the type is the one asked for at build and the size stays within 4x of the size the index was
    trained at, the manifest's factory string and search parameters (a build-time nprobe / efSearch) are kept:
    an IVF index keeps its trained quantiser and has the changed ids removed and the new vectors added in place
    (``rebuilt`` False); flat and HNSW (no removal) are rebuilt from the stored vectors.
    """
    started = time.perf_counter()
    target = Path(index_dir)
    with writer_lock(target):
        return _update_locked(backbone, target, source, started, cache_dir=cache_dir, index_type=index_type,
                              batch_size=batch_size, workers=workers, progress=progress, hash_content=hash_content)


def _update_locked(backbone, target: Path, source, started: float, *, cache_dir, index_type, batch_size, workers,
                   progress, hash_content) -> IndexReport:
    old = SearchIndex.open(target)
    old.check_model(backbone)
    manifest = old.manifest
    hash_content = manifest.get("hash_content", False) if hash_content is None else hash_content
    if source is None:
        record = manifest.get("source") or {}
        if record.get("kind") in (None, "dataset-object") or not record.get("location"):
            raise CliplabError(f"{target}: was built from an in-memory dataset; pass the source to update it")
        source = record["location"]
    resolved = _resolve(source, hash_content)
    if resolved.dataset is None:
        raise CliplabError(f"{source}: parquet shards cannot be updated in place; run cliplab index build")
    dataset = resolved.dataset
    stored = {row.key: row for row in old._store.all_items()}
    keys = dataset.item_ids()
    identities = dataset.identities()
    unchanged, changed, added = [], [], []
    for position, (key, identity) in enumerate(zip(keys, identities)):
        row = stored.get(key)
        if row is None:
            added.append(position)
        elif row.identity == identity:
            unchanged.append(position)
        else:
            changed.append(position)
    current = set(keys)
    removed_ids = [row.id for key, row in stored.items() if key not in current]
    todo = sorted(changed + added)
    failures: list[tuple[str, str]] = []
    new_vectors = np.empty((0, old.dim), np.float32)
    new_positions: list[int] = []
    computed = 0
    if todo:
        from ..features.embed import embed_images

        features = embed_images(backbone, Subset(dataset, todo), cache_dir, batch_size=batch_size,
                                num_workers=workers, progress=progress)
        new_vectors = np.asarray(features.features, dtype=np.float32)
        new_positions = [todo[int(i)] for i in features.indices]
        failures = list(features.failures)
        computed = features.computed
    next_id = int(manifest["next_id"])
    new_ids = []
    for position in new_positions:
        row = stored.get(keys[position])
        if row is not None:
            new_ids.append(row.id)
        else:
            new_ids.append(next_id)
            next_id += 1
    new_ids = np.asarray(new_ids, dtype=np.int64)
    embedded = set(new_positions)
    failed_changed = [stored[keys[p]].id for p in changed if p not in embedded]
    drop = set(removed_ids) | set(failed_changed) | {stored[keys[p]].id for p in changed}
    old_ids = np.load(target / "ids.npy", mmap_mode="r")
    old_vectors = np.load(target / "vectors.npy", mmap_mode="r")
    keep = np.flatnonzero(~np.isin(old_ids, np.fromiter(drop, np.int64, len(drop)))) if drop else np.arange(
        len(old_ids))
    ids = np.concatenate([np.asarray(old_ids[keep]), new_ids])
    vectors = np.concatenate([np.asarray(old_vectors[keep]), new_vectors]) if len(ids) else np.empty(
        (0, old.dim), np.float32)
    requested = index_type or manifest.get("requested_type", "auto")
    kind, factory, params = index_spec(requested, len(ids), old.dim)
    trained_on = int(manifest.get("trained_on", 0) or 0)
    same = (requested == manifest.get("requested_type", "auto") and kind == manifest["index_type"]
            and trained_on > 0 and trained_on / 4 <= len(ids) <= 4 * trained_on)
    if same:  # the type the user asked for, and a size the trained index still suits: keep its shape and params
        factory, params = manifest["factory"], dict(manifest.get("search_params", {}))
    in_place = same and "IVF" in factory and "HNSW" not in factory and kind != "flat"
    rebuilt = True
    if in_place:
        index = old._index
        if drop:
            index.remove_ids(np.fromiter(drop, np.int64, len(drop)))
        try:
            _add(index, new_vectors, new_ids)
        except RuntimeError as exc:
            raise CliplabError(f"{target}: FAISS could not add the new vectors "
                               f"({str(exc).strip().splitlines()[0][:200]}); {REBUILD}") from exc
        rebuilt = False
    else:
        index = _make_index(factory, vectors, ids, requested=requested)
    # metadata: every kept or new item, with its current caption and file facts
    position_of = {key: p for p, key in enumerate(keys)}
    by_id = {row.id: row for row in stored.values()}
    kept_ids = [int(i) for i in old_ids[keep]]
    rows = _rows(dataset, [position_of[by_id[i].key] for i in kept_ids] + new_positions, kept_ids + list(new_ids),
                 _manifest_extras(resolved.record))
    captions, caption_vectors = _caption_data(backbone, dataset, [position_of[r.key] for r in rows],
                                              [r.id for r in rows], cache_dir)
    trained_on = trained_on if not rebuilt else len(ids)
    sample = int(manifest.get("train_sample", 0)) if not rebuilt else _trained_sample(index, factory, len(ids))
    failures_all = failures + [tuple(f) for f in manifest.get("failures", [])
                               if f[0] in current and f[0] not in {keys[p] for p in todo}]
    new_manifest = _manifest(backbone, kind, factory, params, requested, len(ids), next_id, resolved.record,
                             hash_content, failures_all, manifest.get("model_kwargs") or manifest.get("model_spec"),
                             trained_on, sample)
    new_manifest["serve_outside"] = bool(manifest.get("serve_outside", False))
    old.close()
    _write_and_publish(target, index, vectors, ids, rows, captions, caption_vectors, new_manifest)
    return IndexReport(target, len(ids), kind, added=sum(1 for p in new_positions if keys[p] not in stored),
                       changed=sum(1 for p in new_positions if keys[p] in stored), removed=len(removed_ids)
                       + len(failed_changed), unchanged=len(unchanged), computed=computed, captions=len(captions),
                       failures=failures_all, skipped=[(str(p), r) for p, r in getattr(dataset, "skipped", [])],
                       rebuilt=rebuilt, seconds=time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------- reading

_FLAG_NAMES = {"long_text_positions": "long-positions"}  # load_model keywords whose CLI flag is named otherwise


def model_flags(spec) -> str:
    """The CLI flags that reload the model ``spec`` (a manifest's ``model_spec``: load_model keywords or
    ``name[:pretrained]``)."""
    if not spec:
        return ""
    if isinstance(spec, str):
        return f"--model {spec}"
    parts = []
    for key, value in spec.items():
        if value is None or key == "device" or key == "seed" and value == 0:  # the device is this machine's
            continue
        if value is False and key != "quick_gelu":  # off by default: no flag needed (quick_gelu has --no-quick-gelu)
            continue
        flag = "--model" if key == "name" else "--" + _FLAG_NAMES.get(key, key.replace("_", "-"))
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


class SearchIndex:
    """An index folder opened for queries (thread-safe for concurrent searches)."""

    def __init__(self, root: Path, manifest: dict, index, store: Store):
        self.root = root
        self.manifest = manifest
        self.model_id: str = manifest["model_id"]
        self.dim: int = int(manifest["dim"])
        self.index_type: str = manifest["index_type"]
        self.count: int = int(manifest["count"])
        self.search_params: dict = dict(manifest.get("search_params", {}))
        self._index = index
        self._store = store
        self._captions: np.ndarray | None = None

    @classmethod
    def open(cls, index_dir, *, verify: bool = False, search_params: dict | None = None) -> SearchIndex:
        """Open ``index_dir``; refuses a missing, half-written or damaged folder (file sizes are checked
        against the manifest, and with ``verify`` their sha256 too). ``search_params`` overrides
        ``nprobe`` / ``efSearch``."""
        root = Path(index_dir)
        root = _readable_root(root)
        if not root.is_dir():
            raise SearchIndexError(f"{root}: no search index here; run cliplab index build first")
        try:
            manifest = json.loads((root / MANIFEST).read_text())
            files = manifest["files"]
            for key in ("model_id", "dim", "count", "index_type", "format_version", "next_id"):
                manifest[key]  # noqa: B018 - presence check
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SearchIndexError(f"{root}: index is half-written or damaged (no complete {MANIFEST}); "
                                   f"{REBUILD}") from exc
        if manifest["format_version"] > FORMAT_VERSION:
            raise SearchIndexError(f"{root}: index format {manifest['format_version']} is newer than this cliplab "
                                   f"reads ({FORMAT_VERSION}); upgrade cliplab or {REBUILD}")
        for name, facts in files.items():
            path = root / name
            size = path.stat().st_size if path.is_file() else None
            if size != facts["size"] or (verify and _sha256(path) != facts["sha256"]):
                state = "missing" if size is None else "truncated or changed"
                raise SearchIndexError(f"{root}: index is half-written or damaged ({name} is {state}); {REBUILD}")
        for name in ("index.faiss", "items.sqlite", "ids.npy", "vectors.npy"):
            if name not in files:
                raise SearchIndexError(f"{root}: index is half-written or damaged ({name} not in {MANIFEST}); "
                                       f"{REBUILD}")
        faiss = _faiss()
        try:
            index = faiss.read_index(str(root / "index.faiss"))
        except RuntimeError as exc:
            raise SearchIndexError(f"{root}: index is half-written or damaged (index.faiss unreadable); "
                                   f"{REBUILD}") from exc
        if index.d != int(manifest["dim"]) or index.ntotal != int(manifest["count"]):
            raise SearchIndexError(f"{root}: index is half-written or damaged (index.faiss holds {index.ntotal} "
                                   f"vectors of {index.d}, the manifest says {manifest['count']} of "
                                   f"{manifest['dim']}); {REBUILD}")
        params = {**manifest.get("search_params", {}), **(search_params or {})}
        _apply_params(index, params)
        opened = cls(root, manifest, index, Store(root / "items.sqlite"))
        opened.search_params = params
        return opened

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> SearchIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.count

    @property
    def failures(self) -> list[tuple[str, str]]:
        """Source files the build could not read, with reasons."""
        return [tuple(f) for f in self.manifest.get("failures", [])]

    def check_model(self, backbone) -> None:
        """Raise ModelMismatchError unless ``backbone`` is the model that built this index."""
        if backbone.model_id != self.model_id:
            flags = model_flags(self.manifest.get("model_kwargs") or self.manifest.get("model_spec"))
            how = f"load it with {flags}" if flags else "load that model"
            raise ModelMismatchError(f"{self.root}: index was built with model {self.model_id!r}, the query model "
                                     f"is {backbone.model_id!r}; {how} (or leave --model out to use the index's), "
                                     "or rebuild the index with this one")

    def search_vectors(self, queries, k: int = 20) -> list[list[Hit]]:
        """The ``k`` best items for each row of ``queries`` (n, dim) by inner product (cosine for normalised
        vectors), best first."""
        queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise CliplabError(f"query vectors of shape {queries.shape}; this index holds dimension {self.dim}")
        if k < 1:
            raise CliplabError(f"k = {k}: ask for at least one result")
        if not np.isfinite(queries).all():
            raise CliplabError("query vectors hold NaN or infinite values")
        if self.count == 0:
            return [[] for _ in range(len(queries))]
        scores, ids = self._index.search(queries, min(k, self.count))
        rows = self._store.items({int(i) for i in ids.ravel() if i >= 0})
        out = []
        for score_row, id_row in zip(scores, ids):
            hits = []
            for score, item in zip(score_row, id_row):
                row = rows.get(int(item))
                if item >= 0 and row is not None:
                    hits.append(Hit(int(item), float(score), row.path or row.key, row.caption, dict(row.extra)))
            out.append(hits)
        return out

    def text_vector(self, backbone, text: str) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise CliplabError("the text query is empty; give some words to search for")
        self.check_model(backbone)
        return backbone.encode_texts([text]).numpy().astype(np.float32)

    def image_vector(self, backbone, image) -> np.ndarray:
        from ..data.images import to_rgb

        self.check_model(backbone)
        tensor = backbone.preprocess(to_rgb(image)).unsqueeze(0)
        return backbone.encode_images(tensor).numpy().astype(np.float32)

    def search_text(self, backbone, text: str, k: int = 20) -> list[Hit]:
        """Images that match ``text`` best."""
        return self.search_vectors(self.text_vector(backbone, text), k)[0]

    def search_image(self, backbone, image, k: int = 20) -> list[Hit]:
        """Images most similar to the PIL ``image``."""
        return self.search_vectors(self.image_vector(backbone, image), k)[0]

    @property
    def caption_count(self) -> int:
        return self._caption_vectors().shape[0] if "captions.npy" in self.manifest["files"] else 0

    def _caption_vectors(self) -> np.ndarray:
        if self._captions is None:
            if "captions.npy" not in self.manifest["files"]:
                raise CliplabError(f"{self.root}: the indexed source has no captions to search")
            self._captions = np.load(self.root / "captions.npy", mmap_mode="r")
        return self._captions

    def search_captions(self, backbone, image, k: int = 20) -> list[CaptionHit]:
        """Stored captions that describe the PIL ``image`` best (exact search)."""
        vectors = self._caption_vectors()
        query = self.image_vector(backbone, image)[0]
        scores = np.asarray(vectors @ query, dtype=np.float32)
        k = min(k, len(scores))
        best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        best = best[np.lexsort((best, -scores[best]))]
        captions = self._store.caption_rows(int(r) for r in best)
        best = [r for r in best if int(r) in captions]
        items = self._store.items({captions[int(r)][0] for r in best})
        return [CaptionHit(int(r), float(scores[r]), captions[int(r)][1], captions[int(r)][0],
                           items[captions[int(r)][0]].path if captions[int(r)][0] in items else "") for r in best]

    def item(self, id: int) -> dict | None:  # noqa: A002 - the contract's name
        """The stored facts of item ``id`` (id, path, size, mtime, caption, extra), or None."""
        row = self._store.items([int(id)]).get(int(id))
        return row.as_dict() if row is not None else None

    def image_file(self, id: int) -> Path:  # noqa: A002
        """The image file of item ``id``; UnknownItemError for an id the index does not hold."""
        try:
            row = self._store.items([int(id)]).get(int(id))
        except (TypeError, ValueError, OverflowError):
            row = None
        if row is None:
            raise UnknownItemError(f"{self.root}: no item with id {id!r}")
        if not row.path:
            raise UnknownItemError(f"{self.root}: item {id} ({row.key}) is not a file")
        path = Path(row.path)
        if not path.is_file():
            raise UnknownItemError(f"{self.root}: item {id} ({row.key}) is gone from disk; run cliplab index update")
        return path

    def ids(self) -> np.ndarray:
        return np.load(self.root / "ids.npy")

    def info(self) -> dict[str, Any]:
        """Summary for printing and the service's /info."""
        return {"model_id": self.model_id, "dim": self.dim, "count": self.count, "index_type": self.index_type,
                "factory": self.manifest.get("factory"), "search_params": self.search_params,
                "captions": self.caption_count, "failures": len(self.failures), "created": self.manifest.get("created")}
