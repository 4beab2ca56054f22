"""Zero-shot classification with prompt-template ensembling (CLIP, Radford et al. 2021, sec. 3.1.4)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin

from ..data.prompts import check_class_names, fill_template, load_templates
from ..errors import DimensionMismatchError
from ..features.embed import embed_texts
from ..models.backbone import Backbone
from .registry import register


def class_weights(backbone: Backbone, class_names: Sequence[str], templates: Sequence[str],
                  cache_dir: str | Path | None = None) -> np.ndarray:
    """Classifier matrix (d, C): per class, the mean of its L2-normalised template embeddings, renormalised.

    This is CLIP's prompt ensembling in embedding space (the 80-template ImageNet recipe).
    """
    prompts = [fill_template(t, name) for name in class_names for t in templates]
    embeddings = embed_texts(backbone, prompts, cache_dir).reshape(len(class_names), len(templates), -1)
    means = embeddings.mean(axis=1)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    return np.ascontiguousarray(means.T, dtype=np.float32)


@register("zeroshot", family="zeroshot")
class ZeroShotClassifier(ClassifierMixin, BaseEstimator):
    """Zero-shot CLIP: logits = logit_scale * x . w_c with w_c the template-ensembled class embedding.

    ``X`` holds L2-normalised image features (from ``embed_images``). Zero-shot needs no training
    data: ``fit(X=None)`` only builds the class weights, and predicting builds them on first use.
    ``temperature`` defaults to the model's ``logit_scale`` (100 for trained OpenAI/LAION models).
    """

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        templates: str | Sequence[str] = "generic",
        temperature: float | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.templates = templates
        self.temperature = temperature
        self.cache_dir = cache_dir

    def fit(self, X=None, y=None):
        """Embed the prompts and build ``weights_`` (d, C); ``X`` and ``y`` are ignored."""
        names = check_class_names(list(self.class_names), "class names")
        templates = load_templates(self.templates)
        self.weights_ = class_weights(self.backbone, names, templates, self.cache_dir)
        self.classes_ = np.arange(len(names))
        self.templates_ = templates
        self.logit_scale_ = float(self.temperature if self.temperature is not None else self.backbone.logit_scale)
        return self

    def _check_X(self, X) -> np.ndarray:
        if not hasattr(self, "weights_"):
            self.fit()
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.weights_.shape[0]:
            raise DimensionMismatchError(
                f"image features have shape {X.shape}; this classifier's text embeddings have dimension "
                f"{self.weights_.shape[0]} (features from another model?)"
            )
        return X

    def decision_function(self, X) -> np.ndarray:
        """Logits (n, C): ``logit_scale * X @ weights_``."""
        X = self._check_X(X)
        return self.logit_scale_ * (X @ self.weights_)

    def predict_proba(self, X) -> np.ndarray:
        """Softmax of the logits over classes."""
        return softmax(self.decision_function(X), axis=1)

    def predict(self, X) -> np.ndarray:
        """Index of the highest-scoring class."""
        scores = self.decision_function(X)
        return self.classes_[np.argmax(scores, axis=1)]

    def top_k(self, X, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most probable classes per row, best first: (indices (n, k), probabilities (n, k))."""
        probs = self.predict_proba(X)
        k = min(k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(probs, order, axis=1)
