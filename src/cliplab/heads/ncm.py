"""Nearest class mean on CLIP features: the simplest few-shot head, and the worked example of adding one."""

from __future__ import annotations

import numpy as np
from sklearn.utils.multiclass import check_classification_targets

from ..errors import LabelError
from .base import ClipHead
from .registry import register


@register("ncm", family="fewshot", needs_train=True, gives=("class_weights",))
class NearestClassMean(ClipHead):
    """Nearest class mean: logits = logit_scale * x . m_c / |m_c|, m_c the mean feature of class c.

    The class means of the (few-shot) training features take the place of zero-shot's text
    embeddings; with L2-normalised features this is a cosine nearest-centroid classifier (the
    "prototype" baseline of few-shot CLIP papers). No paper of its own; no hyperparameters to tune.
    """

    def __init__(self, logit_scale: float = 100.0):
        self.logit_scale = logit_scale

    def fit(self, X, y):
        """Class means of ``X`` grouped by ``y``, normalised to unit length, as ``weights_`` (d, C)."""
        X, y = self._validate(X, y, reset=True)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        sums = np.zeros((len(self.classes_), X.shape[1]), np.float64)
        np.add.at(sums, codes, X)
        means = sums / np.bincount(codes)[:, None]
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        if (norms == 0).any():
            raise LabelError(f"class {self.classes_[int(np.argmin(norms))]!r} has a zero mean feature")
        self.weights_ = np.ascontiguousarray((means / norms).T, dtype=np.float32)
        return self

    def logits(self, X) -> np.ndarray:
        """Logits (n, C) over ``classes_``."""
        X = self._checked(X)
        return self.logit_scale * (X @ self.weights_)
