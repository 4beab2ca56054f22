"""cliplab: load any CLIP model, embed and cache features, classify, evaluate.

Names are imported on first use (PEP 562), so ``import cliplab`` and the command line start fast.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "Backbone": "models", "load_model": "models",
    "FeatureCache": "features", "ImageFeatures": "features", "FewShotSplit": "features",
    "embed_images": "features", "embed_texts": "features", "class_weights": "features",
    "ZeroShotClassifier": "heads", "NearestClassMean": "heads", "create_head": "heads", "list_heads": "heads",
    "evaluate": "eval", "evaluate_zeroshot": "eval",
    "load_dataset": "data",
}
__all__ = ["__version__", *sorted(_LAZY), "datasets"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
