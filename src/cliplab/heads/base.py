"""What every head shares: scikit-learn's classifier contract on CLIP features, with cliplab's errors.

A head is a scikit-learn classifier over L2-normalised image features. Subclasses implement ``fit``
(learning state ending in ``_``, ``classes_`` and ``n_features_in_``) and ``logits`` ((n, C), one column
per class, also for two classes: what OOD scores and ensembles use); this base gives
``decision_function`` (the logits; for two classes scikit-learn's 1-D margin), ``predict``,
``predict_proba`` (softmax of the logits), ``top_k`` and ``score``, and validates input with
scikit-learn's own checks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import CliplabError, DimensionMismatchError, FeatureError, LabelError


class ClipHead(ClassifierMixin, BaseEstimator):
    """Base class of cliplab's heads (not registered itself)."""

    def _validate(self, X, y="no_validation", reset: bool = False):
        """``validate_data`` raising cliplab errors (still ValueErrors, with scikit-learn's message) for the wrong
        width, NaN/inf, empty or not 2-D input. Pass ``y`` (even None) when fitting a head that needs labels."""
        try:
            return validate_data(self, X, y, reset=reset, dtype=np.float32)
        except (FeatureError, DimensionMismatchError):
            raise
        except ValueError as exc:
            message = " ".join(str(exc).split())
            if "features, but" in message:
                raise DimensionMismatchError(
                    f"{type(self).__name__}: {message} (features from another model?)") from exc
            raise FeatureError(f"{type(self).__name__}: {message}") from exc

    def _checked(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self._validate(X)

    def logits(self, X) -> np.ndarray:  # pragma: no cover - every head implements it
        """Logits (n, C) over ``classes_``."""
        raise NotImplementedError

    def decision_function(self, X) -> np.ndarray:
        """The logits; with two classes, scikit-learn's margin ``logit_1 - logit_0`` (n,)."""
        scores = self.logits(X)
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def predict_proba(self, X) -> np.ndarray:
        """Softmax of the logits over ``classes_``."""
        return softmax(self.logits(X), axis=1)

    def predict(self, X) -> np.ndarray:
        """The highest-scoring class of each row (ties: the lower class index)."""
        scores = self.logits(X)
        return self.classes_[np.argmax(scores, axis=1)]

    def top_k(self, X, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most probable classes per row, best first: (column indices (n, k), probabilities (n, k))."""
        probs = self.predict_proba(X)
        k = min(k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(probs, order, axis=1)

    def fit_summary(self) -> dict:
        """JSON-able facts about the fitted head for results files (e.g. number of prompts); none by default."""
        return {}


class TextWeightsHead(ClipHead):
    """A training-free head whose logits are ``logit_scale_ * X @ weights_``, the (d, C) class weights ensembled
    from per-class prompt embeddings (zero-shot templates, CuPL sentences, DCLIP descriptors). Subclasses call
    ``_fit_weights`` from ``fit`` with the embedded prompts; ``y``, if given, must be class indices."""

    def _fit_weights(self, embedded: list[np.ndarray], renormalize: bool, X=None, y=None):
        from ..features.text import ensemble

        self.weights_ = ensemble(embedded, renormalize)
        self.classes_ = np.arange(len(embedded))
        self.prompts_per_class_ = [len(group) for group in embedded]
        self.logit_scale_ = float(self.logit_scale if self.logit_scale is not None else self.backbone.logit_scale)
        self.n_features_in_ = self.weights_.shape[0]
        if X is not None:
            self._validate(X)
        if y is not None and len(np.asarray(y)) and not np.isin(np.asarray(y), self.classes_).all():
            raise LabelError(f"labels must be class indices 0..{len(self.classes_) - 1} into class_names")
        return self

    def logits(self, X) -> np.ndarray:
        """Logits (n, C): ``logit_scale_ * X @ weights_``."""
        X = self._checked(X)
        return self.logit_scale_ * (X @ self.weights_)


class ZeroShotLogitsMixin:
    """For heads that add to CLIP's zero-shot logits: ``backbone``, ``class_names``, ``templates`` (or a class
    -> prompts mapping) and ``cache_dir`` parameters give ``_zeroshot_weights()`` (d, C), the same class
    weights as the zero-shot head (text API in ``features.text``; heads never import other heads)."""

    def _zeroshot_weights(self) -> np.ndarray:
        from ..features.text import class_weights

        return class_weights(self.backbone, self.class_names, self.templates, cache_dir=self.cache_dir)

    def _fit_logit_scale(self) -> float:
        """Fix ``logit_scale_``, the zero-shot term's scale: ``logit_scale`` if given, else the model's own
        (``Backbone.logit_scale``). Cache-model authors write CLIP's 100 as a constant; on a model trained to
        another scale that constant re-weighs the zero-shot term against the cache."""
        value = self.logit_scale
        if value is None:
            self.logit_scale_ = float(self.backbone.logit_scale)
            return self.logit_scale_
        try:
            scale = float(value)
        except (TypeError, ValueError):
            scale = math.nan
        if not math.isfinite(scale):
            raise CliplabError(f"{type(self).__name__}: logit_scale must be a finite number or None (the model's "
                               f"own), not {value!r}")
        self.logit_scale_ = scale
        return scale

    def _zero_shot_scale(self) -> float:
        """``logit_scale_`` (a head saved before it existed: ``logit_scale``, then CLIP's 100)."""
        scale = getattr(self, "logit_scale_", None)
        if scale is None:
            scale = self.logit_scale if self.logit_scale is not None else 100.0
        return float(scale)

    def _fitted_copy(self, class_names) -> ClipHead:
        """A clone for ``class_names`` carrying this head's fitted state (attributes ending in ``_``): where a
        prompt head's ``with_classes`` starts."""
        head = clone(self).set_params(class_names=list(class_names))
        for key, value in vars(self).items():
            if key.endswith("_") and not key.startswith("_"):
                setattr(head, key, value)
        return head

    def _training_rows(self, X, y, who: str, reset: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``X, y`` for a head that trains through its ``backbone``: validated, labels as class indices, and
        features of the backbone's width (else one line naming both widths)."""
        X, y = self._validate(X, y, reset=reset)
        check_classification_targets(y)
        y = self._check_labels(y)
        backbone = self.backbone
        if X.shape[1] != backbone.embed_dim:
            raise DimensionMismatchError(f"{who}: features have width {X.shape[1]} but {backbone.info.name}'s "
                                         f"embeddings are {backbone.embed_dim}-d (features from another model?)")
        return X, y

    def _check_labels(self, y) -> np.ndarray:
        """Labels as class indices 0..C-1 into ``class_names`` (what the cache values and text weights index)."""

        y = np.asarray(y)
        n_classes = len(self.class_names)
        if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= n_classes)):
            raise LabelError(f"{type(self).__name__}: labels must be class indices 0..{n_classes - 1} into "
                             "class_names")
        return y.astype(np.int64)

    def _validation_set(self, X_val, y_val) -> tuple[np.ndarray, np.ndarray]:
        """The validation features (checked like ``X``) and their labels (class indices), of equal length."""

        if y_val is None:
            raise LabelError(f"{type(self).__name__}: X_val needs y_val")
        X_val = self._validate(X_val)
        y_val = self._check_labels(y_val)
        if len(y_val) != len(X_val):
            raise LabelError(f"{type(self).__name__}: {len(X_val)} validation rows but {len(y_val)} labels")
        return X_val, y_val

    def _checked_views(self, views, X: np.ndarray) -> np.ndarray:
        """``views`` as a finite float32 array (V, n, d) of the same items and width as ``X``."""

        views = np.asarray(views)
        if views.ndim != 3 or views.shape[1:] != X.shape or views.shape[0] == 0:
            raise FeatureError(f"{type(self).__name__}: views must have shape (V, {X.shape[0]}, {X.shape[1]}) like "
                               f"X with V >= 1, got {views.shape}")
        return self._validate(views.reshape(-1, X.shape[1])).reshape(views.shape)  # row v*n + i: view v of item i

    def _view_mean_keys(self, X: np.ndarray, views) -> np.ndarray:
        """Tip-Adapter's cache keys: the L2-normalised mean of each item's views (``X`` itself without views)."""
        if views is None:
            return X

        mean = self._checked_views(views, X).astype(np.float64).mean(axis=0)
        norms = np.linalg.norm(mean, axis=1, keepdims=True)
        if (norms == 0).any():
            raise FeatureError(f"{type(self).__name__}: the views of item {int(np.argmin(norms))} average to zero")
        return (mean / norms).astype(np.float32)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``logits`` (n, C) against class indices ``y`` (ties: the lower class, as argmax)."""
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(y))) if len(y) else 0.0


def best_on_validation(candidates, score) -> tuple:
    """The first candidate with the highest ``score(candidate)`` (strictly better replaces; ties keep the
    earlier one, as the authors' search loops do), with its score."""
    best, best_score = None, -np.inf
    for candidate in candidates:
        value = score(candidate)
        if value > best_score:
            best, best_score = candidate, value
    return best, best_score


# CoOp's coarse sweep of the L2 strength C for linear probes (CoOp's lpclip/linear_probe.py).
COOP_SEARCH_LIST = (1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6)


#: n x d x classes from which ``logistic_fits(solver="auto")`` uses torch (100 classes x 16 shots x 512-d is 8e7).
TORCH_FROM = 10_000_000


def logistic_fits(X: np.ndarray, y: np.ndarray, max_iter: int, tol: float, solver: str = "sklearn"
                  ) -> Callable[[float], tuple[np.ndarray, np.ndarray, int]]:
    """``fit_at(C) -> (coef, intercept, n_iter)``: L2 logistic regression on ``X, y``, memoised per C.

    ``solver="sklearn"``: scikit-learn's ``LogisticRegression(solver="lbfgs")``, exactly. ``"torch"``: the same
    objective by L-BFGS in torch, warm-started from the nearest C fitted before (``heads/logistic.py``; the answer
    is within a tested tolerance of scikit-learn's, not equal to it). ``"auto"``: torch where one pass over the
    data is large (n x d x classes >= ``TORCH_FROM``, e.g. 1000 classes x 16 shots), else scikit-learn (small
    problems: its fits take fractions of a second). Two classes always use scikit-learn's (binary) model."""
    X64 = np.asarray(X, dtype=np.float64)
    fits: dict[float, tuple[np.ndarray, np.ndarray, int]] = {}
    classes = np.unique(y)
    torch_fitter = None
    if solver == "auto":
        solver = "torch" if X64.shape[0] * X64.shape[1] * len(classes) >= TORCH_FROM else "sklearn"
    if solver == "torch" and len(classes) > 2:
        from .logistic import TorchLogistic

        torch_fitter = TorchLogistic(X64, np.searchsorted(classes, y), max_iter, tol)
    elif solver not in ("sklearn", "torch"):
        raise ValueError(f"logistic fit: solver must be 'auto', 'sklearn' or 'torch', got {solver!r}")

    def fit_at(c: float) -> tuple[np.ndarray, np.ndarray, int]:
        key = float(c)
        if key not in fits:
            if torch_fitter is not None:
                fits[key] = torch_fitter.fit(key)
                return fits[key]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, C=key, tol=tol).fit(X64, y)
            # C order, as a saved head loads them: the same BLAS path before and after a save/load round trip
            fits[key] = (np.ascontiguousarray(clf.coef_, dtype=np.float64),
                         np.ascontiguousarray(clf.intercept_, dtype=np.float64), int(np.max(clf.n_iter_)))
        return fits[key]

    return fit_at


def coop_c_search(val_accuracy: Callable[[float], float], num_steps: int) -> tuple[float, list]:
    """CoOp's C search: the coarse sweep, then ``num_steps`` halvings of the log-interval around the best
    (ties go left, as theirs); returns (C, [[C, val accuracy], ...])."""
    path = [[float(c), float(val_accuracy(c))] for c in COOP_SEARCH_LIST]
    c_final = COOP_SEARCH_LIST[int(np.argmax([acc for _, acc in path]))]
    c_left, c_right = 1e-1 * c_final, 1e1 * c_final
    for _ in range(num_steps):
        acc_left, acc_right = float(val_accuracy(c_left)), float(val_accuracy(c_right))
        path += [[float(c_left), acc_left], [float(c_right), acc_right]]
        middle = 0.5 * (np.log10(c_left) + np.log10(c_right))
        if acc_left < acc_right:
            c_final, c_left, c_right = c_right, middle, np.log10(c_right)
        else:
            c_final, c_left, c_right = c_left, np.log10(c_left), middle
        c_left, c_right = np.power(10, c_left), np.power(10, c_right)
    return float(c_final), path



# Contract skips. A head declares the scikit-learn estimator checks it cannot pass, by name with the reason, in its
# own class body: ``_contract_skips = {"check_name": "reason", ...}`` (as scikit-learn's estimator tags declare
# what an estimator supports). tests/unit/test_head_contract.py skips exactly those, and
# tests/unit/test_cliplab_contract.py runs what they would have covered at the model's real width; a key
# ``cliplab_<property>`` there waives one of its properties (e.g. ``cliplab_subset_invariance``).
FIXED_WIDTH = "feature width is fixed by the model's text embeddings; the check feeds 1-10 random features"
LABELS_ARE_INDICES = "labels are integer class indices into class_names; the check fits on float or string labels"
_FIT_PREDICT_CHECKS = (
    "check_fit_score_takes_y", "check_estimators_overwrite_params", "check_dont_overwrite_parameters",
    "check_estimators_fit_returns_self", "check_readonly_memmap_input", "check_n_features_in_after_fitting",
    "check_positive_only_tag_during_fit", "check_estimators_dtypes", "check_dtype_object", "check_pipeline_consistency",
    "check_estimators_nan_inf", "check_estimators_pickle", "check_f_contiguous_array_estimator",
    "check_classifier_data_not_an_array", "check_classifiers_classes", "check_classifiers_train",
    "check_supervised_y_2d", "check_decision_proba_consistency", "check_methods_sample_order_invariance",
    "check_methods_subset_invariance", "check_fit2d_1sample", "check_fit2d_1feature", "check_dict_unchanged",
    "check_fit_idempotent", "check_fit_check_is_fitted", "check_n_features_in", "check_fit2d_predict1d",
)
# Heads whose class weights come from the text tower (zero-shot, descriptions, LLM prompts): every check that fits or
# predicts feeds the wrong width, and y is not what defines the classes.
ZEROSHOT_SKIPS: dict[str, str] = {name: FIXED_WIDTH for name in _FIT_PREDICT_CHECKS} | {
    "check_requires_y_none": FIXED_WIDTH,
    "check_classifiers_one_label": "the classes come from class_names, not from y",
    "check_classifiers_regression_target": "y is not needed (no training labels)",
}
# Heads that add to CLIP's zero-shot logits and learn from labels given as class indices into class_names.
FEWSHOT_SKIPS: dict[str, str] = {name: FIXED_WIDTH for name in _FIT_PREDICT_CHECKS} | {
    name: LABELS_ARE_INDICES for name in (
        "check_classifiers_one_label", "check_dtype_object", "check_classifiers_classes", "check_estimators_nan_inf")}
