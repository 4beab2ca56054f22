"""Scale-out embedding: a Ray Data pipeline writing parquet shards (``cliplab embed --engine ray``).

items -> ``map_batches`` decode + preprocess (tasks) -> ``map_batches`` encode (an actor pool, each actor
loads the model itself with ``load_model(**model_spec)``, one GPU each when the cluster has GPUs) -> the
driver writes ``part-NNNNN.parquet`` shards as batches arrive (:class:`~cliplab.features.shards.ShardWriter`),
then ``shards.json``. A rerun embeds only the items no complete shard holds. Items with the same identity
(identical files at several paths under ``--hash-content``) are embedded once and stored once per path. An
image that cannot be decoded becomes a ``failures`` entry (path, reason) and never stops the run.

On a cluster (``address``) the workers read the images at the paths the driver sees (a shared file
system), and the driver writes the shards; decoding fuses into the actors when their resources allow.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.base import ImageDataset, Subset, printable
from ..errors import CliplabError, ImageDecodeError
from .shards import ShardWriter

_CACHE: dict[str, object] = {}  # per worker process: objects fetched from the object store once


def _get(ref):
    import ray

    key = ref.hex()
    if key not in _CACHE:
        if len(_CACHE) >= 4:  # a long-lived worker serving several runs keeps only recent ones
            _CACHE.clear()
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


def _file_path(dataset: ImageDataset, index: int) -> Path | None:
    """The image file of item ``index`` when the dataset reads files (through subsets), else None."""
    if isinstance(dataset, Subset):
        return _file_path(dataset.dataset, int(dataset.indices[index]))
    paths = getattr(dataset, "paths", None)
    return Path(paths[index]) if paths is not None else None


def item_path(dataset: ImageDataset, index: int) -> str:
    """The shard ``path`` of an item: the file's absolute path, or the item id for items that are not files."""
    path = _file_path(dataset, index)
    return dataset.item_id(index) if path is None else printable(os.path.abspath(path))


def item_record(dataset: ImageDataset, index: int) -> tuple[str, int, float, list[str]]:
    """``(path, size, mtime, captions)`` of an item: an absolute path with size and mtime for files (-1 and
    0.0 when the file cannot be read), the item id otherwise; all its captions (empty when none)."""
    path = _file_path(dataset, index)
    size, mtime, text = -1, 0.0, item_path(dataset, index)
    if path is not None:
        try:
            stat = path.stat()
            size, mtime = stat.st_size, stat.st_mtime
        except OSError:
            pass
    captions = dataset.captions[index] if dataset.captions is not None else None
    return text, size, mtime, [c for c in (captions or []) if c]


def _decoder(dataset_ref, preprocess_ref, shape: tuple[int, ...]):
    """The decode + preprocess step: {"index"} -> {"index", "pixels", "error"} (zeros and a reason on failure)."""

    def decode(batch: dict) -> dict:
        dataset, preprocess = _get(dataset_ref), _get(preprocess_ref)
        indices = np.asarray(batch["index"], dtype=np.int64)
        pixels = np.zeros((len(indices), *shape), np.float32)
        errors = []
        for row, index in enumerate(indices):
            try:
                pixels[row] = np.asarray(preprocess(dataset.load_image(int(index))), dtype=np.float32)
                errors.append("")
            except ImageDecodeError as exc:
                errors.append(exc.reason or "unreadable")
            except Exception as exc:  # one bad file never ends the run
                errors.append(f"{type(exc).__name__}: {exc}")
        return {"index": indices, "pixels": pixels, "error": np.asarray(errors, dtype=object)}

    return decode


class _Encoder:
    """An actor of the pool: loads the model once, encodes the decoded rows of each batch."""

    def __init__(self, spec: dict):
        import torch

        from ..models import load_model

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.backbone = load_model(**spec)
        self.encoding_id = self.backbone.encoding_id

    def __call__(self, batch: dict) -> dict:
        import torch

        errors = np.asarray(batch["error"], dtype=object)
        good = np.flatnonzero(errors == "")
        embedding = np.zeros((len(errors), self.backbone.embed_dim), np.float32)
        if len(good):
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good]))
            embedding[good] = self.backbone.encode_images(pixels).float().cpu().numpy()
        return {"index": np.asarray(batch["index"], np.int64), "embedding": embedding, "error": errors,
                "encoding_id": np.asarray([self.encoding_id] * len(errors), dtype=object)}


def _driver_model(model_spec: dict):
    """The model loaded on the driver's CPU for its ids and preprocessing; the encoding id the actors use."""
    from ..models import load_model

    spec = {**model_spec, "device": "cpu"}
    precision = spec.get("precision")
    if precision == "fp16":  # CUDA only: the driver needs no inference, so it loads fp32
        spec["precision"] = None
    backbone = load_model(**spec)
    encoding = f"fp16-{spec.get('runtime') or 'torch'}" if precision == "fp16" else backbone.encoding_id
    return backbone, encoding


