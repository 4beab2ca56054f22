"""Zero-shot evaluation of a backbone on a labelled dataset: a thin use of :func:`evaluate`."""

from __future__ import annotations

from pathlib import Path

from ..data.base import ImageDataset, has_labels
from ..errors import DatasetError
from ..features.embed import embed_images
from ..heads.registry import create_head
from ..models.backbone import Backbone
from .evaluate import EvaluationReport, evaluate


def evaluate_zeroshot(
    backbone: Backbone,
    dataset: ImageDataset,
    templates: str | list[str] | None,
    output_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    seed: int = 0,
    method: str = "zeroshot",
    **params,
) -> EvaluationReport:
    """Embed ``dataset``, classify it with a zero-shot ``method``, compute metrics; write JSON + PNGs.

    ``templates=None`` leaves the method's own default (DCLIP's "{c}", CuPL's sentences alone)."""
    if not has_labels(dataset):
        raise DatasetError(f"{dataset.name}: no labelled images to evaluate")
    if templates is not None:
        params["templates"] = templates
    head = create_head(method, backbone=backbone, class_names=dataset.class_names, cache_dir=cache_dir, **params)
    head.fit()  # bad templates or class names fail before any image is embedded
    features = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=num_workers,
                            progress=progress)
    return evaluate(head, features, output_dir=output_dir, seed=seed)
