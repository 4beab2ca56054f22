"""Gaussian discriminant analysis added to CLIP's zero-shot logits (GDA, Wang et al., ICLR 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.utils.multiclass import check_classification_targets

from ..errors import DimensionMismatchError
from ..models.backbone import Backbone
from .base import FEWSHOT_SKIPS, ClipHead, ZeroShotLogitsMixin, accuracy, best_on_validation
from .registry import register

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
_CHUNK = 16384  # rows per float64 chunk when accumulating class sums and the scatter matrix


@register("gda", family="fewshot", paper=3, needs_train=True, needs=("val", "views"), default_templates="dataset")
class GaussianDiscriminant(ZeroShotLogitsMixin, ClipHead):
    """GDA: zero-shot logits plus alpha times a shared-covariance Gaussian (LDA) classifier of the few shots.

    Paper 3 in ../shared/papers.md ("A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation",
    Wang et al., ICLR 2024), following the authors' code (github.com/mrflogs/ICLR24 @ 560fe21,
    ``main_few_shots.py``, ``run``).

    Samples: with ``views`` (V, n, d) every view of every training item is a sample of its own (n·V vectors,
    labels tiled; the code's ``augment_epoch`` passes over the augmented loader; ``X`` itself is then not a sample,
    as the code embeds only augmented images), else the rows of ``X``.
    With N samples x_i of labels y_i, C classes (those of ``class_names`` with samples) and width d:

    - class means   mu_k = mean of the samples of class k (not re-normalised);
    - centred       z_i = x_i - mu_{y_i};  Sigma = cov(z) (unbiased: divides by N - 1, re-centres as torch.cov);
    - precision     P = d · pinv((N - 1)·Sigma + tr(Sigma)·I_d)   (the code's "KS estimator");
    - uniform prior, Bayes' rule:  W = mu P (C, d),  b_k = log(1/C) - ½ mu_kᵀ P mu_k;
    - logits        logit_scale · x·T + alpha · (x·Wᵀ + b),  T the (d, C) zero-shot text weights;
      ``gaussian_logits(X)`` gives the Gaussian part x·Wᵀ + b alone. (P scales as d/N, so the Gaussian term
      shrinks as samples, e.g. views, are added; alpha makes up for it.)

    ``alpha`` is chosen on the validation features over ``alphas`` (the code's list 1e-4 ... 100): the first
    candidate with strictly higher validation accuracy than any before replaces the current one, starting from
    accuracy 0, so if no candidate classifies any validation row correctly the fallback stays (the code starts
    from ``best_alpha = 0.1``; here the fallback is the ``alpha`` hyperparameter, default 0.1, the same value).
    Without validation features ``alpha`` is used as given (default 0.1, the code's starting value).

    Departures from the authors' code, and why:

    - Computed in float64 NumPy (``np.linalg.pinv``, symmetric route, torch's default cutoff) instead of float32
      torch on the GPU: same formula, less round-off; the learned ``weights_``/``bias_`` are stored as float32
      like the text weights, and ``logits`` multiplies once by logit_scale·T + alpha·Wᵀ (float32 rounding only).
    - On ImageNet the code takes the test set as validation set, so alpha is chosen on test; here alpha is only
      ever chosen on ``X_val``/``y_val`` (test features never reach ``fit``).
    - ``classes_`` are the classes of ``class_names`` that have training samples (all of them in the few-shot
      protocol, where this is the code's C = len(class_names)); a class without samples gets no column (the
      evaluation scores it -inf) and C in the prior counts the fitted classes. The code would produce NaN
      means, hence NaN logits for every class.
    - With a single training sample the unbiased covariance is 0/0; here it is taken as 0 (the limit: the one
      centred sample is zero), giving P = 0, i.e. plain zero-shot logits up to a constant.
    """

    # The scikit-learn estimator checks this head cannot pass, with the reason (heads/base.py, end).
    _contract_skips = FEWSHOT_SKIPS

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        templates: str | Sequence[str] | Mapping[str, Sequence[str]] = "generic",
        cache_dir: str | Path | None = None,
        alpha: float = 0.1,
        alphas: Sequence[float] = ALPHAS,
        logit_scale: float = 100.0,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.templates = templates
        self.cache_dir = cache_dir
        self.alpha = alpha
        self.alphas = alphas
        self.logit_scale = logit_scale

    # ------------------------------------------------------------------ fitting

    def fit(self, X, y, X_val=None, y_val=None, views=None):
        """Estimate the Gaussian classifier from the training samples (``views`` if given, else ``X``) and pick
        ``alpha`` on (``X_val``, ``y_val``) when given."""
        X, y = self._validate(X, y, reset=True)
        check_classification_targets(y)
        y = self._check_labels(y)
        d = X.shape[1]
        text = np.asarray(self._zeroshot_weights(), dtype=np.float32)
        if text.shape[0] != d:
            raise DimensionMismatchError(f"{type(self).__name__}: features have width {d} but the text weights are "
                                         f"{text.shape[0]}-d (features from another model?)")
        # The classes are those with training samples: all of class_names in the few-shot protocol.
        self.classes_, codes = np.unique(y, return_inverse=True)
        samples, labels = self._samples(X, codes, views)
        weights, bias = self._gaussian(samples, labels, len(self.classes_))
        self.text_weights_ = np.ascontiguousarray(text[:, self.classes_])
        self.weights_ = weights.astype(np.float32)
        self.bias_ = bias.astype(np.float32)
        self.n_samples_ = int(len(labels))
        self.alpha_, self.searched_ = float(self.alpha), False
        if X_val is not None:
            X_val, y_val = self._validation_set(X_val, y_val)
            self.alpha_ = self._search_alpha(X_val, y_val)
            self.searched_ = True
        return self

    def _samples(self, X, y, views):
        """The estimation samples: every view of every item (labels tiled), or ``X`` without views."""
        if views is None:
            return X, y
        views = self._checked_views(views, X)
        return views.reshape(-1, X.shape[1]), np.tile(y, views.shape[0])  # row v*n + i = view v of item i

    def _gaussian(self, samples: np.ndarray, labels: np.ndarray, n_classes: int):
        """W (C, d) and b (C,) of the shared-covariance Gaussian classifier with the KS precision (float64)."""
        n, d = samples.shape
        counts = np.bincount(labels, minlength=n_classes)
        sums = np.zeros((n_classes, d))
        for start in range(0, n, _CHUNK):
            np.add.at(sums, labels[start:start + _CHUNK], samples[start:start + _CHUNK].astype(np.float64))
        mus = sums / counts[:, None]
        # torch.cov(center.T): re-centre by the mean of the centred samples (zero up to round-off), divide by n - 1.
        scatter, total = np.zeros((d, d)), np.zeros(d)
        for start in range(0, n, _CHUNK):
            center = samples[start:start + _CHUNK].astype(np.float64) - mus[labels[start:start + _CHUNK]]
            scatter += center.T @ center
            total += center.sum(axis=0)
        scatter -= np.outer(total, total) / n
        cov = scatter / (n - 1) if n > 1 else np.zeros((d, d))
        # torch.linalg.pinv's default cutoff (max(d, d)·eps relative); the matrix is symmetric, so the
        # eigendecomposition route gives the same pseudo-inverse as the SVD, in about half the time
        precision = d * np.linalg.pinv((n - 1) * cov + np.trace(cov) * np.eye(d), rcond=d * np.finfo(np.float64).eps,
                                       hermitian=True)
        weights = mus @ precision
        bias = np.log(1.0 / n_classes) - 0.5 * np.einsum("cd,cd->c", weights, mus)
        return weights, bias

    def _search_alpha(self, X_val: np.ndarray, y_val: np.ndarray) -> float:
        """The authors' grid search: strictly better validation accuracy replaces, starting from accuracy 0."""
        zeroshot = self.logit_scale * (X_val @ self.text_weights_)
        gaussian = X_val @ self.weights_.T + self.bias_
        # column of each validation label; a class without training samples has no column and is never right
        column = np.searchsorted(self.classes_, y_val).clip(0, len(self.classes_) - 1)
        column = np.where(self.classes_[column] == y_val, column, -1)
        best, best_acc = best_on_validation(
            [float(a) for a in self.alphas], lambda a: accuracy(zeroshot + a * gaussian, column))
        return best if best is not None and best_acc > 0 else float(self.alpha)

    # ------------------------------------------------------------------ prediction

    def gaussian_logits(self, X) -> np.ndarray:
        """The Gaussian (LDA) part alone: ``X @ weights_.T + bias_`` (n, C)."""
        X = self._checked(X)
        return X @ self.weights_.T + self.bias_

    def logits(self, X) -> np.ndarray:
        """``logit_scale · X @ text_weights_ + alpha_ · (X @ weights_.T + bias_)`` (n, C)."""
        X = self._checked(X)
        combined = self.logit_scale * self.text_weights_ + self.alpha_ * self.weights_.T  # one (d, C) product
        return X @ combined.astype(np.float32) + np.float32(self.alpha_) * self.bias_

    def fit_summary(self) -> dict:
        return {"alpha": self.alpha_, "searched": self.searched_}
