"""Record linkage with pooled image-text embeddings (CLIPPINGS, paper 40), and pairwise link metrics.

A record is an image with its text (a crop and its OCR, a photo and its caption). Its embedding is the pooled
``normalise(w * f_img + (1 - w) * f_txt)`` of the L2-normalised image and text embeddings (``w = 0.5``: the
plain mean, ``normalise(f_img + f_txt)``; the paper's pooling of its symmetric bi-encoder). Records link when
one is among the other's ``neighbours`` nearest (FAISS, inner product = cosine) with a cosine of at least
``threshold``; clusters are the connected components of that link graph (scipy). Cosines are clipped to
[-1, 1] before the comparison, so a threshold above 1 links nothing whatever float rounding gives.

Departures: no supervised-contrastive tuning here (the paper fine-tunes both towers on labelled pairs; this
module links with the backbone as loaded); clustering is single linkage (connected components) only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CliplabError, DatasetError


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def pool(image_features: np.ndarray, text_features: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """Pooled record embeddings: ``normalise(w * normalise(image) + (1 - w) * normalise(text))``, (n, d).

    With ``image_weight`` 0.5 the two modalities play the same role (swapping them gives the same vector)."""
    if not 0.0 <= image_weight <= 1.0:
        raise CliplabError(f"image weight {image_weight} outside [0, 1]")
    image, text = _unit(image_features), _unit(text_features)
    if image.shape != text.shape:
        raise CliplabError(f"image features {image.shape} and text features {text.shape} differ in shape")
    return _unit(image_weight * image + (1.0 - image_weight) * text)


def link_pairs(embeddings: np.ndarray, threshold: float, neighbours: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Links ``(i, j)`` with ``i < j`` where one is among the other's ``neighbours`` nearest (itself excluded)
    and their cosine (clipped to [-1, 1]) is at least ``threshold``; returns (pairs (m, 2), cosines (m,))."""
    import faiss

    x = np.ascontiguousarray(_unit(embeddings), dtype=np.float32)
    n = len(x)
    if neighbours < 1:
        raise CliplabError(f"neighbours must be at least 1 (got {neighbours})")
    if n < 2:
        return np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    scores, found = index.search(x, min(neighbours + 1, n))
    best: dict[tuple[int, int], float] = {}
    for i in range(n):
        for score, j in zip(np.clip(scores[i], -1.0, 1.0), found[i]):
            if j < 0 or j == i or score < threshold:
                continue
            key = (min(i, int(j)), max(i, int(j)))
            best[key] = max(best.get(key, -1.0), float(score))
    keys = sorted(best)
    return (np.asarray(keys, dtype=np.int64).reshape(-1, 2), np.asarray([best[k] for k in keys], dtype=np.float32))


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Cluster label per record: the connected components of the graph with ``pairs`` as edges (0..k-1)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def pairwise_scores(predicted: Sequence[int], truth: Sequence[int]) -> dict[str, float]:
    """Pairwise precision, recall and F1 of a clustering: a pair of records is predicted linked when they share
    a predicted cluster and truly linked when they share a true label. Records with a negative true label
    (unlabelled) are left out. No predicted (true) pairs gives precision (recall) 0."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise CliplabError(f"{len(predicted)} predicted clusters but {len(truth)} true labels")
    keep = truth >= 0
    predicted, truth = predicted[keep], truth[keep]

    def pairs(counts: np.ndarray) -> int:
        return int((counts * (counts - 1) // 2).sum())

    if not len(truth):
        raise CliplabError("pairwise scores: no labelled records")
    tp = pairs(np.unique(np.stack([predicted, truth]), axis=1, return_counts=True)[1].astype(np.int64))
    linked = pairs(np.unique(predicted, return_counts=True)[1].astype(np.int64))
    same = pairs(np.unique(truth, return_counts=True)[1].astype(np.int64))
    precision = tp / linked if linked else 0.0
    recall = tp / same if same else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "true_pairs": same, "predicted_pairs": linked,
            "correct_pairs": tp, "records": int(len(truth))}


@dataclass
class Linkage:
    """What ``link_manifest`` found: per record its image, text, true label (-1: none) and cluster; the links."""

    images: list[str]
    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    cluster: np.ndarray
    pairs: np.ndarray
    cosines: np.ndarray
    embeddings: np.ndarray
    scores: dict[str, float] | None = None
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One dict per record (row, image, text, label, cluster, cluster size), in manifest order."""
        sizes = np.bincount(self.cluster) if len(self.cluster) else np.zeros(0, dtype=np.int64)
        return [{"row": k, "image": self.images[k], "text": self.texts[k],
                 "label": self.label_names[self.labels[k]] if self.labels[k] >= 0 else "",
                 "cluster": int(self.cluster[k]), "cluster_size": int(sizes[self.cluster[k]])}
                for k in range(len(self.images))]


def read_records(path: str | Path):
    """A manifest (CSV with a ``path`` header, JSONL or JSON; see ``data.manifest``) whose every row has a
    caption (``caption``/``captions``, the first one is the record's text). Returns (dataset, texts)."""
    from ..data import manifest

    path = Path(path)
    dataset = manifest(path)
    first = 2 if path.suffix == ".csv" else 1
    texts = []
    for k, caps in enumerate(dataset.captions or [[]] * len(dataset)):
        text = next((c for c in caps if isinstance(c, str) and c.strip()), None)
        if text is None:
            raise DatasetError(f"{path}: row {k + first} has no caption (give a 'caption' field: the record's text)")
        texts.append(text)
    return dataset, texts


def link_manifest(backbone, path: str | Path, threshold: float = 0.9, neighbours: int = 10,
                  image_weight: float = 0.5, cache_dir: str | Path | None = None, batch_size: int = 64,
                  workers: int | None = 0, progress: bool = False) -> Linkage:
    """Embed every record of the manifest (image and caption, through the feature caches), pool, link and
    cluster; with true labels (the manifest's ``label`` field) the pairwise scores too.

    A row whose image cannot be read fails in one line naming the manifest and the row."""
    from ..features.embed import embed_images
    from ..features.text import embed_texts

    start = time.perf_counter()
    path = Path(path)
    dataset, texts = read_records(path)
    features = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=workers,
                            progress=progress)
    if features.failures:
        ids = dataset.item_ids()
        item, reason = features.failures[0]
        row = ids.index(item) + (2 if path.suffix == ".csv" else 1) if item in ids else "?"
        raise DatasetError(f"{path}: row {row}: image {item} cannot be read ({reason})")
    image = np.empty((len(dataset), backbone.embed_dim), dtype=np.float32)
    image[np.asarray(features.indices)] = features.features
    embeddings = pool(image, embed_texts(backbone, texts, cache_dir), image_weight)
    pairs, cosines = link_pairs(embeddings, threshold, neighbours)
    cluster = clusters(len(dataset), pairs)
    labels = np.asarray(dataset.labels, dtype=np.int64)
    scores = pairwise_scores(cluster, labels) if (labels >= 0).any() else None
    return Linkage([str(dataset.item_id(k)) for k in range(len(dataset))], texts, labels,
                   list(dataset.class_names), cluster, pairs, cosines,
                   embeddings, scores, time.perf_counter() - start,
                   {"threshold": threshold, "neighbours": neighbours, "image_weight": image_weight})
