"""Linear probe with solver="sklearn": scikit-learn's LogisticRegression exactly, with C chosen by CoOp's search on
validation only (the default torch solver is bounded against it in test_logistic.py)."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from cliplab.errors import DimensionMismatchError, LabelError
from cliplab.eval.evaluate import fit_head
from cliplab.features import ImageFeatures
from cliplab.heads import create_head, head_entry
from cliplab.heads.linear_probe import LinearProbe


def _features(seed, n_per_class, spread=2.5, dim=64, n_classes=5):
    """L2-normalised noisy features around fixed class centres (the centres do not depend on ``seed``)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centres[y] + spread * rng.normal(size=(len(y), dim))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), y


# 5 classes x 8 shots, 8 validation items per class: a case where C changes the validation accuracy.
X_TRAIN, Y_TRAIN = _features(1, 8)
X_VAL, Y_VAL = _features(101, 8)
X_TEST, _ = _features(202, 10)


def _sklearn(C, X=X_TRAIN, y=Y_TRAIN, tol="coop"):
    """scikit-learn's probe; ``tol="coop"``: 1e-4 on the summed loss of the scikit-learn CoOp ran (1e-4 / n now)."""
    tol = 1e-4 / len(y) if tol == "coop" else tol
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(solver="lbfgs", max_iter=1000, C=C, tol=tol).fit(X.astype(np.float64), y)


def _coop_search(X, y, X_val, y_val, num_step=8):
    """CoOp's lpclip/linear_probe.py search, re-written here from its source (ff61507); returns its coarse
    accuracies, c_peak, and each step's decision and c_final."""
    def accuracy(c):
        pred = _sklearn(c, X, y).predict(X_val)
        return sum(pred == y_val) / len(y_val)

    search_list = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    acc_list = [accuracy(c) for c in search_list]
    c_peak = search_list[np.argmax(acc_list)]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
    decisions, finals = [], []
    for _ in range(num_step):
        acc_left, acc_right = accuracy(c_left), accuracy(c_right)
        if acc_left < acc_right:
            c_final = c_right
            c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_right = np.log10(c_right)
            decisions.append("right")
        else:
            c_final = c_left
            c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_left = np.log10(c_left)
            decisions.append("left")
        c_left, c_right = np.power(10, c_left), np.power(10, c_right)
        finals.append(c_final)
    return acc_list, c_peak, decisions, finals


@pytest.fixture(scope="module")
def reference():
    return _coop_search(X_TRAIN, Y_TRAIN, X_VAL, Y_VAL)


@pytest.fixture(scope="module")
def searched():
    return LinearProbe(solver="sklearn").fit(X_TRAIN, Y_TRAIN, X_val=X_VAL, y_val=Y_VAL)


def test_c_search_equals_coops_loop(searched, reference):
    acc_list, c_peak, decisions, finals = reference
    assert len(set(acc_list)) > 2  # C matters here: the sweep is not flat
    assert {"left", "right"} <= set(decisions)  # both branches of the halving step are exercised
    assert finals[-1] == searched.C_
    assert searched.fit_summary()["C"] == finals[-1] and searched.fit_summary()["searched"] is True
    assert [acc for _, acc in searched.search_path_[:7]] == pytest.approx(acc_list, abs=0)
    # no steps: the coarse sweep's first best (CoOp's code would have no final classifier)
    assert c_peak == LinearProbe(solver="sklearn", num_steps=0).fit(X_TRAIN, Y_TRAIN, X_val=X_VAL, y_val=Y_VAL).C_


