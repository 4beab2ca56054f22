"""Results JSON in CLIP_benchmark's layout plus a ``cliplab`` block."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from .. import __version__
from ..features.cache import atomic_write_text
from ..models.backbone import Backbone

RANDOM_WEIGHTS_NOTE = "random weights: numbers say nothing about real accuracy"


def weights_note(backbone: Backbone) -> str:
    """"random weights" where the backbone has them, else where the weights came from."""
    if backbone.info.random_weights:
        return RANDOM_WEIGHTS_NOTE
    return f"{backbone.info.source} weights"


def results_record(*, dataset: str, backbone: Backbone, task: str, metrics: dict, extra: dict) -> dict:
    """``{dataset, model, pretrained, task, metrics, language}`` as CLIP_benchmark writes, plus ``cliplab``."""
    return {
        "dataset": dataset,
        "model": backbone.info.name,
        "pretrained": backbone.info.pretrained or backbone.model_id,
        "task": task,
        "metrics": metrics,
        "language": "en",
        "cliplab": {
            "version": __version__,
            "model_id": backbone.model_id,
            "weights": weights_note(backbone),
            "python": platform.python_version(),
            **extra,
        },
    }


def write_json(record: dict, path: Path) -> Path:
    """Write ``record`` atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(record, indent=2, default=_jsonable))


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
