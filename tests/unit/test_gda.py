"""GaussianDiscriminant (GDA, paper 3) against the authors' formulas re-computed independently, scikit-learn's LDA,
a brute-force alpha search, and the zero-shot head it adds to."""

import json

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.base import clone
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from cliplab.errors import DimensionMismatchError, FeatureError, LabelError
from cliplab.eval import evaluate
from cliplab.features import ImageFeatures, class_weights
from cliplab.heads import create_head, get_head, head_entry
from cliplab.heads.gda import ALPHAS, GaussianDiscriminant

NAMES = ["cat", "dog", "car", "tree", "boat"]
TEMPLATES = ["a photo of a {c}."]
D = 64  # the tiny backbone's width


def _head(tiny, tmp_path, **params):
    return GaussianDiscriminant(tiny, NAMES, TEMPLATES, cache_dir=tmp_path, **params)


def _centers(seed=99):
    centers = np.random.default_rng(seed).normal(size=(len(NAMES), D))
    return centers / np.linalg.norm(centers, axis=1, keepdims=True)


def _clip_like(n_per_class, seed, spread=1.5):
    """L2-normalised features around random class centres (unrelated to the text weights: zero-shot is poor)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(NAMES)), n_per_class)
    X = _centers()[y] + spread * rng.normal(size=(len(y), D)) / np.sqrt(D)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), y


def _reference_gaussian(samples, labels, n_classes):
    """The authors' KS estimator (main_few_shots.py, run), written independently: a loop over classes, np.cov."""
    samples = np.asarray(samples, np.float64)
    d = samples.shape[1]
    mus = np.stack([samples[labels == k].mean(axis=0) for k in range(n_classes)])
    center = np.concatenate([samples[labels == k] - mus[k] for k in range(n_classes)])
    cov = np.cov(center.T)  # torch.cov(center.T): unbiased, re-centred
    precision = d * np.linalg.pinv((center.shape[0] - 1) * cov + np.trace(cov) * np.eye(d))
    W = np.einsum("nd,dc->cn", mus, precision).T  # the code's W is (d, C); ours is (C, d)
    b = np.log(np.full(n_classes, 1.0 / n_classes)) - np.einsum("nd,dc,nc->n", mus, precision, mus) / 2
    return W, b


def _authors_torch(samples, labels, n_classes):
    """The authors' lines transcribed verbatim in torch (float64 on the CPU instead of float32 on CUDA)."""
    vecs, labels = torch.as_tensor(np.asarray(samples, np.float64)), torch.as_tensor(labels)
    mus = torch.cat([vecs[labels == i].mean(dim=0, keepdim=True) for i in range(n_classes)])
    center_vecs = torch.cat([vecs[labels == i] - mus[i].unsqueeze(0) for i in range(n_classes)])
    cov_inv = center_vecs.shape[1] * torch.linalg.pinv((center_vecs.shape[0] - 1) * center_vecs.T.cov()
                                                       + center_vecs.T.cov().trace()
                                                       * torch.eye(center_vecs.shape[1], dtype=torch.float64))
    ps = torch.ones(n_classes, dtype=torch.float64) * 1. / n_classes
    W = torch.einsum("nd, dc -> cn", mus, cov_inv)
    b = ps.log() - torch.einsum("nd, dc, nc -> n", mus, cov_inv, mus) / 2
    return W.numpy(), b.numpy()  # W: (d, C) as in the code


def _authors_alpha_search(zeroshot, gaussian, y_val):
    """main_few_shots.py's loop: best_acc starts at 0, best_alpha at 0.1; strictly better replaces."""
    best_val_acc, best_alpha = 0, 0.1
    for alpha in [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0]:
        acc = 100 * np.mean((zeroshot + alpha * gaussian).argmax(axis=1) == y_val)
        if acc > best_val_acc:
            best_val_acc, best_alpha = acc, alpha
    return best_alpha


# ---------------------------------------------------------------- (1) the Gaussian part


