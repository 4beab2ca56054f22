"""Multinomial logistic regression by L-BFGS in torch: scikit-learn's objective, solved fast along a path of C.

The objective is scikit-learn's ``LogisticRegression(C=C)`` with the L-BFGS solver (multinomial, L2 on the
weights, intercept unpenalised), as scikit-learn >= 1.4 scales it:

    H(W, b) = mean_i -log softmax(x_i W^T + b)[y_i] + |W|_F^2 / (2 C n)

Same optimum, different path to it:

- The features are centred (the intercept absorbs the mean: ``x W^T + b = (x - mu) W^T + (b + mu W^T)``, an
  exact change of variables); CLIP features share a large mean direction that otherwise makes the problem
  ill-conditioned. The intercept is a last feature column of ones, so a pass over the data is two matrix
  products.
- Warm starts along C (fits at C >= 1): a fit starts from the solutions already found on the same data, linearly
  interpolated in log C between the nearest fitted C on either side; above all fitted C, linearly extrapolated in
  log C from the two largest (at most one of their intervals beyond the largest: 10^4 from 10^2 and 1, 10^6 from
  10^4 and 10^2 in CoOp's coarse list; on 200-class benchmark data this start cut those fits' passes 2-3x); else
  from the nearest one, else from zero (scikit-learn always starts from zero). An interpolated start also takes
  the nearest fit's curvature: the L-BFGS pairs (s, y) of the cross-entropy part are kept, and ``y + s / (C n)``
  (intercept entries without the penalty) is an exact pair of the objective at the new C, so the first steps are
  already quasi-Newton (an extrapolated start takes none: the pairs were measured where the weights are smaller,
  and carried they slowed those fits). Fits at C < 1 start from zero, as
  scikit-learn's: there the logits are so small that where the optimiser stops within the gradient tolerance
  (e.g. a warm start's intercepts) would decide the predictions.
- Own L-BFGS (history 10, as scikit-learn's; Armijo backtracking from the unit step, which L-BFGS takes almost
  every iteration: about one pass over the data per iteration instead of a strong-Wolfe search's 1.2-1.5).
  Fits at C >= 1 run in float32; fits at C < 1 in float64 (the logits are small and float32 would blur their
  differences), to scikit-learn's stopping test (largest gradient entry of H in the original variables at most
  ``tol``; relative change of H at most scikit-learn's ``ftol``, 64 x float64 epsilon; ``max_iter``).
- Search fits at C >= 1 (``fit(C)``) stop when H decreased by less than ``search_rtol`` (1e-5, relative to
  max(|H|, 1)) per iteration over the last 3, or on scikit-learn's gradient test; the validation accuracy has
  settled there to a few rows (a search only compares accuracies: on 200-class benchmark data and in
  tests/unit/test_logistic.py the search chose the same C as one over fits run to 1e-8, for 37% and under 50%
  of the passes; a one-row tie can go either way: on the 1000-class data, benchmarks/results/fewshot_fit_speed,
  the sixth bisection step went right on 2968 vs 2967 of 4000 validation rows and the search chose 6.04
  instead of the previous code's 5.83, its neighbour, both heads within 0.01 point of scikit-learn's at their
  C). ``fit(C, final=True)``, the fit a head keeps, continues from there to 1e-8 per iteration: float32's
  resolution of H (its rounding, about 1e-8 relative, stops it before scikit-learn's gradient test). The
  gradient test is float64 either way.
- A fit that starts at zero needs no pass there: every softmax is 1/K, so H = log K, the cross-entropy gradient
  is ``(1 x^T / K - S) / n`` (x: the features' column sums) and the first step's curvature needs one product.
- Not used: bfloat16 products for the early iterations (2.1x cheaper per pass on this CPU's avx512_bf16): their
  gradient error at the search fits' stopping points is as large as the gradient, and the noise earlier cost as
  many extra iterations as it saved (200-class benchmark data: 243 passes, 77 of them bfloat16, vs 200).
- One pass (H and its gradient) is two matrix products and the exponentials in place on the (n, K) logits: the
  label term of the cross-entropy uses the class sums S of the features, ``<theta, S>`` and ``P^T X - S``,
  instead of indexing the logits. Each fit times its first pass on torch's threads and its second on one thread
  and runs the rest on the faster (on a machine whose cores are busy with other work, one thread is faster and
  spends less CPU: two threads wait for each other); torch's setting is restored after the fit.
- The intercepts are centred (they sum to 0, as scikit-learn's multinomial intercepts do; a common shift does
  not change the model).

So the answer is not scikit-learn's to the last digit: the objective is within a small tolerance of
scikit-learn's (tests/unit/test_logistic.py bounds it and the accuracy against scikit-learn's solution).
"""

