"""Zero-shot evaluation of a backbone on a labelled dataset: a thin use of :func:`evaluate`."""

from __future__ import annotations

from pathlib import Path

from ..data.base import ImageDataset, has_labels
from ..errors import DatasetError
from ..features.embed import embed_images
from ..models.backbone import Backbone
from .evaluate import EvaluationReport, evaluate
from .inputs import build_head


def evaluate_zeroshot(
    backbone: Backbone,
    dataset: ImageDataset,
    templates: str | list[str] | None = None,
    output_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    seed: int = 0,
    method: str = "zeroshot",
    embed=None,
    **params,
) -> EvaluationReport:
    """Embed ``dataset``, classify it with a zero-shot ``method``, compute metrics; write JSON + PNGs.

    ``templates=None`` means the method's declared default (the template classifier: the dataset's CLIP_benchmark
    set, else imagenet7; DCLIP "{c}", CuPL its sentences alone, ...). ``embed(backbone, dataset)`` replaces
    ``embed_images`` (the CLI's, which reports cache repairs)."""
    if not has_labels(dataset):
        raise DatasetError(f"{dataset.name}: no labelled images to evaluate")
    head = build_head(method, backbone, dataset.class_names, dataset_name=dataset.name, templates=templates,
                      params=params, cache_dir=cache_dir)
    head.fit()  # bad templates or class names fail before any image is embedded
    if embed is None:
        features = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=num_workers,
                                progress=progress)
    else:
        features = embed(backbone, dataset)
    return evaluate(head, features, output_dir=output_dir, seed=seed)
