"""Record linkage with pooled image-text embeddings (CLIPPINGS, paper 40), and pairwise link metrics.

A record is an image with its text (a crop and its OCR, a photo and its caption). Its embedding is the pooled
``normalise(w * f_img + (1 - w) * f_txt)`` of the L2-normalised image and text embeddings (``w = 0.5``: the
plain mean, ``normalise(f_img + f_txt)``; the paper's pooling of its symmetric bi-encoder). Records link when
one is among the other's ``neighbours`` nearest (FAISS, inner product = cosine) with a cosine of at least
``threshold``; clusters are the connected components of that link graph (scipy). Cosines are clipped to
[-1, 1] before the comparison, so a threshold above 1 links nothing whatever float rounding gives.

Supervised-contrastive tuning (``tune_adapter``): the paper fine-tunes both towers end to end with a
supervised contrastive loss over pooled embeddings of labelled records; here a (d, d) linear adapter, started at
the identity, is trained with the same loss (Khosla et al.'s SupCon, ``supcon_loss``) on frozen pooled
embeddings through the one training loop (``train.engine.run_training``): cheap, CPU-friendly, a departure.
Clustering is single linkage (connected components) only.
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


def supcon_loss(z, labels, temperature: float = 0.1):
    """Supervised contrastive loss (Khosla et al., L_out) of L2-normalised rows ``z`` (torch, (n, d)):
    mean over anchors i with a positive of ``-1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p/t) / sum_{a != i}
    exp(z_i.z_a/t))``, P(i) the other rows with i's label. No anchor with a positive gives 0."""
    import torch

    n = len(z)
    logits = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positive.sum(1)
    anchors = count > 0
    if not anchors.any():
        return z.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(1)[anchors]) / count[anchors]
    return per_anchor.mean()


def apply_adapter(embeddings: np.ndarray, adapter: np.ndarray | None) -> np.ndarray:
    """``normalise(x @ adapter)`` (``None``: ``normalise(x)``)."""
    x = _unit(embeddings)
    return x if adapter is None else _unit(x @ np.asarray(adapter, dtype=np.float32))


def tune_adapter(embeddings: np.ndarray, labels: Sequence[int], epochs: int = 30, lr: float = 1e-2,
                 temperature: float = 0.1, batch_size: int = 256, seed: int = 0, progress: bool = False,
                 device: str | None = "cpu") -> np.ndarray:
    """A (d, d) linear adapter for pooled embeddings, from the identity, trained with ``supcon_loss`` on the
    labelled rows (label >= 0) through ``run_training``; use it with ``apply_adapter``."""
    import torch

    from ..train.engine import TrainSettings, run_training

    labels = np.asarray(labels, dtype=np.int64)
    keep = labels >= 0
    x, y = _unit(embeddings)[keep], labels[keep]
    if not len(y) or not (np.bincount(y) >= 2).any():
        raise CliplabError("supervised-contrastive tuning needs at least one label on two or more records")
    d = x.shape[1]

    class Adapter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.eye(d))

        def forward(self, batch):
            return torch.nn.functional.normalize(batch @ self.weight, dim=-1)

    adapter = Adapter()
    features, targets = torch.from_numpy(x), torch.from_numpy(y)

    def objective(module, batch):
        loss = supcon_loss(module(batch["x"]), batch["y"], temperature)
        return loss, {"supcon": float(loss.detach())}

    def data(epoch, start=0):
        order = np.random.default_rng([seed, epoch]).permutation(len(x))
        batches = [order[b:b + batch_size] for b in range(0, len(x), batch_size)]
        for idx in batches[start:]:
            yield {"x": features[idx], "y": targets[idx]}

    settings = TrainSettings(epochs=epochs, lr=lr, seed=seed, device=device, progress=progress,
                             desc="supcon adapter")
    run_training(adapter, objective, data, settings)
    return adapter.weight.detach().cpu().numpy().astype(np.float32)


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


def embed_records(backbone, path: str | Path, image_weight: float = 0.5, cache_dir: str | Path | None = None,
                  batch_size: int = 64, workers: int | None = 0, progress: bool = False):
    """The manifest's records pooled (image and caption through the feature caches): (dataset, texts, (n, d)).

    A row whose image cannot be read fails in one line naming the manifest and the row."""
    from ..features.embed import embed_images
    from ..features.text import embed_texts

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
    return dataset, texts, pool(image, embed_texts(backbone, texts, cache_dir), image_weight)


def link_manifest(backbone, path: str | Path, threshold: float = 0.9, neighbours: int = 10,
                  image_weight: float = 0.5, cache_dir: str | Path | None = None, batch_size: int = 64,
                  workers: int | None = 0, progress: bool = False, adapter: np.ndarray | None = None) -> Linkage:
    """Embed every record of the manifest (``embed_records``), pool, map through ``adapter`` (from
    ``tune_adapter``, if given), link and cluster; with true labels (the manifest's ``label`` field) the
    pairwise scores too."""
    start = time.perf_counter()
    dataset, texts, pooled = embed_records(backbone, path, image_weight, cache_dir, batch_size, workers, progress)
    embeddings = apply_adapter(pooled, adapter)
    pairs, cosines = link_pairs(embeddings, threshold, neighbours)
    cluster = clusters(len(dataset), pairs)
    labels = np.asarray(dataset.labels, dtype=np.int64)
    scores = pairwise_scores(cluster, labels) if (labels >= 0).any() else None
    return Linkage([str(dataset.item_id(k)) for k in range(len(dataset))], texts, labels,
                   list(dataset.class_names), cluster, pairs, cosines, embeddings, scores,
                   time.perf_counter() - start,
                   {"threshold": threshold, "neighbours": neighbours, "image_weight": image_weight,
                    "tuned": adapter is not None})
