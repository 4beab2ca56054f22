"""Classifier heads on cached features (scikit-learn estimators), registered by name."""

from .registry import HeadEntry, get_head, list_heads, register
from .zeroshot import ZeroShotClassifier, class_weights

__all__ = ["HeadEntry", "ZeroShotClassifier", "class_weights", "get_head", "list_heads", "register"]
