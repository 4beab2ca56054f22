"""The torch L-BFGS logistic fits (heads/logistic.py) against scikit-learn's LogisticRegression on the same
objective: the objective within a small tolerance of scikit-learn's solution, test accuracy within 0.1 point,
and CoOp's C search landing on the same C."""

import warnings

import numpy as np
import pytest
import torch
from scipy.special import log_softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from cliplab.heads.base import COOP_SEARCH_LIST, logistic_fits
from cliplab.heads.linear_probe import LinearProbe
from cliplab.heads.logistic import _SEARCH_RTOL, TorchLogistic, carry_pair, logistic_objective

K, SHOTS, DIM = 30, 8, 48


def _task(seed: int, per_class: int, noise: float = 2.5):
    """Unit features around fixed class centres, with a shared direction (as CLIP features have)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(5).normal(size=(K, DIM))
    common = np.random.default_rng(6).normal(size=DIM)
    y = np.repeat(np.arange(K), per_class)
    X = centres[y] + noise * rng.normal(size=(len(y), DIM)) + 2.0 * common
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), y


X, Y = _task(1, SHOTS)
X_VAL, Y_VAL = _task(2, 4)
X_TEST, Y_TEST = _task(3, 70)  # 2,100 rows: 0.1 point = 2 rows
TOL = 1e-4 / len(X)


def _sklearn(C):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=C, max_iter=1000, tol=TOL).fit(X.astype(np.float64), Y)


def _accuracy(coef, intercept):
    return float(np.mean(np.argmax(X_TEST @ coef.T + intercept, axis=1) == Y_TEST))


def test_objective_is_scikit_learns_written_out():
    rng = np.random.default_rng(0)
    coef, intercept = rng.normal(size=(K, DIM)), rng.normal(size=K)
    for C in (0.01, 3.0):
        cross_entropy = -log_softmax(X.astype(np.float64) @ coef.T + intercept, axis=1)[np.arange(len(Y)), Y]
        expected = cross_entropy.mean() + np.sum(coef ** 2) / (2 * C * len(Y))  # intercept unpenalised
        assert logistic_objective(X, Y, C, coef, intercept) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("C", [1e-2, 1.0, 1e2])  # float64 below C = 1, float32 above
def test_torch_fit_reaches_scikit_learns_objective_and_accuracy(C):
    reference = _sklearn(C)
    f_sklearn = logistic_objective(X, Y, C, reference.coef_, reference.intercept_)
    fitter = TorchLogistic(X, Y, 1000, TOL)
    search = fitter.fit(C)  # a search fit: looser stop
    coef, intercept, n_iter = fitter.fit(C, final=True)  # the fit a head keeps
    assert coef.shape == (K, DIM) and intercept.shape == (K,) and n_iter > 0
    f_search, f_torch = (logistic_objective(X, Y, C, c, b) for c, b, _ in (search, (coef, intercept, n_iter)))
    # final: within 1e-7 of the starting objective (log K at zero) above scikit-learn's optimum, or below it;
    # search: within 10x its stopping threshold (H decreasing by less than _SEARCH_RTOL per iteration, relative)
    assert f_torch - f_sklearn <= 1e-7 * np.log(K)
    assert f_search - f_sklearn <= 10 * _SEARCH_RTOL * np.log(K)
    assert f_torch <= f_search + 1e-12
    assert abs(_accuracy(coef, intercept) - _accuracy(reference.coef_, reference.intercept_)) <= 0.001
    same = np.mean(np.argmax(X_TEST @ coef.T + intercept, 1) == reference.predict(X_TEST))
    assert same >= 0.995  # tiny-C logits have near-ties that either stopping point may break
    assert abs(intercept.sum()) < 1e-6  # centred, as scikit-learn's multinomial intercepts
    # the shared logistic_fits(solver="torch") gives the search fit
    np.testing.assert_array_equal(logistic_fits(X, Y, 1000, TOL, solver="torch")(C)[0], search[0])


def test_warm_started_fits_are_within_the_same_tolerance_of_a_cold_start():
    fitter = TorchLogistic(X, Y, 1000, TOL)
    for C in (1.0, 1e2, 1e4, 10.0):  # 10 starts between 1 and 100, interpolated
        fitter.fit(C)
    warm = fitter.fit(3.0, final=True)
    cold = TorchLogistic(X, Y, 1000, TOL).fit(3.0, final=True)
    f_warm, f_cold = (logistic_objective(X, Y, 3.0, c, b) for c, b, _ in (warm, cold))
    assert abs(f_warm - f_cold) <= 1e-7 * np.log(K)
    assert abs(_accuracy(*warm[:2]) - _accuracy(*cold[:2])) <= 0.001
    # below C = 1 every fit starts from zero: the same answer whatever was fitted before
    np.testing.assert_array_equal(fitter.fit(0.01)[0], TorchLogistic(X, Y, 1000, TOL).fit(0.01)[0])


def test_warm_start_interpolates_in_log_c_between_the_nearest_fits():
    fitter = TorchLogistic(X, Y, 1000, TOL)
    for C in (1.0, 100.0, 1e4):
        fitter.fit(C)
    theta, _ = fitter._start(10.0, torch.float64)  # log10: 0 < 1 < 2, halfway between 1 and 100
    np.testing.assert_allclose(theta.numpy(), 0.5 * fitter.solutions[1.0] + 0.5 * fitter.solutions[100.0],
                               rtol=1e-12, atol=1e-15)
    # above the largest: extrapolated in log C from the two largest (10^5 is 1.5 of their interval from 10^2),
    # without curvature pairs; more than one interval beyond: the largest
    theta, pairs = fitter._start(1e5, torch.float64)
    np.testing.assert_allclose(theta.numpy(), -0.5 * fitter.solutions[100.0] + 1.5 * fitter.solutions[1e4],
                               rtol=1e-12, atol=1e-15)
    assert pairs == []
    theta, pairs = fitter._start(1e7, torch.float64)
    np.testing.assert_array_equal(theta.numpy(), fitter.solutions[1e4])
    assert len(pairs) > 0
    theta, pairs = fitter._start(0.5, torch.float64)  # below C = 1: zero, no curvature pairs
    assert not theta.any() and pairs == []


def test_curvature_pairs_carry_exactly_to_another_c():
    """A pair (s, y) of the cross-entropy part, carried to C (``carry_pair``), is the difference of H's gradients
    at C computed afresh: the same curvature information at any C."""
    fitter = TorchLogistic(X, Y, 1000, TOL)
    Xa = fitter._features(torch.float64)
    rng = np.random.default_rng(0)
    before = torch.tensor(rng.normal(size=(K, DIM + 1)))
    after = before + torch.tensor(0.1 * rng.normal(size=(K, DIM + 1)))
    _, ce_before, _ = fitter._value_and_gradient(before, Xa, 1 / (10.0 * fitter.n))  # measured at C = 10
    _, ce_after, _ = fitter._value_and_gradient(after, Xa, 1 / (10.0 * fitter.n))
    for C in (0.3, 1e3):
        reg = 1 / (C * fitter.n)
        g_before, g_after = (fitter._value_and_gradient(t, Xa, reg)[2] for t in (before, after))
        carried = carry_pair(after - before, ce_after - ce_before, reg)
        np.testing.assert_allclose(carried.numpy(), (g_after - g_before).numpy(), rtol=1e-9, atol=1e-15)
        assert not np.allclose((ce_after - ce_before).numpy(), (g_after - g_before).numpy(), rtol=1e-6, atol=0)


def test_search_with_the_torch_solver_lands_on_coops_c():
    torch_head = LinearProbe(solver="torch").fit(X, Y, X_val=X_VAL, y_val=Y_VAL)
    sklearn_head = LinearProbe(solver="sklearn").fit(X, Y, X_val=X_VAL, y_val=Y_VAL)
    assert {acc for _, acc in sklearn_head.search_path_[:7]} != {1.0}  # C matters on this task
    assert torch_head.C_ == sklearn_head.C_
    # the accuracies along the search agree within 2 of 120 validation rows wherever the logits are not
    # rounding-sized (C >= 1e-4) and the training set is not nearly separable (C <= 1e2); at C = 1e4 and 1e6 H is
    # about 1e-2 and 3e-4, flat along the growing weights, and where each solver stops decides the accuracy (a few
    # rows either way): there the torch search fits (warm-started as the search runs them) must be within their
    # stopping tolerance of scikit-learn's H (absolute where H < 1) or below it
    for (c, a_torch), (c_sk, a_sk) in zip(torch_head.search_path_, sklearn_head.search_path_):
        assert c == c_sk
        if 1e-4 <= c <= 1e2:
            assert abs(a_torch - a_sk) <= 2 / len(Y_VAL) + 1e-12
    fitter = TorchLogistic(X, Y, 1000, TOL)
    for c in sorted(COOP_SEARCH_LIST):
        fitter.fit(c)
    for c in (1e4, 1e6):
        coef, intercept, _ = fitter.fit(c)
        reference = _sklearn(c)
        assert logistic_objective(X, Y, c, coef, intercept) <= logistic_objective(
            X, Y, c, reference.coef_, reference.intercept_) + 10 * _SEARCH_RTOL
    assert abs(torch_head.score(X_TEST, Y_TEST) - sklearn_head.score(X_TEST, Y_TEST)) <= 0.001
    f = [logistic_objective(X, Y, torch_head.C_, h.coef_, h.intercept_) for h in (torch_head, sklearn_head)]
    assert f[0] - f[1] <= 1e-7 * np.log(K)


def test_auto_uses_torch_for_large_problems_only(monkeypatch):
    from cliplab.heads import base, logistic

    used = []
    monkeypatch.setattr(logistic.TorchLogistic, "fit", lambda self, C: used.append(C) or (None, None, 0))
    assert LinearProbe().solver == "auto"
    logistic_fits(X, Y, 1000, TOL, solver="auto")(1.0)  # 240 x 48 x 30 = 3.5e5: scikit-learn
    assert used == []
    LinearProbe(C=1.0).fit(X, Y)
    assert used == []
    monkeypatch.setattr(base, "TORCH_FROM", X.shape[0] * X.shape[1] * K)
    logistic_fits(X, Y, 1000, TOL, solver="auto")(1.0)
    assert used == [1.0]
    monkeypatch.setattr(logistic.TorchLogistic, "fit", lambda self, C, final=False: used.append((C, final)) or (
        np.zeros((K, DIM)), np.zeros(K), 1))
    LinearProbe(C=2.0).fit(X, Y)  # the head keeps a final fit
    assert used[1:] == [(2.0, True)]


def test_two_classes_and_unknown_solvers():
    mask = Y < 2
    coef, intercept, _ = logistic_fits(X[mask], Y[mask], 1000, TOL, solver="torch")(1.0)
    reference = LogisticRegression(C=1.0, max_iter=1000, tol=TOL).fit(X[mask].astype(np.float64), Y[mask])
    np.testing.assert_array_equal(coef, reference.coef_)  # scikit-learn's binary model, as before
    with pytest.raises(ValueError, match="solver"):
        logistic_fits(X, Y, 1000, TOL, solver="newton")
    with pytest.raises(ValueError, match="solver"):
        LinearProbe(solver="newton").fit(X, Y)


@pytest.mark.parametrize("faster", [1, 2])
def test_each_fit_times_both_thread_settings_then_runs_on_the_faster_and_restores_torchs(monkeypatch, faster):
    """The first pass of a fit runs on torch's threads, the second on one thread; the rest on the one whose pass
    took less wall time (on an oversubscribed machine one thread is faster); torch's setting is restored after."""
    from cliplab.heads import logistic

    class Clock:  # each reading advances 0.5 s on the faster setting, 1.5 s on the other
        now = 0.0

        def perf_counter(self):
            self.now += 0.5 if torch.get_num_threads() == faster else 1.5
            return self.now

    monkeypatch.setattr(logistic, "time", Clock())
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fitter = TorchLogistic(X, Y, 1000, TOL)
        seen = []
        original = fitter._value_and_gradient
        fitter._value_and_gradient = lambda *a: seen.append(torch.get_num_threads()) or original(*a)
        fitter.fit(10.0)
        assert len(seen) > 4 and seen[:2] == [2, 2]  # at entry: torch's 2, then the trial pass set it back to 2
        assert set(seen[2:]) == {faster}
        assert fitter._pass_wall == {faster: 0.5, 3 - faster: 1.5}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_one_pass_is_the_objective_and_its_gradient_written_out():
    """H from the class sums (<theta, S>) and its gradient (P^T X - S) / n + reg [V | 0], in float64, against the
    objective and the softmax gradient computed row by row from the one-hot labels."""
    fitter = TorchLogistic(X, Y, 1000, TOL)
    rng = np.random.default_rng(1)
    theta = rng.normal(size=(K, DIM + 1))
    C = 3.0
    reg = 1 / (C * fitter.n)
    f, ce_grad, grad = fitter._value_and_gradient(torch.tensor(theta), fitter._features(torch.float64), reg)
    Xa = np.hstack([X.astype(np.float64) - X.astype(np.float64).mean(axis=0), np.ones((len(X), 1))])
    coef, intercept = theta[:, :-1], theta[:, -1] - theta[:, :-1] @ X.astype(np.float64).mean(axis=0)
    assert f == pytest.approx(logistic_objective(X, Y, C, coef, intercept), rel=1e-12)
    p = np.exp(log_softmax(Xa @ theta.T, axis=1))
    expected = (p - np.eye(K)[Y]).T @ Xa / len(Y)
    np.testing.assert_allclose(ce_grad.numpy(), expected, rtol=1e-10, atol=1e-14)
    expected[:, :-1] += reg * theta[:, :-1]
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-10, atol=1e-14)