from __future__ import annotations

import math
import time

import numpy as np

_F32_FROM_C = 1.0  # C at and above which fits run in float32 (warm-started)
_SEARCH_RTOL = 1e-5  # search fits stop when H decreases by less than this, relative, per iteration (over 3)
_SEARCH_WINDOW = 3
_FINAL_RTOL = 1e-8  # the fit a head keeps: on until float32's resolution of H (relative, per iteration over 3)
_F64_FTOL = 64 * np.finfo(np.float64).eps  # scikit-learn's ftol for L-BFGS-B (float64 fits, C < 1)
_HISTORY = 10  # L-BFGS pairs (scikit-learn's maxcor)
_KEEP_PAIRS = 3  # fits whose L-BFGS pairs are kept for later warm starts
_EXTRAPOLATE_MAX = 2.0  # a start above all fits: at most one interval of the two largest beyond the largest


class TorchLogistic:
    """Fits of one training set at any C: ``fit(C) -> (coef (K, d), intercept (K,), n_iter)`` in float64.
    ``y`` holds class indices 0..K-1 (K >= 2, all present). ``fit(C)`` is a search fit (float32 where C >= 1);
    ``fit(C, final=True)`` continues it to float32's resolution of H."""

    def __init__(self, X: np.ndarray, y: np.ndarray, max_iter: int, tol: float, search_rtol: float = _SEARCH_RTOL):
        X = np.asarray(X, dtype=np.float64)
        self.n, self.d = X.shape
        self.y = np.asarray(y, dtype=np.int64)
        self.k = int(self.y.max()) + 1
        self.mu = X.mean(axis=0)
        self._augmented = np.hstack([X - self.mu, np.ones((self.n, 1))])  # centred features and a ones column
        self._data: dict = {}  # dtype -> augmented features tensor
        self.max_iter, self.tol = int(max_iter), float(tol)
        self.solutions: dict[float, np.ndarray] = {}  # C -> theta (K, d + 1) = [V | c] in centred variables
        self.iterations: dict[float, int] = {}  # C -> iterations spent at that C so far
        self.polished: set[float] = set()
        self._pairs: dict[float, list] = {}  # C -> L-BFGS pairs (s, y of the cross-entropy part), float32
        self._trial: list[int] = []  # thread counts still to time in this fit (see ``fit``)
        self._pass_wall: dict[int, float] = {}  # threads -> wall seconds of a pass
        self.passes = 0  # passes over the data (function + gradient evaluations), for benchmarks
        self.search_rtol = float(search_rtol)

    def _features(self, dtype):
        import torch

        if dtype not in self._data:
            self._data[dtype] = torch.tensor(self._augmented, dtype=dtype)
        return self._data[dtype]

    def objective(self, C: float, coef: np.ndarray, intercept: np.ndarray) -> float:
        """H at (coef, intercept), in float64 NumPy (what the tests compare with scikit-learn's solution)."""
        return logistic_objective(self._augmented[:, :-1] + self.mu, self.y, C, coef, intercept)

    # ------------------------------------------------------------------ one pass: H and its gradient

    def _class_sums(self, dtype):
        """S (K, d + 1): the sum of each class's augmented feature rows (the cross-entropy's label term), and the
        column sums of the augmented features (the gradient at zero), both in ``dtype``."""
        import torch

        key = ("sums", dtype)
        if key not in self._data:
            X = self._features(dtype)
            S = torch.zeros(self.k, self.d + 1, dtype=dtype).index_add_(0, torch.from_numpy(self.y), X)
            self._data[key] = S, torch.from_numpy(self._augmented.sum(axis=0)).to(dtype)
        return self._data[key]

    def _value_and_gradient(self, theta, X, reg: float):
        """H (float) and the gradients (cross-entropy part, full) at theta, both (K, d + 1) in theta's dtype.

        With P the softmax of the logits X theta^T and S the class sums of X: the cross-entropy is
        ``(sum_i logsumexp_i - <theta, S>) / n`` and its gradient ``(P^T X - S) / n``; one pass is two matrix
        products and the exponentials, in place on the (n, K) logits."""
        import torch

        self.passes += 1
        timing = bool(self._trial)
        if timing:
            torch.set_num_threads(self._trial[0])
            start = time.perf_counter()
        S = self._class_sums(X.dtype)[0]
        z = X @ theta.T  # (n, K) logits
        top = z.amax(dim=1)
        z.sub_(top[:, None]).exp_()
        total = z.sum(dim=1)
        lse = float((top + total.log()).sum(dtype=torch.float64))
        loss = (lse - float((theta * S).sum(dtype=torch.float64))) / self.n
        z.mul_(total.reciprocal_()[:, None])  # softmax
        ce_grad = (X.T @ z).T.sub(S).div_(self.n).contiguous()
        V = theta[:, :-1]
        grad = ce_grad.clone()
        grad[:, :-1].add_(V, alpha=reg)
        if timing:
            self._pass_wall[self._trial.pop(0)] = time.perf_counter() - start
            if not self._trial:  # both timed: the rest of this fit on the faster setting
                torch.set_num_threads(min(self._pass_wall, key=self._pass_wall.get))
        return loss + 0.5 * reg * float(V.square().sum(dtype=torch.float64)), ce_grad, grad

    def _value_and_gradient_at_zero(self, dtype):
        """H and its gradients at theta = 0 without a pass: every softmax is 1/K, so H = log K and the
        cross-entropy gradient is ``(1 x^T / K - S) / n`` with x the column sums of the features."""
        S, column_sums = self._class_sums(dtype)
        ce_grad = (column_sums[None, :] / self.k - S) / self.n
        return math.log(self.k), ce_grad, ce_grad.clone()

    def _converged(self, grad, tol: float) -> bool:
        """scikit-learn's gradient test in the original variables: the coef gradient is g_V + g_c mu^T."""
        import torch

        g = grad.double()
        g_coef = g[:, :-1] + g[:, -1:] * torch.from_numpy(self.mu)[None]
        return max(float(g_coef.abs().max()), float(g[:, -1].abs().max())) <= tol

    # ------------------------------------------------------------------ L-BFGS

    def _lbfgs(self, theta, C: float, pairs: list, iterations: int, rtol: float, window: int = 1):
        """Minimise H at C from theta (a tensor of the working dtype) for at most ``iterations`` iterations,
        stopping on the gradient test or when H decreased by at most ``rtol`` (relative) per iteration over the
        last ``window`` iterations; ``pairs`` are (s, y of the cross-entropy part) curvature pairs to start from
        (any dtype); a start at zero needs no pass. Returns (theta, iterations done, new cross-entropy pairs)."""
        import torch

        dtype = theta.dtype
        X = self._features(dtype)
        reg = 1.0 / (C * self.n)

        def dot(a, b) -> float:  # in the working dtype (float32 sums of 5e5 products: ample for L-BFGS)
            return float(torch.dot(a.reshape(-1), b.reshape(-1)))

        def full_pair(s, y_ce):
            return s, carry_pair(s, y_ce, reg)

        memory = []  # (s, y, 1 / s.y) of H at this C
        ce_memory = []
        for s, y_ce in pairs[-_HISTORY:]:
            s, y_full = full_pair(s.to(dtype), y_ce.to(dtype))
            sy = dot(s, y_full)
            if sy > 0:
                memory.append((s, y_full, 1.0 / sy))
                ce_memory.append((s, y_ce.to(dtype)))
        zero = not bool(theta.any())
        if zero:
            f, ce_grad, grad = self._value_and_gradient_at_zero(dtype)
        else:
            f, ce_grad, grad = self._value_and_gradient(theta, X, reg)
        values = [f]
        done = 0
        while done < iterations and not self._converged(grad, self.tol):
            q = -grad
            alphas = []
            for s, y_full, rho in reversed(memory):
                a = rho * dot(s, q)
                alphas.append(a)
                q = q.add(y_full, alpha=-a)
            if memory:
                s, y_full, rho = memory[-1]
                q = q.mul(1.0 / (rho * dot(y_full, y_full)))  # gamma = s.y / y.y
                step = 1.0
            else:  # steepest descent: the step that minimises a quadratic with H's curvature along -grad
                step = 1.0
                q = q.mul(self._first_step(theta, grad, X, reg, zero))
            for (s, y_full, rho), a in zip(memory, reversed(alphas)):
                q = q.add(s, alpha=a - rho * dot(y_full, q))
            slope = dot(grad, q)
            if slope >= 0:  # not a descent direction (rounding): restart from steepest descent
                memory.clear()
                ce_memory.clear()
                q = -grad * self._first_step(theta, grad, X, reg, zero)
                slope = dot(grad, q)
            while True:  # Armijo backtracking from the unit step
                candidate = theta.add(q, alpha=step)
                f_new, ce_new, grad_new = self._value_and_gradient(candidate, X, reg)
                if f_new <= f + 1e-4 * step * slope or step < 1e-8:
                    break
                step *= 0.5
            s = candidate - theta
            y_ce = ce_new - ce_grad
            s_full, y_full = full_pair(s, y_ce)
            sy = dot(s_full, y_full)
            theta, f, ce_grad, grad = candidate, f_new, ce_new, grad_new
            values.append(f)
            done += 1
            zero = False
            if sy > 1e-10 * dot(y_full, y_full):
                memory.append((s_full, y_full, 1.0 / sy))
                ce_memory.append((s, y_ce))
                if len(memory) > _HISTORY:
                    memory.pop(0)
                    ce_memory.pop(0)
            if done >= window and values[-1 - window] - f <= window * rtol * max(abs(f), abs(values[-2]), 1.0):
                break
        return theta, done, ce_memory

    def _first_step(self, theta, grad, X, reg: float, zero: bool = False) -> float:
        """1 / (the curvature of H along grad) by a Gauss-Newton product at theta: one extra product (two unless
        theta is zero, where every softmax is 1/K), no line search."""
        u = X @ grad.T  # (n, K) directional change of the logits
        if zero:
            pu = u / self.k
        else:
            z = X @ theta.T
            p = z.sub_(z.max(dim=1).values[:, None]).exp_()
            p.div_(p.sum(dim=1)[:, None])
            pu = p * u
        curvature = float((pu * u).sum() - (pu.sum(dim=1) ** 2).sum()) / self.n
        curvature += reg * float(grad[:, :-1].square().sum())
        norm2 = float(grad.square().sum())
        self.passes += 1
        return 1.0 / max(curvature / max(norm2, 1e-300), 1e-12)

    # ------------------------------------------------------------------ fits

    def _start(self, C: float, dtype):
        """(theta, pairs): interpolated in log C between the nearest fitted C >= 1 on each side (with the nearest
        fit's curvature pairs); above all of them, extrapolated in log C from the two largest (at most one of their
        intervals beyond, no pairs: their curvature is the wrong scale there), else the nearest (with its pairs)."""
        import torch

        fitted = sorted(c for c in self.solutions if c >= _F32_FROM_C) if C >= _F32_FROM_C else []
        if not fitted:
            return torch.zeros(self.k, self.d + 1, dtype=dtype), []
        below, above = [c for c in fitted if c < C], [c for c in fitted if c > C]
        nearest = min(fitted, key=lambda c: (abs(math.log(c / C)), c))
        if below and above:
            lo, hi = max(below), min(above)
        elif len(below) >= 2:
            lo, hi = below[-2], below[-1]
        else:
            lo = hi = nearest
        t = (math.log(C) - math.log(lo)) / (math.log(hi) - math.log(lo)) if hi != lo else 0.0
        if t > _EXTRAPOLATE_MAX:  # too far beyond the two largest fits: the largest
            lo = hi = nearest
            t = 0.0
        theta = (1 - t) * self.solutions[lo] + t * self.solutions[hi]
        if t > 1:
            return torch.tensor(theta, dtype=dtype), []
        pairs = self._pairs.get(nearest) or next((self._pairs[c] for c in sorted(
            self._pairs, key=lambda c: abs(math.log(c / C)))), [])
        return torch.tensor(theta, dtype=dtype), pairs

    def fit(self, C: float, final: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """(coef (K, d), intercept (K,), iterations so far at C), float64; torch's thread setting is restored."""
        import torch

        threads = torch.get_num_threads()
        self._trial = [threads, 1] if threads > 1 else []
        self._pass_wall = {}
        try:
            return self._fit(float(C), final)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, C: float, final: bool) -> tuple[np.ndarray, np.ndarray, int]:
        import torch

        if C not in self.solutions:
            dtype = torch.float32 if C >= _F32_FROM_C else torch.float64
            theta, pairs = self._start(C, dtype)
            if dtype == torch.float32:
                theta, done, pairs = self._lbfgs(theta, C, pairs, self.max_iter, self.search_rtol, _SEARCH_WINDOW)
            else:
                theta, done, pairs = self._lbfgs(theta, C, pairs, self.max_iter, _F64_FTOL)
            self._store(C, theta, done, pairs, polished=dtype == torch.float64)
        if final and C not in self.polished:  # float32 on to its resolution of H
            left = self.max_iter - self.iterations[C]
            theta = torch.tensor(self.solutions[C], dtype=torch.float32)
            theta, done, pairs = self._lbfgs(theta, C, self._pairs.get(C, []), left, _FINAL_RTOL, _SEARCH_WINDOW)
            self._store(C, theta, done, pairs, polished=True)
        theta = self.solutions[C]
        V, c = theta[:, :-1], theta[:, -1]
        intercept = c - V @ self.mu
        return np.ascontiguousarray(V), intercept - intercept.mean(), self.iterations[C]

    def _store(self, C: float, theta, done: int, pairs: list, polished: bool) -> None:
        import torch

        self.solutions[C] = theta.detach().double().numpy().copy()
        self.iterations[C] = self.iterations.get(C, 0) + done
        if polished:
            self.polished.add(C)
        if pairs:
            self._pairs.pop(C, None)
            self._pairs[C] = [(s.to(torch.float32), y.to(torch.float32)) for s, y in pairs]
            while len(self._pairs) > _KEEP_PAIRS:
                self._pairs.pop(next(iter(self._pairs)))


def carry_pair(s, y_ce, reg: float):
    """An L-BFGS pair of H at any C from one of the cross-entropy part: ``y_ce + reg * s`` on the weights, the
    intercept column (last) unpenalised; ``reg = 1 / (C n)``. Exact: the cross-entropy does not depend on C."""
    y_full = y_ce.clone()
    y_full[:, :-1].add_(s[:, :-1], alpha=reg)
    return y_full


def logistic_objective(X: np.ndarray, y: np.ndarray, C: float, coef: np.ndarray, intercept: np.ndarray) -> float:
    """scikit-learn's multinomial L-BFGS objective: mean cross-entropy + |coef|^2 / (2 C n), float64."""
    X = np.asarray(X, dtype=np.float64)
    z = X @ np.asarray(coef, np.float64).T + np.asarray(intercept, np.float64)
    top = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    n = len(X)
    return float((lse - z[np.arange(n), y]).sum() / n + 0.5 * np.square(coef).sum() / (C * n))
