"""Multinomial logistic regression by L-BFGS in torch: scikit-learn's objective, solved fast along a path of C.

The objective is scikit-learn's ``LogisticRegression(C=C)`` with the L-BFGS solver (multinomial, L2 on the
weights, intercept unpenalised), as scikit-learn >= 1.4 scales it:

    H(W, b) = mean_i -log softmax(x_i W^T + b)[y_i] + |W|_F^2 / (2 C n)

Same optimum, different path to it:

- The features are centred (the intercept absorbs the mean: ``x W^T + b = (x - mu) W^T + (b + mu W^T)``, an
  exact change of variables); CLIP features share a large mean direction that otherwise makes the problem
  ill-conditioned.
- A fit at C >= 1 starts from the solution at the nearest C >= 1 already fitted on the same data (in log C),
  else from zero (scikit-learn always starts from zero; CoOp's search fits C values close to each other). Fits
  at C < 1 start from zero, as scikit-learn's: there the logits are so small that where the optimiser stops
  within the gradient tolerance (e.g. a warm start's intercepts) would decide the predictions.
- torch's L-BFGS (history 10, strong-Wolfe line search) with scikit-learn's gradient test (largest gradient
  entry of H at most ``tol``, at most ``max_iter`` iterations); in float32 for C >= 1 (the fits that take
  many iterations), where it also stops when H changes by less than 1e-9 in an iteration (float32 resolution
  of H; scikit-learn's float64 stops at a relative change of 1.4e-14), and in float64 for C < 1, where the
  logits are small and float32 would blur their differences.
- The intercepts are centred (they sum to 0, as scikit-learn's multinomial intercepts do; a common shift does
  not change the model).

So the answer is not scikit-learn's to the last digit: the objective is within a small tolerance of
scikit-learn's (tests/unit/test_logistic.py bounds it and the accuracy against scikit-learn's solution).
"""

from __future__ import annotations

import math

import numpy as np

_F32_FROM_C = 1.0  # C at and above which the fit runs in float32
_F32_CHANGE = 1e-9  # float32 fits stop when H changes by less than this in one iteration


class TorchLogistic:
    """Fits of one training set at any C: ``fit(C) -> (coef (K, d), intercept (K,), n_iter)`` in float64,
    warm-started from the nearest C fitted before. ``y`` holds class indices 0..K-1 (K >= 2, all present)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, max_iter: int, tol: float):
        X = np.asarray(X, dtype=np.float64)
        self.n, self.d = X.shape
        self.y = np.asarray(y, dtype=np.int64)
        self.k = int(self.y.max()) + 1
        self.mu = X.mean(axis=0)
        self._centred = X - self.mu
        self._data: dict = {}  # dtype -> (X centred, y) tensors
        self.max_iter, self.tol = int(max_iter), float(tol)
        self.solutions: dict[float, tuple[np.ndarray, np.ndarray]] = {}  # C -> (V, c) in centred variables

    def _tensors(self, dtype):
        import torch

        if dtype not in self._data:
            self._data[dtype] = (torch.tensor(self._centred, dtype=dtype), torch.from_numpy(self.y.copy()))
        return self._data[dtype]

    def objective(self, C: float, coef: np.ndarray, intercept: np.ndarray) -> float:
        """H at (coef, intercept), in float64 NumPy (what the tests compare with scikit-learn's solution)."""
        return logistic_objective(self._centred + self.mu, self.y, C, coef, intercept)

    def fit(self, C: float) -> tuple[np.ndarray, np.ndarray, int]:
        import torch

        C = float(C)
        dtype = torch.float32 if C >= _F32_FROM_C else torch.float64
        X, y = self._tensors(dtype)
        n, rows = self.n, torch.arange(self.n)
        reg = 1.0 / (C * n)
        warm = [c for c in self.solutions if c >= _F32_FROM_C] if C >= _F32_FROM_C else []
        if warm:
            start = self.solutions[min(warm, key=lambda c: (abs(math.log(c / C)), c))]
            V = torch.tensor(start[0], dtype=dtype)
            c = torch.tensor(start[1], dtype=dtype)
        else:
            V, c = torch.zeros(self.k, self.d, dtype=dtype), torch.zeros(self.k, dtype=dtype)
        V.requires_grad_(True)
        c.requires_grad_(True)
        change = _F32_CHANGE if dtype == torch.float32 else 0.0
        optimizer = torch.optim.LBFGS([V, c], lr=1, max_iter=self.max_iter, max_eval=self.max_iter * 5 // 4 + 20,
                                      tolerance_grad=self.tol, tolerance_change=change, history_size=10,
                                      line_search_fn="strong_wolfe")

        def closure() -> float:
            with torch.no_grad():
                z = torch.addmm(c, X, V.T)  # (n, K) logits in centred variables
                z_y = z[rows, y].clone()
                top = z.max(dim=1).values
                z.sub_(top[:, None]).exp_()
                total = z.sum(dim=1)
                loss = (top + total.log() - z_y).sum(dtype=torch.float64) / n
                loss = loss + 0.5 * reg * V.double().square().sum()
                z.div_(total[:, None])  # softmax
                z[rows, y] -= 1.0
                V.grad = (z.T @ X).div_(n).add_(V, alpha=reg)
                c.grad = z.sum(dim=0).div_(n)
            return float(loss)

        optimizer.step(closure)
        n_iter = int(optimizer.state[optimizer._params[0]].get("n_iter", 0))
        V_np, c_np = V.detach().double().numpy(), c.detach().double().numpy()
        self.solutions[C] = (V_np, c_np)
        intercept = c_np - V_np @ self.mu
        return V_np.copy(), intercept - intercept.mean(), n_iter


def logistic_objective(X: np.ndarray, y: np.ndarray, C: float, coef: np.ndarray, intercept: np.ndarray) -> float:
    """scikit-learn's multinomial L-BFGS objective: mean cross-entropy + |coef|^2 / (2 C n), float64."""
    X = np.asarray(X, dtype=np.float64)
    z = X @ np.asarray(coef, np.float64).T + np.asarray(intercept, np.float64)
    top = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    n = len(X)
    return float((lse - z[np.arange(n), y]).sum() / n + 0.5 * np.square(coef).sum() / (C * n))
