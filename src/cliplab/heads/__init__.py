"""Classifier heads on cached features (scikit-learn estimators), registered by name.

Every module in this package is a head: the registry imports them all (``load_all``) the first time a head
is looked up, listed or built, so a head registers itself by being a file here. The head classes and
``ClipHead`` are imported on first use (PEP 562), so ``cliplab.heads`` and the registry load without
scikit-learn or torch; ``describe_heads`` lists the package's heads without importing them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .registry import (
    HeadEntry,
    HeadSummary,
    create_head,
    describe_heads,
    get_head,
    head_entry,
    list_heads,
    load_all,
    register,
)

_LAZY = {"ClipHead": "base", "NearestClassMean": "ncm", "ZeroShotClassifier": "zeroshot"}

__all__ = [
    "ClipHead", "HeadEntry", "HeadSummary", "NearestClassMean", "ZeroShotClassifier", "create_head",
    "describe_heads", "get_head", "head_entry", "list_heads", "load_all", "register",
]

if TYPE_CHECKING:
    from .base import ClipHead
    from .ncm import NearestClassMean
    from .zeroshot import ZeroShotClassifier


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
