"""Embedding and caching: ``embed_images``, ``embed_texts``, ``FeatureCache``."""

from .cache import FeatureCache, default_cache_root
from .embed import ImageFeatures, embed_images, embed_texts, image_cache

__all__ = ["FeatureCache", "ImageFeatures", "default_cache_root", "embed_images", "embed_texts", "image_cache"]
