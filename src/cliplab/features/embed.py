"""Embedding datasets and texts through the cache: DataLoader workers, progress, resume."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.base import ImageDataset
from ..errors import CliplabError, ImageDecodeError
from ..fileio import digest
from ..models.backbone import Backbone
from ..models.runtime import BASELINE, encoding_key
from .cache import DamagedShardsError, FeatureCache, cache_root
from .values import ImageFeatures

SHARD_ITEMS = 1024
RANDOM_WEIGHTS_NOTE = "random weights: numbers say nothing about real accuracy"


class _Decoded(Dataset):
    """Dataset items ``indices`` as (index, tensor or None, failure reason or None)."""

    def __init__(self, dataset: ImageDataset, indices: Sequence[int], preprocess):
        self.dataset, self.indices, self.preprocess = dataset, list(indices), preprocess

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        try:
            return index, self.preprocess(self.dataset.load_image(index)), None
        except ImageDecodeError as exc:
            return index, None, (exc.reason, exc.permanent)
        except Exception as exc:  # one bad file never ends a long run; not remembered: may be transient
            return index, None, (f"{type(exc).__name__}: {exc}", False)


def _collate(batch):
    good = [(i, t) for i, t, _ in batch if t is not None]
    bad = [(i, failure) for i, t, failure in batch if t is None]
    tensors = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], tensors, bad


def image_cache(backbone: Backbone, cache_dir: str | Path | None = None) -> FeatureCache:
    """The cache space for ``backbone``'s image embeddings under its preprocessing, precision and runtime
    (fp32 torch keeps the key it had before those options existed)."""
    root = cache_root(cache_dir)
    encoding = encoding_key(backbone, "image")
    space = "img-" + digest(backbone.model_id, backbone.preprocess_id, *encoding)
    meta = {"model_id": backbone.model_id, "preprocess": backbone.preprocess_id, "dim": backbone.embed_dim,
            "modality": "image", "encoding": encoding[0] if encoding else BASELINE}
    return FeatureCache(root, space, meta)


def default_workers(device: torch.device | str = "cpu") -> int:
    """Decoding workers. On a GPU: one per core (at most 8). On the CPU the model needs the cores, and
    decoding is ~100x cheaper than a ViT forward, so a quarter of the cores (at least 1, at most 4)."""
    cores = os.cpu_count() or 1
    if torch.device(device).type == "cuda":
        return min(8, cores)
    return max(1, min(4, cores // 4))


def embed_images(
    backbone: Backbone,
    dataset: ImageDataset,
    cache_dir: str | Path | None = None,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
) -> ImageFeatures:
    """Embed every image of ``dataset``; L2-normalised float32 (n, d), read memory-mapped from the cache.

    Only items missing from the cache are computed (an interrupted run resumes); images that cannot
    be decoded are skipped, remembered and reported in ``failures``, never dropped silently. A damaged
    cache is repaired on the way (``repairs`` says what): features lost with a damaged shard are
    recomputed in the same call.
    """
    cache = image_cache(backbone, cache_dir)
    identities = dataset.identities()
    view_key = digest(*identities)
    view = cache.read_view(view_key)
    computed, transient = 0, {}
    for attempt in range(3):
        if view is not None:
            break
        found, failed = cache.lookup(identities)
        missing = [i for i, ident in enumerate(identities)
                   if ident not in found and ident not in failed and i not in transient]
        if missing:
            more, count = _compute(backbone, dataset, missing, identities, cache, batch_size, num_workers, progress)
            transient, computed = {**transient, **more}, computed + count
            found, failed = cache.lookup(identities)
        ok = [i for i, ident in enumerate(identities) if ident in found]
        reasons = {i: failed[ident] for i, ident in enumerate(identities) if ident in failed and ident not in found}
        locations = [found[identities[i]] for i in ok]
        try:
            if transient:  # incomplete: keep it out of the stored views so the next run retries those files
                out = cache.gather(locations, np.empty((len(ok), backbone.embed_dim), np.float32))
                view = out, np.asarray(ok, dtype=np.int64), reasons
            else:
                view = cache.write_view(view_key, locations, backbone.embed_dim, ok, reasons)
        except DamagedShardsError:
            if attempt == 2:
                raise
    features, ok, reasons = view
    reasons = {**reasons, **transient}
    return ImageFeatures(
        features=features,
        labels=dataset.labels[ok],
        item_ids=[dataset.item_id(i) for i in ok],
        indices=ok,
        class_names=list(dataset.class_names),
        dataset=dataset.name,
        split=dataset.split,
        split_info=dict(dataset.split_info),
        model_id=backbone.model_id,
        model=model_record(backbone),
        cache_key=f"{cache.space}/{view_key}",
        failures=[(dataset.item_id(i), reasons[i]) for i in sorted(reasons)],
        computed=computed,
        repairs=list(cache.repairs),
    )


def model_record(backbone: Backbone) -> dict:
    """The model as results JSON names it: CLIP_benchmark's ``model``/``pretrained``, id and weights note."""
    model, pretrained = backbone.benchmark_names()
    weights = RANDOM_WEIGHTS_NOTE if backbone.info.random_weights else f"{backbone.info.source} weights"
    return {"model": model, "pretrained": pretrained, "model_id": backbone.model_id, "weights": weights,
            "display_name": getattr(backbone, "display_name", model)}