def embed_with_ray(
    model_spec: dict,
    dataset: ImageDataset,
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    actors: int | None = None,
    address: str | None = None,
    progress: bool = True,
    shard_rows: int | None = None,
    ray_init: dict | None = None,
) -> dict:
    """Embed ``dataset`` with a Ray Data pipeline into a parquet shards folder ``out_dir``.

    ``model_spec``: keyword arguments of ``cliplab.models.load_model`` (each actor loads the model; ``device``
    defaults to ``cuda`` when the cluster has GPUs, one per actor, else ``cpu``). ``actors``: the pool size
    (default: the cluster's GPUs, else half its CPUs). ``address``: a Ray cluster (default: an already
    initialised Ray, else ``ray.init()``'s own choice: ``RAY_ADDRESS`` or a new local instance);
    ``ray_init``: more ``ray.init`` arguments. Returns the ``shards.json`` content plus ``embedded`` (items
    embedded by this run) and ``reused_shards``.
    """
    import ray
    from tqdm.auto import tqdm

    backbone, encoding = _driver_model(model_spec)
    meta = {"model_id": backbone.model_id, "dim": backbone.embed_dim, "preprocess_id": backbone.preprocess_id,
            "encoding_id": encoding}
    identities = dataset.identities()
    keys = [(item_path(dataset, i), identity) for i, identity in enumerate(identities)]
    kwargs = {} if shard_rows is None else {"shard_rows": shard_rows}
    writer = ShardWriter(out_dir, meta, wanted=keys, **kwargs)
    groups: dict[str, list[int]] = {}  # identity -> the items to store with it (one embedding each identity)
    pending = set(writer.done)
    for index, (key, identity) in enumerate(zip(keys, identities, strict=True)):
        if key not in pending:
            pending.add(key)
            groups.setdefault(identity, []).append(index)
    todo = [group[0] for group in groups.values()]
    started = False
    try:
        if todo:
            if not ray.is_initialized():
                ray.init(address=address, **(ray_init or {}))
                started = True
            _run(backbone, model_spec, dataset, todo, identities, groups, writer, encoding, batch_size, actors,
                 progress, tqdm)
    except BaseException:
        writer.flush()  # finished rows stay in complete parts: a rerun resumes
        raise
    finally:
        if started:
            ray.shutdown()
    result = writer.close()
    return {**result, "embedded": writer.written, "reused_shards": writer.reused}


def _run(backbone, model_spec, dataset, todo: Sequence[int], identities, groups: dict[str, list[int]],
         writer: ShardWriter, encoding: str, batch_size: int, actors: int | None, progress: bool, tqdm) -> None:
    import ray
    import ray.data

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    pool = actors or (gpus if gpus else max(1, cpus // 2))
    if gpus:
        pool = min(pool, gpus)
    spec = dict(model_spec)
    if spec.get("device") is None:
        spec["device"] = "cuda" if gpus else "cpu"
    shape = tuple(np.asarray(backbone.preprocess(Image.new("RGB", (64, 64))), dtype=np.float32).shape)

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # our own bar counts images
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context.execution_options.preserve_order = False
    dataset_ref, preprocess_ref = ray.put(dataset), ray.put(backbone.preprocess)
    blocks = max(1, min(len(todo) // batch_size + 1, 4 * cpus))
    items = ray.data.from_items([{"index": int(i)} for i in todo], override_num_blocks=blocks)
    decoded = items.map_batches(_decoder(dataset_ref, preprocess_ref, shape), batch_size=batch_size,
                                batch_format="numpy")
    placement = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    encoded = decoded.map_batches(_Encoder, fn_constructor_kwargs={"spec": spec}, batch_size=batch_size,
                                  batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=pool), **placement)
    bar = tqdm(total=len(todo), unit="img", desc=f"embedding ({pool} actor(s))", disable=not progress, leave=False)
    try:
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            if len(batch["index"]) and set(batch["encoding_id"]) != {encoding}:
                raise CliplabError(f"the Ray actors encode with {sorted(set(batch['encoding_id']))} but the "
                                   f"driver expected {encoding}; check --precision/--runtime for the workers' devices")
            rows, vectors = [], []  # every item sharing an embedded identity gets its own row, same vector
            for row, (index, error) in enumerate(zip(batch["index"], batch["error"], strict=True)):
                identity = identities[int(index)]
                for item in groups.get(identity, [int(index)]):
                    record = item_record(dataset, item)
                    if error:
                        writer.fail(record[0], str(error))
                    else:
                        rows.append((*record, identity))
                        vectors.append(batch["embedding"][row])
            if rows:
                writer.add([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[4] for r in rows],
                           [r[3] for r in rows], np.stack(vectors))
            bar.update(len(batch["index"]))
    finally:
        bar.close()
