"""Backbones: ``load_model(name_or_path)`` -> :class:`Backbone` (open_clip, Hugging Face, local, tiny)."""

from .backbone import Backbone, BackboneInfo
from .loader import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_SPEC,
    DEFAULT_PRETRAINED,
    default_device,
    load_model,
    resolve_model_spec,
)
from .runtime import DEFAULT_PRECISION, DEFAULT_RUNTIME, PRECISIONS, RUNTIMES

__all__ = [
    "Backbone",
    "BackboneInfo",
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_SPEC",
    "DEFAULT_PRECISION",
    "DEFAULT_PRETRAINED",
    "DEFAULT_RUNTIME",
    "PRECISIONS",
    "RUNTIMES",
    "default_device",
    "load_model",
    "resolve_model_spec",
]
