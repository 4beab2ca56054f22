"""Zero-shot image-text retrieval: Recall@k both ways, as CLIP_benchmark defines it.

CLIP_benchmark (``clip_benchmark/metrics/zeroshot_retrieval.py``) scores every caption against every
image (``scores = texts @ images.T`` of L2-normalised embeddings) and names the metrics by what is
retrieved:

- ``image_retrieval_recall@k`` (text -> image): the fraction of captions whose own image is among
  the k images scoring highest for that caption;
- ``text_retrieval_recall@k`` (image -> text): the fraction of images with at least one of their
  captions among the k captions scoring highest for that image.

Both are "CLIP-paper" recall (hit or miss per query), not recall as true positives / positives.
Ties among scores are broken by ``torch.topk`` as CLIP_benchmark does; k larger than the number of
candidates is clipped to it (CLIP_benchmark would fail). Images that cannot be decoded are left out
with their captions and listed in the JSON.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.base import ImageDataset
from ..errors import DatasetError
from ..features.embed import embed_images
from ..features.text import embed_texts
from ..fileio import digest
from ..models.backbone import Backbone
from .results import results_record, write_json

TASK = "zeroshot_retrieval"


@dataclass
class RetrievalReport:
    """Metrics, the results record, counts and the files written."""

    metrics: dict
    record: dict
    num_images: int
    num_texts: int
    truncated_texts: int | None
    files: dict = field(default_factory=dict)


def _hits_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int, batch: int = 1024) -> torch.Tensor:
    """Per row: 1.0 if any of the top-k columns is a positive, else 0.0."""
    k = min(k, scores.shape[1])
    out = []
    for start in range(0, len(scores), batch):
        top = torch.topk(scores[start:start + batch], k, dim=1).indices
        out.append(torch.gather(positives[start:start + batch], 1, top).any(dim=1).float())
    return torch.cat(out) if out else torch.zeros(0)


def retrieval_metrics(image_features: np.ndarray | torch.Tensor, text_features: np.ndarray | torch.Tensor,
                      text_image_index: Sequence[int], recall_k: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """CLIP_benchmark's ``image_retrieval_recall@k`` and ``text_retrieval_recall@k`` for each k.

    ``image_features`` (n, d) and ``text_features`` (m, d) are L2-normalised; ``text_image_index[j]`` is
    the row of caption j's image.
    """
    images = torch.as_tensor(np.asarray(image_features, dtype=np.float32))
    texts = torch.as_tensor(np.asarray(text_features, dtype=np.float32))
    index = torch.as_tensor(np.asarray(text_image_index, dtype=np.int64))
    if len(index) != len(texts) or (len(index) and (index.min() < 0 or index.max() >= len(images))):
        raise ValueError(f"text_image_index needs one image row in [0, {len(images)}) per text ({len(texts)})")
    if not len(images) or not len(texts):
        raise DatasetError("retrieval needs at least one image and one caption")
    if any(int(k) < 1 for k in recall_k):
        raise ValueError(f"recall_k must be positive; got {list(recall_k)}")
    scores = texts @ images.T  # (texts, images)
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(texts)), index] = True
    metrics = {}
    for k in recall_k:
        metrics[f"image_retrieval_recall@{k}"] = float(_hits_at_k(scores, positives, int(k)).double().mean())
        metrics[f"text_retrieval_recall@{k}"] = float(_hits_at_k(scores.T, positives.T, int(k)).double().mean())
    return metrics


def evaluate_retrieval(
    backbone: Backbone,
    dataset: ImageDataset,
    output_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    progress: bool = True,
    recall_k: Sequence[int] = (1, 5, 10),
    long_text: str | None = None,
) -> RetrievalReport:
    """Embed ``dataset``'s images and captions (cached), compute Recall@k both ways; write the JSON atomically.

    ``long_text`` (default ``backbone.long_text``) says what happens to captions longer than the
    model's context (``Backbone.encode_texts``); how many were longer is recorded.
    """
    start = time.perf_counter()
    if dataset.captions is None:
        raise DatasetError(f"{dataset.name}: no captions to retrieve (a caption manifest or COCO-style set is needed)")
    features = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=workers,
                            progress=progress)
    texts, owner = [], []
    for row, item in enumerate(features.indices):
        captions = [c for c in dataset.captions[int(item)] if isinstance(c, str) and c.strip()]
        texts += captions
        owner += [row] * len(captions)
    if not texts:
        raise DatasetError(f"{dataset.name}: none of the {len(features.indices)} embedded images has a caption")
    policy = long_text or backbone.long_text
    lengths = backbone.text_lengths(texts)
    truncated = None if lengths is None else sum(n > backbone.context_length for n in lengths)
    text_features = embed_texts(backbone, texts, cache_dir, long_text=policy)
    metrics = retrieval_metrics(features.features, text_features, owner, recall_k)
    extra = {
        "task_definitions": {"image_retrieval_recall@k": "text -> image: fraction of captions whose image is in "
                                                         "the top k", "text_retrieval_recall@k": "image -> text: "
                                                         "fraction of images with a caption in the top k"},
        "split": dataset.split,
        "num_images": len(features.indices),
        "num_texts": len(texts),
        "recall_k": [int(k) for k in recall_k],
        "long_text": {"policy": policy, "context_length": backbone.context_length, "longer_than_context": truncated},
        "feature_cache_keys": {"images": features.cache_key},
        "text_encoding": backbone.text_encoding_id,
        "failed_images": [{"item": item, "reason": reason} for item, reason in features.failures],
        "elapsed_seconds": round(time.perf_counter() - start, 3),
    }
    record = results_record(dataset=dataset.name, model=features.model, task=TASK, metrics=metrics, extra=extra)
    report = RetrievalReport(metrics, record, len(features.indices), len(texts), truncated)
    if output_dir is not None:
        model = Path(str(record["model"])).name
        tag = digest(backbone.model_id, str(features.cache_key), policy, repr(list(recall_k)),
                     backbone.text_encoding_id)[:8]
        stem = f"retrieval_{dataset.name}_{dataset.split}_{model}_{tag}".replace("/", "-").replace(":", "-")
        report.files["json"] = write_json(record, Path(output_dir) / f"{stem}.json")
    return report
