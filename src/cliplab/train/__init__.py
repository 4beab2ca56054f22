"""Pretraining CLIP models: ``pretrain(PretrainConfig(...), output_dir)`` and named recipes."""

from .config import BUILTIN_CONFIGS, PretrainConfig, PretrainOptionError, resolve_model_config
from .loop import PretrainResult, pretrain

__all__ = ["BUILTIN_CONFIGS", "PretrainConfig", "PretrainOptionError", "PretrainResult", "pretrain",
           "resolve_model_config"]