def _compute(backbone, dataset, missing, identities, cache, batch_size, num_workers, progress
             ) -> tuple[dict[int, str], int]:
    """Embed items ``missing`` into the cache, a shard at a time; return this run's transient failures and
    how many items this process encoded (batches another process stored meanwhile are skipped).

    Finished work is flushed even when the run is interrupted (Ctrl-C, an error), so a rerun resumes.
    """
    workers = default_workers(backbone.device) if num_workers is None else num_workers
    if len(missing) <= batch_size:
        workers = 0
    loader = DataLoader(
        _Decoded(dataset, missing, backbone.preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=backbone.device.type == "cuda",
    )
    shard_items = batch_size * max(1, SHARD_ITEMS // batch_size)
    pending_ids: list[str] = []
    pending: list[np.ndarray] = []
    pending_failures: dict[str, str] = {}
    transient: dict[int, str] = {}
    encoded = 0
    bar = tqdm(total=len(missing), unit="img", desc="embedding", disable=not progress, leave=False)
    try:
        for indices, tensors, bad in loader:
            batch_ids = [identities[i] for i in indices]
            if tensors is not None and not _all_stored(cache, batch_ids):  # another process may have done it
                pending.append(backbone.encode_images(tensors).numpy())
                pending_ids += batch_ids
                encoded += len(batch_ids)
            for index, (reason, permanent) in bad:
                if permanent:
                    pending_failures[identities[index]] = reason
                else:
                    transient[index] = reason
            bar.update(len(indices) + len(bad))
            if len(pending_ids) + len(pending_failures) >= shard_items:
                _flush(cache, pending_ids, pending, pending_failures, backbone.embed_dim)
                pending_ids, pending, pending_failures = [], [], {}
    except RuntimeError as exc:
        if "DataLoader worker" in str(exc):
            raise CliplabError(f"an image-decoding worker process died ({exc}); finished work is cached. "
                               "Rerun with --workers 0 to decode in the main process") from exc
        raise
    finally:
        _flush(cache, pending_ids, pending, pending_failures, backbone.embed_dim)
        bar.close()
    return transient, encoded


def _all_stored(cache: FeatureCache, identities: list[str]) -> bool:
    """Whether every identity already has features (one small index query per batch)."""
    found, _ = cache.lookup(identities)
    return len(found) == len(set(identities))


def _flush(cache: FeatureCache, ids, blocks, failures, dim: int) -> None:
    if ids or failures:
        features = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)
        cache.add(ids, features, failures)