def test_gaussian_part_is_the_authors_ks_estimator(tiny, tmp_path):
    X, y = _clip_like(8, seed=1)
    head = _head(tiny, tmp_path).fit(X, y)
    W, b = _reference_gaussian(X, y, len(NAMES))
    np.testing.assert_allclose(head.weights_, W, rtol=1e-5, atol=1e-6 * np.abs(W).max())
    np.testing.assert_allclose(head.bias_, b, rtol=1e-6)
    W_code, b_code = _authors_torch(X, y, len(NAMES))
    np.testing.assert_allclose(head.weights_, W_code.T, rtol=1e-5, atol=1e-6 * np.abs(W).max())
    np.testing.assert_allclose(head.bias_, b_code, rtol=1e-6)
    X_test, _ = _clip_like(20, seed=2)
    np.testing.assert_allclose(head.gaussian_logits(X_test), X_test.astype(np.float64) @ W.T + b, rtol=1e-5,
                               atol=1e-5 * np.abs(X_test @ W.T).max())
    # the trace ridge matters here (40 samples in 64-d: the covariance is singular); without it W differs
    mus = np.stack([X[y == k].mean(axis=0) for k in range(len(NAMES))]).astype(np.float64)
    center = X - mus[y]
    no_ridge = mus @ (D * np.linalg.pinv((len(X) - 1) * np.cov(center.T)))
    assert np.linalg.matrix_rank(np.cov(center.T)) < D and not np.allclose(head.weights_, no_ridge, rtol=0.1)


def test_gaussian_part_agrees_with_sklearn_lda_on_gaussian_classes(tiny, tmp_path):
    # Gaussian classes with one shared, strongly anisotropic covariance and many samples per class.
    rng = np.random.default_rng(0)
    A = rng.normal(size=(D, D)) * np.exp(rng.uniform(-2.0, 1.0, size=D))[:, None]  # shared covariance A^T A / D
    means = 2.0 * rng.normal(size=(len(NAMES), D)) / np.sqrt(D)

    def draw(n):
        labels = np.repeat(np.arange(len(NAMES)), n)
        return (means[labels] + rng.normal(size=(len(labels), D)) @ A / np.sqrt(D)).astype(np.float32), labels

    X, y = draw(600)
    X_test, y_test = draw(400)
    gda = _head(tiny, tmp_path).fit(X, y)
    ours = gda.gaussian_logits(X_test).argmax(axis=1)
    # LDA with uniform priors and sklearn's plain (pooled, biased) covariance: the KS precision
    # d·pinv((N-1)Σ + tr(Σ)·I) is LDA's Σ⁻¹ times d/(N-1) (the same argmax, with a uniform prior) except for the
    # ridge tr(Σ)/(N-1) on the diagonal, which shrinks the covariance slightly: hence agreement on almost all
    # rows rather than all. (N = 3000 here, so the ridge is about 1/3000 of the average variance.)
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=None, priors=np.full(len(NAMES), 1 / len(NAMES)))
    theirs = lda.fit(X, y).predict(X_test)
    agreement = np.mean(ours == theirs)
    assert agreement >= 0.98, agreement
    assert np.mean(ours == y_test) > 0.9  # well separated
    # the test can tell: ignoring the shared covariance (nearest mean) disagrees with LDA much more often
    nearest_mean = (-((X_test[:, None, :] - means[None]) ** 2).sum(-1)).argmax(axis=1)
    assert np.mean(nearest_mean == theirs) < 0.9
    # and the svd solver agrees as well
    svd = LinearDiscriminantAnalysis(solver="svd", priors=np.full(len(NAMES), 1 / len(NAMES))).fit(X, y)
    assert np.mean(ours == svd.predict(X_test)) >= 0.98


# ---------------------------------------------------------------- (2) combined logits


