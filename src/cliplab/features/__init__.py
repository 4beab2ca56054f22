"""Embedding and caching: ``embed_images``, ``ImageFeatures``, the text side, ``FeatureCache``.

Names are imported on first use (PEP 562): ``cliplab.features.cache`` (what ``cliplab cache`` reads) and
``cliplab.features.values`` load without torch; ``embed`` and ``text`` bring in the models layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "FeatureCache": "cache", "cache_root": "cache", "default_cache_root": "cache",
    "embed_images": "embed", "image_cache": "embed", "model_record": "embed",
    "class_weights": "text", "embed_prompts": "text", "embed_texts": "text", "ensemble": "text", "text_cache": "text",
    "FewShotSplit": "values", "ImageFeatures": "values", "load_split": "values",
}

__all__ = [
    "FeatureCache", "FewShotSplit", "ImageFeatures", "cache_root", "class_weights", "default_cache_root",
    "embed_images", "embed_prompts", "embed_texts", "ensemble", "image_cache", "load_split", "model_record",
    "text_cache",
]

if TYPE_CHECKING:
    from .cache import FeatureCache, cache_root, default_cache_root
    from .embed import embed_images, image_cache, model_record
    from .text import class_weights, embed_prompts, embed_texts, ensemble, text_cache
    from .values import FewShotSplit, ImageFeatures, load_split


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
