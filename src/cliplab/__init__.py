"""cliplab: load any CLIP model, embed and cache features, classify, evaluate.

Names are imported on first use (PEP 562), so ``import cliplab`` and the command line start fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Backbone": "models", "load_model": "models",
    "FeatureCache": "features", "ImageFeatures": "features", "FewShotSplit": "features",
    "embed_images": "features", "embed_texts": "features", "class_weights": "features",
    "ZeroShotClassifier": "heads", "NearestClassMean": "heads", "create_head": "heads", "list_heads": "heads",
    "evaluate": "eval", "evaluate_zeroshot": "eval",
    "load_dataset": "data",
}
_SUBMODULES = {"datasets", "data", "models", "features", "heads", "eval", "errors"}

__all__ = ["__version__", *sorted(_LAZY), "datasets"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'cliplab' has no attribute {name!r}")
    globals()[name] = value
    return value