def test_fitted_model_is_sklearns_at_the_chosen_c_on_training_data_only(searched):
    reference = _sklearn(searched.C_)
    np.testing.assert_allclose(searched.coef_, reference.coef_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(searched.intercept_, reference.intercept_, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(searched.predict(X_TEST), reference.predict(X_TEST))
    np.testing.assert_allclose(searched.predict_proba(X_TEST), reference.predict_proba(X_TEST), rtol=0, atol=1e-6)
    np.testing.assert_allclose(searched.logits(X_TEST), reference.decision_function(X_TEST), rtol=0, atol=1e-6)
    # the final fit never sees the validation items: the same as fitting at that C without validation data
    fixed = LinearProbe(solver="sklearn", C=searched.C_).fit(X_TRAIN, Y_TRAIN)
    np.testing.assert_array_equal(fixed.coef_, searched.coef_)
    assert fixed.fit_summary()["searched"] is False


def test_without_validation_data_the_c_hyperparameter_is_used():
    head = LinearProbe(solver="sklearn", C=0.5).fit(X_TRAIN, Y_TRAIN)
    reference = _sklearn(0.5)
    assert head.fit_summary() == {"C": 0.5, "searched": False, "n_iter": int(reference.n_iter_[0]), "tol": 1e-4 / 40}
    np.testing.assert_allclose(head.predict_proba(X_TEST), reference.predict_proba(X_TEST), rtol=0, atol=1e-6)
    assert LinearProbe(solver="sklearn").C == 0.316 and LinearProbe(solver="sklearn").fit(X_TRAIN, Y_TRAIN).C_ == 0.316
    # search=False keeps C even when validation data is given
    fixed = LinearProbe(solver="sklearn", C=0.5, search=False).fit(X_TRAIN, Y_TRAIN, X_val=X_VAL, y_val=Y_VAL)
    assert fixed.fit_summary()["C"] == 0.5 and not fixed.fit_summary()["searched"]
    np.testing.assert_array_equal(fixed.coef_, head.coef_)


def test_two_classes_with_any_labels_match_sklearns_binary_model():
    mask = Y_TRAIN < 2
    X, y = X_TRAIN[mask], np.where(Y_TRAIN[mask] == 0, "cat", "dog")
    head = LinearProbe(solver="sklearn", C=3.0).fit(X, y)
    reference = _sklearn(3.0, X, y)
    assert head.coef_.shape == (1, X.shape[1]) and list(head.classes_) == ["cat", "dog"]
    logits = head.logits(X_TEST)
    z = reference.decision_function(X_TEST)
    np.testing.assert_allclose(logits, np.c_[-z / 2, z / 2], rtol=0, atol=1e-6)
    np.testing.assert_allclose(head.decision_function(X_TEST), z, rtol=0, atol=1e-6)
    np.testing.assert_allclose(head.predict_proba(X_TEST), reference.predict_proba(X_TEST), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(head.predict(X_TEST), reference.predict(X_TEST))


def test_validation_labels_decide_c_and_nothing_else_does(searched):
    # two labelings of the same validation features: what the least and the most regularised probes predict
    weak, strong = _sklearn(1e6).predict(X_VAL), _sklearn(1e-6).predict(X_VAL)
    assert (weak != strong).any()
    c_weak = LinearProbe(solver="sklearn", num_steps=1).fit(X_TRAIN, Y_TRAIN, X_val=X_VAL, y_val=weak).C_
    c_strong = LinearProbe(solver="sklearn", num_steps=1).fit(X_TRAIN, Y_TRAIN, X_val=X_VAL, y_val=strong).C_
    assert c_weak in (1e5, 1e7)  # the sweep peaks at 1e6 (100% there); one step picks an end of [0.1, 10] x peak
    assert c_strong < 1e5
    # the same validation items in another order: the same accuracies, C and fitted state
    order = np.random.default_rng(0).permutation(len(Y_VAL))
    again = LinearProbe(solver="sklearn").fit(X_TRAIN, Y_TRAIN, X_val=X_VAL[order], y_val=Y_VAL[order])
    assert again.C_ == searched.C_ and again.search_path_ == searched.search_path_
    np.testing.assert_array_equal(again.coef_, searched.coef_)


def test_state_is_plain_arrays_and_numbers(searched):
    state = {k: v for k, v in vars(searched).items() if k.endswith("_") and not k.startswith("_")}
    assert {"coef_", "intercept_", "classes_", "n_features_in_", "C_"} <= set(state)
    for key, value in state.items():
        assert isinstance(value, np.ndarray | float | int | bool | list), key
    assert searched.coef_.shape == (5, 64) and searched.intercept_.shape == (5,)


def test_registered_and_fitted_by_the_generic_evaluation_with_validation(reference):
    entry = head_entry("linear-probe")
    assert (entry.family, entry.paper, entry.needs_train, entry.needs_backbone) == ("fewshot", None, True, False)
    ids = [f"{i}.png" for i in range(len(Y_TRAIN) + len(Y_VAL))]
    names = [f"c{i}" for i in range(5)]
    common = dict(class_names=names, dataset="toy", model_id="m", model={}, cache_key="k")
    train = ImageFeatures(X_TRAIN, Y_TRAIN, ids[:len(Y_TRAIN)], np.arange(len(Y_TRAIN)), split="train", **common)
    val = ImageFeatures(X_VAL, Y_VAL, ids[len(Y_TRAIN):], np.arange(len(Y_VAL)), split="val", **common)
    head = fit_head(create_head("linear-probe", num_steps=2, solver="sklearn"), train, val)
    assert head.fit_summary()["searched"] is True
    assert reference[3][1] == head.C_  # CoOp's C after two steps


def test_bad_validation_input_is_refused():
    with pytest.raises(ValueError, match="both X_val and y_val"):
        LinearProbe(solver="sklearn").fit(X_TRAIN, Y_TRAIN, X_val=X_VAL)
    with pytest.raises(DimensionMismatchError):
        LinearProbe(solver="sklearn").fit(X_TRAIN, Y_TRAIN, X_val=X_VAL[:, :10], y_val=Y_VAL)
    with pytest.raises(ValueError, match="rows"):
        LinearProbe(solver="sklearn").fit(X_TRAIN, Y_TRAIN, X_val=X_VAL, y_val=Y_VAL[:-1])
    with pytest.raises(LabelError, match="no validation label"):
        LinearProbe(solver="sklearn").fit(X_TRAIN, Y_TRAIN, X_val=X_VAL, y_val=Y_VAL + 10)
    with pytest.raises(ValueError, match="C must be"):
        LinearProbe(solver="sklearn", C=0).fit(X_TRAIN, Y_TRAIN)


def test_stopping_tolerance_is_coops_gradient_criterion_not_scikit_learns_averaged_one():
    # 100 classes whose unit features share one dominant direction (as CLIP features do, more mildly): the
    # averaged-loss gradient at the zero start is below scikit-learn's tol=1e-4, so it stops at once (chance).
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(100, 64))
    y = np.repeat(np.arange(100), 4)
    X = 1000.0 * np.eye(64)[0] + centres[np.r_[y, y]] + 0.5 * rng.normal(size=(800, 64))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    X, X_test = X[:400], X[400:]
    plain = _sklearn(1.0, X, y, tol=1e-4)
    assert plain.n_iter_[0] == 0 and (plain.predict(X_test) == y).mean() <= 0.02
    head = LinearProbe(solver="sklearn", C=1.0).fit(X, y)
    assert head.tol_ == 1e-4 / 400 and head.n_iter_ > 0 and (head.predict(X_test) == y).mean() > 0.9
    np.testing.assert_allclose(head.predict_proba(X_test), _sklearn(1.0, X, y).predict_proba(X_test), atol=1e-6)
    # an explicit tol is scikit-learn's own
    same = LinearProbe(solver="sklearn", C=1.0, tol=1e-4).fit(X, y)
    np.testing.assert_array_equal(same.coef_, plain.coef_)
