"""Classifier heads on cached features (scikit-learn estimators), registered by name.

Every module in this package is imported here, so a head registers itself by being a file in it.
"""

from .base import ClipHead
from .registry import HeadEntry, create_head, get_head, head_entry, list_heads, load_all, register

load_all()

from .ncm import NearestClassMean  # noqa: E402
from .zeroshot import ZeroShotClassifier  # noqa: E402

__all__ = [
    "ClipHead", "HeadEntry", "NearestClassMean", "ZeroShotClassifier", "create_head", "get_head", "head_entry",
    "list_heads", "load_all", "register",
]
