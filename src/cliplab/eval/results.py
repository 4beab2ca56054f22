"""Results JSON in CLIP_benchmark's layout plus a ``cliplab`` block."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from .. import __version__
from ..features.embed import RANDOM_WEIGHTS_NOTE
from ..fileio import atomic_write_text

__all__ = ["RANDOM_WEIGHTS_NOTE", "results_model_name", "results_record", "write_json"]


def results_model_name(model: dict) -> str:
    """The results JSON's ``model``: CLIP_benchmark's architecture name where the person named an open_clip
    model (``ViT-B-32`` with ``pretrained`` beside it, ``tiny``), else the name they gave (``recipe:NAME``, the
    folder or file path), never the internal id (``dir:<hash>:qgelu0``, kept in the ``cliplab`` block)."""
    arch, shown = str(model.get("model", "")), str(model.get("display_name") or "")
    if not shown or shown == arch or shown.startswith(arch + ":"):
        return arch
    return shown


def results_record(*, dataset: str, model: dict, task: str, metrics: dict, extra: dict) -> dict:
    """``{dataset, model, pretrained, task, metrics, language}`` as CLIP_benchmark writes, plus ``cliplab``.

    ``model`` is an ``ImageFeatures.model`` record: CLIP_benchmark's ``model`` and ``pretrained``
    names, the ``model_id`` and a weights note.
    """
    return {
        "dataset": dataset,
        "model": results_model_name(model),
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