def test_a_start_at_zero_needs_no_pass():
    """At theta = 0 every softmax is 1/K: H = log K and the cross-entropy gradient (1 x^T / K - S) / n come from the
    column and class sums alone, equal to a pass at zero; the first step's curvature there needs one product, and a
    cold fit never runs a pass at zero."""
    fitter = TorchLogistic(X, Y, 1000, TOL)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        zero = torch.zeros(K, DIM + 1, dtype=dtype)
        f0, ce0, g0 = fitter._value_and_gradient_at_zero(dtype)
        f, ce, g = fitter._value_and_gradient(zero, fitter._features(dtype), 1 / (3.0 * fitter.n))
        assert f0 == pytest.approx(np.log(K), rel=1e-15) and f == pytest.approx(f0, rel=rtol)
        np.testing.assert_allclose(ce0.numpy(), ce.numpy(), rtol=rtol, atol=rtol * float(ce.abs().max()))
        np.testing.assert_allclose(g0.numpy(), g.numpy(), rtol=rtol, atol=rtol * float(g.abs().max()))
    Xa, grad = fitter._features(torch.float64), fitter._value_and_gradient_at_zero(torch.float64)[2]
    zero = torch.zeros(K, DIM + 1, dtype=torch.float64)
    assert fitter._first_step(zero, grad, Xa, 1e-3, zero=True) == pytest.approx(
        fitter._first_step(zero, grad, Xa, 1e-3, zero=False), rel=1e-12)
    seen = []
    original = fitter._value_and_gradient
    fitter._value_and_gradient = lambda theta, *a: seen.append(bool(theta.any())) or original(theta, *a)
    fitter.fit(0.01)  # float64, from zero
    fitter.fit(1.0)  # float32, from zero (nothing fitted at C >= 1 yet)
    assert seen and all(seen)


