"""Results JSON in CLIP_benchmark's layout plus a ``cliplab`` block."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from .. import __version__
from ..features.embed import RANDOM_WEIGHTS_NOTE
from ..fileio import atomic_write_text

__all__ = ["RANDOM_WEIGHTS_NOTE", "results_record", "write_json"]


def results_record(*, dataset: str, model: dict, task: str, metrics: dict, extra: dict) -> dict:
    """``{dataset, model, pretrained, task, metrics, language}`` as CLIP_benchmark writes, plus ``cliplab``.

    ``model`` is an ``ImageFeatures.model`` record: CLIP_benchmark's ``model`` and ``pretrained``
    names, the ``model_id`` and a weights note.
    """
    return {
        "dataset": dataset,
        "model": model.get("model", ""),
        "pretrained": model.get("pretrained", ""),
        "task": task,
        "metrics": metrics,
        "language": "en",
        "cliplab": {
            "version": __version__,
            "model_id": model.get("model_id", ""),
            "weights": model.get("weights", ""),
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
