"""Embedding and caching: ``embed_images``, ``ImageFeatures``, the text side, ``FeatureCache``."""

from .cache import FeatureCache, cache_root, default_cache_root
from .embed import embed_images, image_cache, model_record
from .text import class_weights, embed_prompts, embed_texts, ensemble, text_cache
from .values import FewShotSplit, ImageFeatures, load_split

__all__ = [
    "FeatureCache", "FewShotSplit", "ImageFeatures", "cache_root", "class_weights", "default_cache_root",
    "embed_images", "embed_prompts", "embed_texts", "ensemble", "image_cache", "load_split", "model_record",
    "text_cache",
]