def test_combined_logits_are_the_authors_formula(tiny, tmp_path):
    X, y = _clip_like(8, seed=1)
    head = _head(tiny, tmp_path, alpha=0.7, logit_scale=50.0).fit(X, y)
    T = class_weights(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).astype(np.float64)
    W, b = _reference_gaussian(X, y, len(NAMES))
    X_test, _ = _clip_like(10, seed=5)
    X64 = X_test.astype(np.float64)
    expected = 50.0 * X64 @ T + 0.7 * (X64 @ W.T + b)
    np.testing.assert_allclose(head.logits(X_test), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(head.predict_proba(X_test), softmax(expected, axis=1), atol=1e-5)
    assert (head.predict(X_test) == expected.argmax(axis=1)).all()
    assert head.fit_summary() == {"alpha": 0.7, "searched": False}
    # default: alpha 0.1, logit scale 100 on the zero-shot term only
    default = _head(tiny, tmp_path).fit(X, y)
    np.testing.assert_allclose(default.logits(X_test), 100.0 * X64 @ T + 0.1 * (X64 @ W.T + b), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- (3) the alpha search


def test_alpha_search_is_the_authors_loop_on_validation_only(tiny, tmp_path):
    X, y = _clip_like(8, seed=1)
    X_val, y_val = _clip_like(4, seed=2)
    head = _head(tiny, tmp_path).fit(X, y, X_val, y_val)
    T = class_weights(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).astype(np.float64)
    W, b = _reference_gaussian(X, y, len(NAMES))
    zeroshot, gaussian = 100.0 * X_val @ T, X_val @ W.T + b
    expected = _authors_alpha_search(zeroshot, gaussian, y_val)
    assert head.alpha_ == expected and head.fit_summary() == {"alpha": expected, "searched": True}
    assert expected >= 1.0  # GDA helps here: a large alpha wins
    json.dumps(head.fit_summary())

    # Validation labels that are the zero-shot predictions: the smallest alpha reproduces them, first in the loop.
    zs_labels = zeroshot.argmax(axis=1)
    other = _head(tiny, tmp_path).fit(X, y, X_val, zs_labels)
    assert other.alpha_ == _authors_alpha_search(zeroshot, gaussian, zs_labels) == 1e-4 != head.alpha_
    # Unrelated changes (row order of the validation set, an extra prediction afterwards) change nothing.
    order = np.random.default_rng(0).permutation(len(y_val))
    assert _head(tiny, tmp_path).fit(X, y, X_val[order], y_val[order]).alpha_ == head.alpha_
    head.predict(_clip_like(3, seed=9)[0])
    assert head.alpha_ == expected


def test_no_alpha_with_positive_accuracy_keeps_the_starting_value(tiny, tmp_path):
    X, y = _clip_like(8, seed=1)
    # one validation row that every alpha classifies as class 0 (it is class 0's centre), labelled 1
    T = class_weights(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).astype(np.float64)
    W, b = _reference_gaussian(X, y, len(NAMES))
    x = _centers()[:1].astype(np.float32)
    preds = {int((100 * x @ T + a * (x @ W.T + b)).argmax()) for a in ALPHAS}
    wrong = next(c for c in range(len(NAMES)) if c not in preds)
    assert _authors_alpha_search(100 * x @ T, x @ W.T + b, np.array([wrong])) == 0.1
    assert _head(tiny, tmp_path).fit(X, y, x, [wrong]).alpha_ == 0.1
    fallback = _head(tiny, tmp_path, alpha=3.0).fit(X, y, x, [wrong])
    assert fallback.alpha_ == 3.0 and fallback.searched_
    # a custom grid is searched in its own order
    custom = _head(tiny, tmp_path, alphas=[50.0, 5.0]).fit(X, y, *_clip_like(4, seed=2))
    assert custom.alpha_ in (50.0, 5.0)


# ---------------------------------------------------------------- (4) better than zero-shot


def test_beats_zero_shot_on_an_easy_task(tiny, tmp_path):
    X, y = _clip_like(8, seed=1)
    X_val, y_val = _clip_like(4, seed=2)
    X_test, y_test = _clip_like(60, seed=3)
    zeroshot = create_head("zeroshot", backbone=tiny, class_names=NAMES, templates=TEMPLATES, cache_dir=tmp_path)
    zs_acc = zeroshot.fit().score(X_test, y_test)
    gda_acc = _head(tiny, tmp_path).fit(X, y, X_val, y_val).score(X_test, y_test)
    assert gda_acc > 0.9 and gda_acc > zs_acc + 0.3, (gda_acc, zs_acc)


# ---------------------------------------------------------------- (5) augmented views


def test_views_are_separate_samples(tiny, tmp_path):
    X, y = _clip_like(4, seed=1)
    views = np.stack([_clip_like(4, seed=10 + v)[0] for v in range(3)])  # (V, n, d), same labels y
    with_views = _head(tiny, tmp_path).fit(X, y, views=views)
    stacked = _head(tiny, tmp_path).fit(views.reshape(-1, D), np.tile(y, 3))
    np.testing.assert_allclose(with_views.weights_, stacked.weights_, rtol=1e-6)
    np.testing.assert_allclose(with_views.bias_, stacked.bias_, rtol=1e-6)
    assert with_views.n_samples_ == 3 * len(y)
    W, b = _reference_gaussian(views.reshape(-1, D), np.tile(y, 3), len(NAMES))
    np.testing.assert_allclose(with_views.bias_, b, rtol=1e-6)
    # with views, X itself is not a sample (as in the code: only augmented passes are embedded)
    other_X = _head(tiny, tmp_path).fit(_clip_like(4, seed=77)[0], y, views=views)
    np.testing.assert_allclose(other_X.weights_, with_views.weights_, rtol=1e-6)
    assert not np.allclose(_head(tiny, tmp_path).fit(X, y).weights_, with_views.weights_, rtol=1e-3)
    with pytest.raises(FeatureError, match="views must have shape"):
        _head(tiny, tmp_path).fit(X, y, views=views[:, :-1])
    bad = views.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(FeatureError, match="NaN"):
        _head(tiny, tmp_path).fit(X, y, views=bad)


def test_evaluate_passes_views_and_validation(tiny, tmp_path):
    def features(n, seed, split):
        X, y = _clip_like(n, seed)
        ids = [f"{split}/{i}.png" for i in range(len(y))]
        return ImageFeatures(X, y, ids, np.arange(len(y)), class_names=NAMES, dataset="toy", split=split,
                             model_id=tiny.model_id, model={"model": "tiny", "pretrained": "", "model_id": "x"},
                             cache_key=f"k/{split}")

    train, val, test = features(8, 1, "train"), features(4, 2, "val"), features(30, 3, "test")
    views = np.stack([_clip_like(8, seed=20 + v)[0] for v in range(2)])
    head = _head(tiny, tmp_path)
    report = evaluate(head, test, train, val=val, fit_params={"views": views})
    assert head.n_samples_ == 2 * len(train) and head.searched_
    assert report.record["cliplab"]["fit"] == {"alpha": head.alpha_, "searched": True}
    assert report.metrics["acc1"] == pytest.approx(head.score(test.features, test.labels))


# ---------------------------------------------------------------- contract details


def test_registration_and_parameters(tiny, tmp_path):
    entry = head_entry("gda")
    assert get_head("gda") is GaussianDiscriminant
    assert (entry.family, entry.paper, entry.needs_train, entry.needs_backbone) == ("fewshot", 3, True, True)
    head = create_head("gda", backbone=tiny, class_names=NAMES, templates=TEMPLATES, cache_dir=tmp_path)
    params = head.get_params()
    assert (params["alpha"], tuple(params["alphas"]), params["logit_scale"]) == (0.1, ALPHAS, 100.0)
    assert clone(head).get_params()["backbone"] is tiny
    X, y = _clip_like(8, seed=1)
    head.fit(X, y)
    for key, value in vars(head).items():
        if key.endswith("_") and not key.startswith("_"):
            assert isinstance(value, (np.ndarray, float, int, bool, list)), key


def test_classes_without_samples_and_errors(tiny, tmp_path):
    X, y = _clip_like(8, seed=1)
    keep = y != 2
    head = _head(tiny, tmp_path).fit(X[keep], y[keep])
    assert head.classes_.tolist() == [0, 1, 3, 4] and head.logits(X).shape == (len(X), 4)
    T = class_weights(tiny, NAMES, TEMPLATES, cache_dir=tmp_path)
    np.testing.assert_allclose(head.text_weights_, T[:, [0, 1, 3, 4]], atol=1e-6)
    codes = np.searchsorted([0, 1, 3, 4], y[keep])
    _, b = _reference_gaussian(X[keep], codes, 4)
    np.testing.assert_allclose(head.bias_, b, rtol=1e-6)  # prior log(1/4): over the fitted classes
    with pytest.raises(LabelError, match="class indices"):
        _head(tiny, tmp_path).fit(X, y + 5)
    with pytest.raises(DimensionMismatchError):
        _head(tiny, tmp_path).fit(np.zeros((4, 32), np.float32), [0, 1, 2, 3])
    with pytest.raises(LabelError, match="y_val"):
        _head(tiny, tmp_path).fit(X, y, X_val=X)
    with pytest.raises(DimensionMismatchError):
        _head(tiny, tmp_path).fit(X, y).predict(np.zeros((2, 32), np.float32))


def test_deterministic(tiny, tmp_path):
    X, y = _clip_like(8, seed=1)
    X_val, y_val = _clip_like(4, seed=2)
    a = _head(tiny, tmp_path).fit(X, y, X_val, y_val)
    b = _head(tiny, tmp_path).fit(X, y, X_val, y_val)
    assert a.alpha_ == b.alpha_ and np.array_equal(a.weights_, b.weights_) and np.array_equal(a.bias_, b.bias_)
