"""Search breadth chosen on the collection itself: the smallest ``nprobe`` / ``efSearch`` whose recall@10
against exact search reaches a target for image queries AND text queries.

Why: an approximate index's recall depends on the data (a benchmark mixture of 1,000 tight clusters reaches 1.0
at nprobe 15; near-isotropic 512-d data needs hundreds), and text queries sit apart from image vectors (the
modality gap, clip-retrieval issue 76), so a fixed default is either slow or silently wrong. At build time the
index is probed with two query sets: image queries (a seeded sample of the indexed vectors) and text queries
(the model's own embeddings of the collection's captions, else of "a photo of a {c}." for its class names,
else for ImageNet's), their exact top-10 computed by brute force, and the search breadth raised along a short
ladder until both reach ``target``. The ladder is capped (4x the default nprobe, efSearch 1024) to keep
latency bounded; when the cap does not reach the target, the estimate is recorded and reported, and
``--nprobe`` / ``--ef-search`` / ``--index-type flat`` are the user's choices. Product-quantised indexes are
bounded by their codes, not their breadth: they are measured, not tuned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TARGET_RECALL = 0.95
K = 10
IMAGE_PROBES = 256
TEXT_PROBES = 128
EF_LADDER = (256, 512, 1024)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int = K, chunk: int = 100_000) -> np.ndarray:
    """Row positions (m, k) of the ``k`` largest inner products of each query (in no order), by brute force."""
    k = min(k, len(vectors))
    best_scores = np.empty((len(queries), 0), dtype=np.float32)
    best_rows = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        block = queries @ vectors[start:start + chunk].T
        scores = np.concatenate([best_scores, block], axis=1)
        rows = np.concatenate([best_rows, np.broadcast_to(np.arange(start, start + block.shape[1]), block.shape)],
                              axis=1)
        if scores.shape[1] > k:
            keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores, rows = np.take_along_axis(scores, keep, axis=1), np.take_along_axis(rows, keep, axis=1)
        best_scores, best_rows = scores, rows
    return best_rows


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k that the approximate top-k contains (ids or positions)."""
    hits = [len(set(f[f >= 0].tolist()) & set(e.tolist())) for f, e in zip(found, exact)]
    return float(np.mean(hits) / exact.shape[1]) if len(hits) else 1.0


def text_probe_texts(captions: Sequence[str] | None, class_names: Sequence[str] | None, n: int = TEXT_PROBES,
                     seed: int = 0) -> tuple[list[str], str]:
    """Up to ``n`` seeded texts for text queries and where they come from."""
    from ..data.prompts import builtin_class_names

    if captions:
        pool, source = list(dict.fromkeys(captions)), "the collection's captions"
    elif class_names:
        pool, source = [f"a photo of a {c}." for c in class_names], "a photo of a {c}. for its class names"
    else:
        pool, source = [f"a photo of a {c}." for c in builtin_class_names("imagenet")], \
            "a photo of a {c}. for ImageNet's class names"
    if len(pool) > n:
        pool = [pool[i] for i in np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))]
    return pool, source


def _ladder(kind: str, params: dict, nlist: int | None) -> list[dict]:
    if "nprobe" in params and nlist:
        base = int(params["nprobe"])
        return [{"nprobe": p} for p in dict.fromkeys(min(nlist, base * f) for f in (1, 2, 4))]
    if "efSearch" in params:
        base = int(params["efSearch"])
        return [{"efSearch": e} for e in dict.fromkeys([base] + [e for e in EF_LADDER if e > base])]
    return [dict(params)]


def calibrate(index, vectors: np.ndarray, ids: np.ndarray, kind: str, params: dict,
              text_queries: np.ndarray | None, *, target: float = TARGET_RECALL, seed: int = 0,
              tune: bool = True) -> tuple[dict, dict]:
    """(search params, record): the first rung of the ladder reaching ``target`` recall@10 for every query set
    (the last rung when none does); ``tune=False`` measures ``params`` only. ``index`` is a FAISS index over
    ``vectors`` with ``ids``; the record has each rung's recalls and the estimate of the chosen one."""
    import faiss

    from .index import _apply_params

    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(vectors), min(IMAGE_PROBES, len(vectors)), replace=False))
    sets = {"image": np.ascontiguousarray(vectors[picked], dtype=np.float32)}
    if text_queries is not None and len(text_queries):
        sets["text"] = np.ascontiguousarray(text_queries, dtype=np.float32)
    exact = {name: ids[exact_top_k(vectors, q)] for name, q in sets.items()}
    ivf = faiss.try_extract_index_ivf(faiss.downcast_index(index.index) if hasattr(index, "index") else index)
    rungs = _ladder(kind, params, ivf.nlist if ivf is not None else None) if tune else [dict(params)]
    tried = []
    chosen = rungs[-1]
    for rung in rungs:
        _apply_params(index, rung)
        recalls = {name: recall_at_k(index.search(q, K)[1], exact[name]) for name, q in sets.items()}
        tried.append({**rung, "recall": recalls})
        if all(r >= target for r in recalls.values()):
            chosen = rung
            break
    _apply_params(index, chosen)
    estimate = next(t["recall"] for t in tried if {k: t[k] for k in chosen} == chosen)
    record = {"target": target, "k": K, "queries": {name: len(q) for name, q in sets.items()}, "tried": tried,
              "chosen": chosen, "recall": estimate, "met": all(r >= target for r in estimate.values())}
    return {**params, **chosen}, record
