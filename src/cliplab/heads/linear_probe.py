"""Linear probe: L2-regularised multinomial logistic regression on CLIP image features (CoOp's lpclip protocol)."""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d

from ..errors import FeatureError, LabelError
from . import base
from .base import COOP_SEARCH_LIST, ClipHead, coop_c_search, logistic_fits
from .registry import register

#: scikit-learn's default ``tol``, which CoOp used; see ``LinearProbe.tol``.
SKLEARN_TOL = 1e-4
#: CoOp's coarse sweep of C (lpclip/linear_probe.py), in its loop order: the first best wins (``np.argmax``).
SEARCH_LIST = COOP_SEARCH_LIST


@register("linear-probe", family="fewshot", paper=None, needs_train=True, needs=("val",))
class LinearProbe(ClipHead):
    """Linear probe: logistic regression on the image features, logits = x W^T + b, C searched on validation.

    The CLIP paper's linear-probe baseline (Radford et al. 2021, App. A.3; not in ../shared/papers.md, hence
    ``paper=None``) as the few-shot papers run it: the protocol is CoOp's ``lpclip/linear_probe.py`` (paper 50,
    "Learning to Prompt for Vision-Language Models", @ff61507).

    Model: scikit-learn ``LogisticRegression(solver="lbfgs", max_iter=1000, C=C, tol=tol_)`` with an L2 penalty and an
    unpenalised intercept, i.e. W, b minimise ``0.5 * |W|_F^2 + C * sum_i -log softmax(x_i W^T + b)[y_i]``
    (multinomial; for two classes scikit-learn's binary model ``0.5 |w|^2 + C sum_i log(1 + exp(-s_i (x_i.w + b)))``).
    ``coef_`` (K, d) and ``intercept_`` (K,) are scikit-learn's arrays (K = 1 for two classes), and
    ``logits(X) = X @ coef_.T + intercept_``; for two classes, with z that one column, the logits are
    ``[-z/2, z/2]``, so that ``softmax`` is scikit-learn's ``predict_proba`` ``[1 - sigmoid(z), sigmoid(z)]``
    and ``decision_function`` is its margin z.

    Choosing C (CoOp's search, on ``X_val, y_val`` only, val accuracy = fraction of ``predict`` correct):
    1. coarse sweep over C in [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]; c_peak = the first best (``np.argmax``);
    2. ``c_left, c_right = 0.1 * c_peak, 10 * c_peak``; then ``num_steps`` (8) times: fit at both ends and
       score them; if acc_left < acc_right: C = c_right and the next range is [10^m, c_right], else (ties go
       left) C = c_left and the next range is [c_left, 10^m], with m = (log10 c_left + log10 c_right) / 2 (the
       ends pass through ``10 ** log10(.)`` exactly as in CoOp's code);
    3. the final C is the last step's winner, and the head is that step's fit, on the training features only
       (CoOp's ``clf_final``; validation items are never fitted on).
    Without validation data (or with ``search=False``) the head is one fit at the ``C`` hyperparameter.

    Hyperparameters: ``C`` (0.316, used without validation data: the value of the linear-probe example in the
    CLIP authors' README, github.com/openai/CLIP; small C shrinks the probe towards a class-centroid classifier,
    the safe side with few shots), ``num_steps`` (8, CoOp's ``--num_step``), ``search`` (True: search C when
    validation data is given), ``max_iter`` (1000, CoOp's), ``tol`` (None: 1e-4 / n_train, see below; a number
    is passed to scikit-learn as is), ``solver`` ("auto": "torch" when n x d x classes >= 1e7, e.g. 100 classes
    x 16 shots x 512-d, else "sklearn"; see below). L-BFGS is deterministic: no seed.

    Solver. ``solver="torch"`` minimises the same objective by L-BFGS in torch (``heads/logistic.py``:
    centred features, float32 for C >= 1, each fit on torch's threads or on one thread, whichever passes over the
    data faster on the machine as loaded at the time). The search fits the coarse list from small to large C
    first (each fit warm-started from the fits around it, interpolated in log C with their L-BFGS curvature
    pairs carried over, or extrapolated from the two largest), then CoOp's loop runs over those fits; search fits
    stop on a looser test (H decreasing by less than 1e-5 relative per iteration), and the fit at the chosen C,
    the head's, continues to float32's resolution of H.
    Its answers are not scikit-learn's to the last digit: the objective is within a small tolerance of
    scikit-learn's solution and the accuracy within 0.1 point (tests/unit/test_logistic.py), so a near-tie on
    validation may pick a neighbouring C; at C = 1e6, where the training set is nearly separable and both solvers
    stop far from the optimum, the validation accuracies of the two differ more. ``solver="sklearn"`` gives
    scikit-learn's coefficients exactly (and CoOp's search decisions). Two classes always use scikit-learn's
    binary model. Timings: benchmarks/results/fewshot_fit_speed.

    Departures from CoOp's code, and why:
    - The features are cliplab's L2-normalised CLIP features, used as given; CoOp fits on raw
      ``clip_model.visual`` outputs. Scaling the features by s is the same as scaling C by s^2, so a searched
      C differs by that factor but the search range (12 decades) covers it; the fixed default does not adapt.
    - The features are fitted in float64 (CoOp's ``.npz`` features are float64 too; cliplab's cache is float32).
    - The L-BFGS stopping tolerance is 1e-4 / n_train instead of scikit-learn's 1e-4. scikit-learn >= 1.4 (PR
      #26721) minimises the objective above divided by C * n_train, so its ``tol`` (a bound on the largest
      gradient entry) became n_train times looser than in the versions CoOp ran (2021: gradient of the summed
      loss). With many classes the averaged gradient at the zero start is below 1e-4: on 1000 classes x 16 shots
      of 512-d unit features scikit-learn 1.9 stops after 0 iterations at every C (chance accuracy). 1e-4 / n
      restores CoOp's gradient criterion (scipy's relative ``ftol`` is not reachable through scikit-learn:
      modern scikit-learn's is tighter, so fits may iterate longer than CoOp's, up to ``max_iter``).
    - ``penalty="l2"`` is written as scikit-learn >= 1.8's default ``l1_ratio=0`` (``penalty`` is deprecated);
      the model is the same.
    - Fits at a C already fitted during the search are reused instead of refitted (same data, same C,
      deterministic solver: the same result).
    - ``num_steps=0`` gives C = c_peak (CoOp's loop would have no final classifier).
    - Convergence warnings of the search fits are silenced; one is raised if the final fit did not converge.
    - Labels may be any class labels (``classes_ = np.unique(y)``), as in scikit-learn.
    """

    def __init__(self, C: float = 0.316, num_steps: int = 8, search: bool = True, max_iter: int = 1000,
                 tol: float | None = None, solver: str = "auto"):
        self.C = C
        self.num_steps = num_steps
        self.search = search
        self.max_iter = max_iter
        self.tol = tol
        self.solver = solver

    def _check_params(self) -> None:
        if not isinstance(self.C, Real) or isinstance(self.C, bool) or not np.isfinite(self.C) or self.C <= 0:
            raise ValueError(f"LinearProbe: C must be a positive finite number, got {self.C!r}")
        if not isinstance(self.num_steps, Integral) or isinstance(self.num_steps, bool) or self.num_steps < 0:
            raise ValueError(f"LinearProbe: num_steps must be an integer >= 0, got {self.num_steps!r}")
        if not isinstance(self.max_iter, Integral) or isinstance(self.max_iter, bool) or self.max_iter < 1:
            raise ValueError(f"LinearProbe: max_iter must be an integer >= 1, got {self.max_iter!r}")
        if self.tol is not None and (not isinstance(self.tol, Real) or isinstance(self.tol, bool) or
                                     not np.isfinite(self.tol) or self.tol <= 0):
            raise ValueError(f"LinearProbe: tol must be a positive number or None, got {self.tol!r}")
        if self.solver not in ("auto", "torch", "sklearn"):
            raise ValueError(f"LinearProbe: solver must be 'auto', 'torch' or 'sklearn', got {self.solver!r}")

    def fit(self, X, y, X_val=None, y_val=None):
        """Fit on ``X, y``; with ``X_val, y_val`` choose C by CoOp's search on them first."""
        self._check_params()
        X, y = self._validate(X, y, reset=True)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        self.tol_ = float(SKLEARN_TOL / len(X) if self.tol is None else self.tol)
        fit_at, final_fit = self._fitters(X, y)

        if (X_val is None) != (y_val is None):
            raise FeatureError("LinearProbe: pass both X_val and y_val, or neither")
        searched = bool(self.search) and X_val is not None
        if searched:
            X_val = self._validate(X_val).astype(np.float64)
            y_val = column_or_1d(np.asarray(y_val), warn=True)
            if len(y_val) != len(X_val):
                raise FeatureError(f"LinearProbe: X_val has {len(X_val)} rows but y_val has {len(y_val)} labels")
            if not np.isin(y_val, self.classes_).any():
                raise LabelError("LinearProbe: no validation label is a training class; C cannot be chosen")

            def val_accuracy(c: float) -> float:
                coef, intercept, _ = fit_at(c)
                pred = self.classes_[self._argmax(X_val @ coef.T + intercept)]
                return np.count_nonzero(pred == y_val) / len(y_val)

            if final_fit is not fit_at:  # torch: the coarse list from small to large C, each fit warm-starting the next
                for c in sorted(SEARCH_LIST):
                    fit_at(c)
            chosen, self.search_path_ = coop_c_search(val_accuracy, self.num_steps)
        else:
            chosen, self.search_path_ = float(self.C), []

        self.C_ = float(chosen)
        coef, intercept, n_iter = final_fit(chosen)
        self.coef_, self.intercept_, self.n_iter_ = coef, intercept, n_iter
        self.searched_ = searched
        if n_iter >= self.max_iter:
            warnings.warn(f"LinearProbe: L-BFGS did not converge in max_iter={self.max_iter} iterations at "
                          f"C={self.C_:g}", ConvergenceWarning, stacklevel=2)
        return self

    def _fitters(self, X: np.ndarray, y: np.ndarray):
        """(search fit, final fit), each ``C -> (coef, intercept, n_iter)``: the same function for scikit-learn's
        exact fits; for torch, search fits in float32 where C >= 1 and the final one polished in float64."""
        solver = self.solver
        if solver == "auto":
            solver = "torch" if X.shape[0] * X.shape[1] * len(self.classes_) >= base.TORCH_FROM else "sklearn"
        if solver != "torch" or len(self.classes_) <= 2:  # two classes: scikit-learn's binary model
            fit_at = logistic_fits(X, y, self.max_iter, self.tol_, solver="sklearn")
            return fit_at, fit_at
        from .logistic import TorchLogistic

        fitter = TorchLogistic(X, np.searchsorted(self.classes_, y), self.max_iter, self.tol_)
        return fitter.fit, lambda c: fitter.fit(c, final=True)

    @staticmethod
    def _argmax(z: np.ndarray) -> np.ndarray:
        """scikit-learn's ``predict`` on decision values: binary (n, 1) -> z > 0, else the first max."""
        return (z[:, 0] > 0).astype(int) if z.shape[1] == 1 else np.argmax(z, axis=1)

    def logits(self, X) -> np.ndarray:
        """Logits (n, K) over ``classes_``: ``X @ coef_.T + intercept_`` (two classes: ``[-z/2, z/2]``)."""
        X = self._checked(X)
        z = X.astype(np.float64) @ self.coef_.T + self.intercept_
        return np.hstack([-z / 2, z / 2]) if len(self.classes_) == 2 else z

    def fit_summary(self) -> dict:
        return {"C": self.C_, "searched": self.searched_, "n_iter": self.n_iter_, "tol": self.tol_}