def _task_of(classes: int, per_class: int, seed: int, dim: int = 64, noise: float = 2.0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(5).normal(size=(classes, dim))
    common = np.random.default_rng(6).normal(size=dim)
    y = np.repeat(np.arange(classes), per_class)
    X = centres[y] + noise * rng.normal(size=(len(y), dim)) + 2.0 * common
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), y


def test_loose_search_fits_pick_the_same_c_as_tight_ones_for_fewer_passes():
    """CoOp's search over search fits (stopped at _SEARCH_RTOL) and over fits run to float32's resolution of H
    (_FINAL_RTOL), on a seeded 25-class problem whose chosen C is above 1 (float32 fits, warm-started): the same
    decisions at every step, so the same C, for under half the passes over the data. (Not a theorem: a one-row
    tie on validation can go either way, as between the torch and scikit-learn fits.)"""
    from cliplab.heads.base import coop_c_search
    from cliplab.heads.logistic import _FINAL_RTOL

    Xs, ys = _task_of(25, 16, seed=1)
    Xv, yv = _task_of(25, 10, seed=2)
    runs = {}
    for name, rtol in (("loose", _SEARCH_RTOL), ("tight", _FINAL_RTOL)):
        fitter = TorchLogistic(Xs, ys, 1000, 1e-4 / len(Xs), search_rtol=rtol)

        def accuracy(c, fitter=fitter):
            coef, intercept, _ = fitter.fit(c)
            return float(np.mean(np.argmax(Xv @ coef.T + intercept, axis=1) == yv))

        for c in sorted(COOP_SEARCH_LIST):  # as LinearProbe runs it
            fitter.fit(c)
        chosen, path = coop_c_search(accuracy, 8)
        runs[name] = chosen, [c for c, _ in path], fitter.passes
    (c_loose, path_loose, passes_loose), (c_tight, path_tight, passes_tight) = runs["loose"], runs["tight"]
    assert c_loose == c_tight > 1.0
    assert path_loose == path_tight
    assert passes_loose <= 0.5 * passes_tight
