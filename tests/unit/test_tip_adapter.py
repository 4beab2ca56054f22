"""Tip-Adapter and Tip-Adapter-F against the authors' formulas and search loop, recomputed here in NumPy."""

import numpy as np
import pytest
from scipy.special import softmax

from cliplab.errors import CliplabError, FeatureError, LabelError
from cliplab.eval import evaluate
from cliplab.features import ImageFeatures, class_weights
from cliplab.heads import ZeroShotClassifier, create_head, get_head, head_entry
from cliplab.heads.saving import load_head, save_head
from cliplab.heads.tip_adapter import (
    TipAdapter,
    TipAdapterF,
    accuracy_counts,
    accuracy_counts_bruteforce,
    search_values,
)

NAMES = ["cat", "dog", "car", "tree", "boat"]
TEMPLATES = ["a photo of a {c}."]
MODEL = {"model": "tiny", "pretrained": "", "model_id": "tiny-seed0", "weights": "random"}


def _unit(a):
    a = np.asarray(a, np.float64)
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def _task(per_class=8, val_per_class=4, dim=64, seed=0, spread=0.8, n_classes=len(NAMES)):
    """Clustered unit features: separable by their class centres, unrelated to tiny's random text weights."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(size=(n_classes, dim))

    def draw(k):
        y = np.repeat(np.arange(n_classes), k)
        return _unit(centres[y] + spread * rng.normal(size=(len(y), dim))), y

    (X, y), (X_val, y_val), (X_test, y_test) = draw(per_class), draw(val_per_class), draw(20)
    return X, y, X_val, y_val, X_test, y_test


def _head(tiny, tmp_path, cls=TipAdapter, **params):
    """A head with the authors' constant 100 as zero-shot scale (tiny's own is 1/0.07), unless given."""
    params.setdefault("logit_scale", 100.0)
    return cls(tiny, NAMES, TEMPLATES, cache_dir=tmp_path, **params)


def _text(tiny, tmp_path):
    return class_weights(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).astype(np.float64)


def _tip_logits(X, W, keys, key_labels, alpha, beta, n_classes=len(NAMES)):
    """The authors' expression, main.py: 100 * f @ W + alpha * ((-1) * (beta - beta * f @ K)).exp() @ L."""
    X, keys = np.asarray(X, np.float64), np.asarray(keys, np.float64)
    one_hot = np.eye(n_classes)[key_labels]
    return 100.0 * X @ W + alpha * np.exp(-1 * (beta - beta * (X @ keys.T))) @ one_hot


def _authors_search(X_val, y_val, W, keys, key_labels, scale=(7.0, 3.0), step=(200, 20)):
    """utils.search_hp, literally: beta outer, alpha inner, ``acc > best_acc`` from 0 at (0, 0)."""
    beta_list = [i * (scale[0] - 0.1) / step[0] + 0.1 for i in range(step[0])]
    alpha_list = [i * (scale[1] - 0.1) / step[1] + 0.1 for i in range(step[1])]
    best_acc, best_beta, best_alpha = 0, 0, 0
    table = np.zeros((step[0], step[1]))
    for b, beta in enumerate(beta_list):
        for a, alpha in enumerate(alpha_list):
            acc = 100 * np.mean(np.argmax(_tip_logits(X_val, W, keys, key_labels, alpha, beta), axis=1) == y_val)
            table[b, a] = acc / 100
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_alpha, best_beta, table


# ---------------------------------------------------------------------------------------------- Tip-Adapter


def test_alpha_zero_gives_exactly_the_zero_shot_logits(tiny, tmp_path):
    X, y, X_val, y_val, X_test, _ = _task()
    head = _head(tiny, tmp_path, init_alpha=0.0).fit(X, y)  # no validation: init values are used
    assert head.fit_summary() == {"alpha": 0.0, "beta": 1.0, "searched": False}
    zeroshot = ZeroShotClassifier(tiny, NAMES, TEMPLATES, logit_scale=100.0, cache_dir=tmp_path).fit()
    np.testing.assert_array_equal(head.logits(X_test), zeroshot.logits(X_test))
    # search_hp=False also keeps the init values with validation data at hand
    kept = _head(tiny, tmp_path, search_hp=False).fit(X, y, X_val, y_val)
    assert kept.fit_summary() == {"alpha": 1.17, "beta": 1.0, "searched": False}


def test_logits_are_the_authors_formula(tiny, tmp_path):
    X, y, X_val, y_val, X_test, _ = _task(seed=1)
    W = _text(tiny, tmp_path)
    head = _head(tiny, tmp_path).fit(X, y)
    assert (head.alpha_, head.beta_) == (1.17, 1.0)  # the ImageNet config's init_alpha, init_beta
    expected = _tip_logits(X_test, W, X, y, 1.17, 1.0)
    np.testing.assert_allclose(head.logits(X_test), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(head.cache_logits(X_test), np.exp(-(1.0 - X_test.astype(np.float64) @ X.T.astype(
        np.float64))) @ np.eye(len(NAMES))[y], rtol=1e-5)
    np.testing.assert_allclose(head.predict_proba(X_test), softmax(expected, axis=1), atol=1e-5)
    # the order of the training items does not matter; keys are stored sorted by class
    order = np.random.default_rng(0).permutation(len(y))
    shuffled = _head(tiny, tmp_path).fit(X[order], y[order])
    np.testing.assert_allclose(shuffled.logits(X_test), head.logits(X_test), rtol=1e-5, atol=1e-4)
    assert (np.diff(head.cache_labels_) >= 0).all()
    # after a search, the chosen values go into the same formula; other scales too
    searched = _head(tiny, tmp_path, logit_scale=50.0).fit(X, y, X_val, y_val)
    expected = _tip_logits(X_test, W, X, y, searched.alpha_, searched.beta_) - 50.0 * X_test @ W
    np.testing.assert_allclose(searched.logits(X_test), expected, rtol=1e-5, atol=1e-4)


def test_zero_shot_term_uses_the_models_logit_scale_by_default(tiny, tmp_path):
    """The code's 100 is CLIP's logit scale: a model with another one gets its own, and the search is the authors'
    loop on that model's zero-shot logits (their 100 * f @ W with W scaled by scale / 100)."""
    X, y, X_val, y_val, X_test, _ = _task(seed=2, spread=1.6)
    W = _text(tiny, tmp_path)
    scale = float(tiny.logit_scale)
    assert abs(scale - 100.0) > 50  # tiny's 1/0.07: the default must differ from the constant
    head = TipAdapter(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).fit(X, y)
    assert head.logit_scale is None and head.logit_scale_ == pytest.approx(scale)
    for key, bad in (("logit_scale", "abc"), ("logit_scale", float("inf")), ("init_alpha", "x")):
        with pytest.raises(CliplabError, match=f"{key} must be a finite number"):
            TipAdapter(tiny, NAMES, TEMPLATES, cache_dir=tmp_path, **{key: bad}).fit(X, y)
    cache = np.exp(-(1.0 - X_test.astype(np.float64) @ X.T.astype(np.float64))) @ np.eye(len(NAMES))[y]
    np.testing.assert_allclose(head.logits(X_test), scale * X_test @ W + 1.17 * cache, rtol=1e-5, atol=1e-4)
    searched = TipAdapter(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).fit(X, y, X_val, y_val)
    alpha, beta, table = _authors_search(X_val, y_val, W * scale / 100.0, X, y)
    assert (searched.alpha_, searched.beta_) == (alpha, beta)
    np.testing.assert_array_equal(searched.search_accuracy_, table)
    constant = _head(tiny, tmp_path).fit(X, y, X_val, y_val)  # logit_scale=100: the code's constant
    assert (constant.alpha_, constant.beta_) == _authors_search(X_val, y_val, W, X, y)[:2]
    assert not np.array_equal(constant.search_accuracy_, searched.search_accuracy_)  # the scale matters here
    # Tip-Adapter-F trains on the same logits: its first loss is the cross-entropy at the model's scale
    tip_f = TipAdapterF(tiny, NAMES, TEMPLATES, cache_dir=tmp_path, epochs=1, batch_size=len(y)).fit(X, y)
    order = np.argsort(y, kind="stable")
    logits = scale * X.astype(np.float64) @ W + 1.17 * np.exp(-(1.0 - X.astype(np.float64) @ X[order].T.astype(
        np.float64))) @ np.eye(len(NAMES))[y[order]]
    expected_loss = -np.mean(np.log(softmax(logits, axis=1)[np.arange(len(y)), y]))
    assert tip_f.training_loss_ == pytest.approx([expected_loss], rel=1e-5)


def test_search_is_the_authors_loop_on_validation_only(tiny, tmp_path):
    X, y, X_val, y_val, _, _ = _task(seed=2, spread=1.6)
    W = _text(tiny, tmp_path)
    head = _head(tiny, tmp_path).fit(X, y, X_val, y_val)
    alpha, beta, table = _authors_search(X_val, y_val, W, X, y)
    assert (head.alpha_, head.beta_) == (alpha, beta)
    assert head.fit_summary() == {"alpha": alpha, "beta": beta, "searched": True}
    np.testing.assert_array_equal(head.search_accuracy_, table)  # every one of the 200 x 20 settings
    assert head.search_accuracy_.shape == (200, 20) and 0 < table.max() < 1  # not a trivial problem
    # other labels for the same validation rows change the choice; it is still the loop's
    y_other = np.roll(y_val, 3)
    other = _head(tiny, tmp_path).fit(X, y, X_val, y_other)
    assert (other.alpha_, other.beta_) == _authors_search(X_val, y_other, W, X, y)[:2]
    assert (other.alpha_, other.beta_) != (alpha, beta)
    # a smaller grid is the same loop with other search_scale / search_step
    small = _head(tiny, tmp_path, search_scale=(3.0, 1.0), search_step=(7, 5)).fit(X, y, X_val, y_val)
    assert (small.alpha_, small.beta_) == _authors_search(X_val, y_val, W, X, y, (3.0, 1.0), (7, 5))[:2]
    assert search_values(7.0, 200)[:2] == [0.1, 0.1 + 6.9 / 200]


def test_test_data_never_reaches_the_fit(tiny, tmp_path):
    X, y, X_val, y_val, X_test, y_test = _task(seed=3, spread=1.4)

    def features(F, labels, split, ids):
        return ImageFeatures(F, labels, [f"{split}/{i}" for i in ids], np.arange(len(labels)), class_names=NAMES,
                             dataset="toy", split=split, model_id="tiny-seed0", model=MODEL, cache_key=split)

    train, val = features(X, y, "train", range(len(y))), features(X_val, y_val, "val", range(len(y_val)))
    summaries = []
    for poison in (0, 2):  # two test sets with different labels and rows
        test = features(np.roll(X_test, poison, axis=0), (y_test + poison) % len(NAMES), "test", range(len(y_test)))
        head = _head(tiny, tmp_path)
        evaluate(head, test, train, val=val)
        summaries.append((head.fit_summary(), head.cache_keys_.copy()))
    assert summaries[0][0] == summaries[1][0] and summaries[0][0]["searched"]
    np.testing.assert_array_equal(summaries[0][1], summaries[1][1])


def test_beats_zero_shot_on_an_easy_task(tiny, tmp_path):
    X, y, X_val, y_val, X_test, y_test = _task(seed=4, spread=0.5)
    zeroshot = ZeroShotClassifier(tiny, NAMES, TEMPLATES, logit_scale=100.0, cache_dir=tmp_path).fit()
    tip = _head(tiny, tmp_path).fit(X, y, X_val, y_val)
    assert zeroshot.score(X_test, y_test) < 0.5  # tiny's random text weights: near chance (0.2)
    assert tip.score(X_test, y_test) >= max(0.85, zeroshot.score(X_test, y_test) + 0.3)


def test_cache_keys_from_views_are_the_normalised_mean_of_the_views(tiny, tmp_path):
    X, y, *_ = _task(seed=5)
    rng = np.random.default_rng(5)
    views = np.stack([_unit(X + 0.3 * rng.normal(size=X.shape)) for _ in range(3)])
    head = _head(tiny, tmp_path).fit(X, y, views=views)
    mean = views.astype(np.float64).mean(axis=0)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    order = np.argsort(y, kind="stable")
    np.testing.assert_allclose(head.cache_keys_, expected[order], atol=1e-6)
    np.testing.assert_array_equal(head.cache_labels_, y[order])
    assert not np.allclose(head.cache_keys_, X[order], atol=1e-3)  # really the views, not X
    with pytest.raises(FeatureError, match="views must have shape"):
        _head(tiny, tmp_path).fit(X, y, views=views[:, :-1])


def test_falls_back_to_the_codes_start_when_no_setting_is_right(tiny, tmp_path):
    W = _text(tiny, tmp_path)[:, :2]
    v = _unit(W[:, 1] - W[:, 0])  # zero-shot prefers class 1 for v, and so does the cache (v is a key of class 1)
    X, y = np.stack([-v, v]), np.array([0, 1])
    head = TipAdapter(tiny, NAMES[:2], TEMPLATES, cache_dir=tmp_path, logit_scale=100.0).fit(X, y, v[None],
                                                                                           np.array([0]))
    assert head.fit_summary() == {"alpha": 0.0, "beta": 0.0, "searched": True}  # utils.search_hp's (0, 0)
    assert head.search_accuracy_.max() == 0.0
    np.testing.assert_allclose(head.logits(X), 100.0 * X @ W, rtol=1e-5)


def test_input_errors(tiny, tmp_path):
    X, y, X_val, y_val, *_ = _task()
    with pytest.raises(LabelError, match="class indices"):
        _head(tiny, tmp_path).fit(X, y + 5)
    with pytest.raises(LabelError, match="needs y_val"):
        _head(tiny, tmp_path).fit(X, y, X_val)
    with pytest.raises(ValueError, match="Unknown label type"):
        _head(tiny, tmp_path).fit(X, y + 0.5)
    with pytest.raises(ValueError, match="width 32"):
        _head(tiny, tmp_path).fit(X[:, :32], y)


# ------------------------------------------------------------------------------------ the pruned search


@pytest.mark.parametrize("seed, case", list(enumerate(["balanced", "unbalanced", "empty class", "trained keys",
                                                       "many classes"])))
def test_pruned_search_counts_equal_the_brute_force(seed, case):
    rng = np.random.default_rng(seed)
    n_classes, shots, dim = (30, 3, 24) if case == "many classes" else (6, 4, 16)
    centres = rng.normal(size=(n_classes, dim))
    labels = rng.integers(0, n_classes, n_classes * shots) if case == "unbalanced" else np.repeat(
        np.arange(n_classes), shots)
    if case == "empty class":
        labels = labels[labels != 2]
    keys = _unit(centres[labels] + rng.normal(size=(len(labels), dim)))
    if case == "trained keys":
        keys = (keys * rng.uniform(0.8, 1.4, size=(len(keys), 1))).astype(np.float32)  # affinities above 1
    y_val = rng.integers(0, n_classes, 60)
    X_val = _unit(centres[y_val] + rng.normal(size=(60, dim)))
    zeroshot = 100 * X_val @ _unit(centres + 1.5 * rng.normal(size=centres.shape)).T
    betas, alphas = search_values(7.0, 60), search_values(3.0, 12)
    expected = accuracy_counts_bruteforce(zeroshot, X_val @ keys.T, y_val, labels, n_classes, betas, alphas)
    counts = accuracy_counts(zeroshot, X_val, keys, y_val, labels, n_classes, betas, alphas)
    np.testing.assert_array_equal(counts, expected)
    assert 0 < expected.min() < expected.max() < 60  # the grid really varies


def test_pruned_search_keeps_argmax_ties_to_the_lower_class():
    # classes 1 and 3 have the same text weight and the same cache: every row of class 3 loses the tie
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(5, 8))
    centres[3] = centres[1]
    labels = np.repeat(np.arange(5), 3)
    keys = _unit(centres[labels] + rng.normal(size=(15, 8)))
    keys[labels == 3] = keys[labels == 1]
    text = _unit(centres).T
    y_val = rng.integers(0, 5, 40)
    X_val = _unit(centres[y_val] + rng.normal(size=(40, 8)))
    betas, alphas = search_values(7.0, 30), [0.0, *search_values(3.0, 6)]  # alpha 0: zero-shot ties too
    expected = accuracy_counts_bruteforce(100 * X_val @ text, X_val @ keys.T, y_val, labels, 5, betas, alphas)
    np.testing.assert_array_equal(accuracy_counts(100 * X_val @ text, X_val, keys, y_val, labels, 5, betas, alphas),
                                  expected)


def _serial_search_reference(zeroshot, X_val, keys, y_val, labels, n_classes, betas, alphas):
    """The search as it was before chunks ran on threads (commit 2414d8f): one loop over chunks of 256 rows,
    BLAS with its own threads; ``accuracy_counts(workers=1)`` is that loop."""
    return accuracy_counts(zeroshot, X_val, keys, y_val, labels, n_classes, betas, alphas, workers=1)


def test_threaded_search_counts_equal_the_serial_loop_and_the_brute_force():
    # 700 validation rows: three chunks of 256, the last one short; 40 classes x 4 shots of 32-d features
    rng = np.random.default_rng(21)
    n_classes, shots, dim, m = 40, 4, 32, 700
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), shots)
    keys = _unit(centres[labels] + 1.2 * rng.normal(size=(len(labels), dim)))
    y_val = rng.integers(0, n_classes, m)
    X_val = _unit(centres[y_val] + 1.2 * rng.normal(size=(m, dim)))
    zeroshot = 100 * X_val @ _unit(centres + 2.0 * rng.normal(size=centres.shape)).T
    betas, alphas = search_values(7.0, 40), search_values(3.0, 10)
    serial = _serial_search_reference(zeroshot, X_val, keys, y_val, labels, n_classes, betas, alphas)
    threaded = accuracy_counts(zeroshot, X_val, keys, y_val, labels, n_classes, betas, alphas, workers=3)
    default = accuracy_counts(zeroshot, X_val, keys, y_val, labels, n_classes, betas, alphas)
    np.testing.assert_array_equal(threaded, serial)
    np.testing.assert_array_equal(default, serial)
    expected = accuracy_counts_bruteforce(zeroshot, X_val @ keys.T, y_val, labels, n_classes, betas, alphas)
    np.testing.assert_array_equal(serial, expected)
    assert 0 < expected.min() < expected.max() < m  # the grid really varies


def test_fit_picks_the_serial_loops_alpha_beta_and_reads_read_only_input(tiny, tmp_path, monkeypatch):
    import warnings

    from cliplab.heads import tip_adapter as module

    X, y, X_val, y_val, X_test, _ = _task(seed=12, val_per_class=52)  # 260 validation rows: two chunks
    views = np.stack([_unit(X + 0.1 * np.random.default_rng(3).normal(size=X.shape)) for _ in range(2)])
    for array in (X, X_val, views):
        array.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "The given NumPy array is not writable"
        head = _head(tiny, tmp_path).fit(X, y, X_val, y_val)
        tuned = _head(tiny, tmp_path, TipAdapterF, epochs=2).fit(X, y, X_val, y_val, views=views)
    original = module.accuracy_counts
    monkeypatch.setattr(module, "accuracy_counts", lambda *a, **k: original(*a, **k, workers=1))
    serial = _head(tiny, tmp_path).fit(X, y, X_val, y_val)
    assert (head.alpha_, head.beta_) == (serial.alpha_, serial.beta_) and head.searched_
    np.testing.assert_array_equal(head.search_accuracy_, serial.search_accuracy_)
    np.testing.assert_array_equal(head.logits(X_test), serial.logits(X_test))
    assert tuned.searched_ and len(tuned.training_loss_) == 2


# --------------------------------------------------------------------------------------------- Tip-Adapter-F


def test_tip_f_first_step_is_adamw_on_the_tip_cross_entropy(tiny, tmp_path):
    X, y, *_ = _task(seed=8)
    rng = np.random.default_rng(8)
    views = np.stack([_unit(X + 0.2 * rng.normal(size=X.shape)) for _ in range(2)])
    lr, decay, alpha, beta = 0.01, 0.05, 1.5, 2.0
    head = _head(tiny, tmp_path, TipAdapterF, epochs=1, batch_size=len(y), lr=lr, weight_decay=decay,
                 init_alpha=alpha, init_beta=beta).fit(X, y, views=views)
    W = _text(tiny, tmp_path)
    order = np.argsort(y, kind="stable")
    mean = views.astype(np.float64).mean(axis=0)
    keys = (mean / np.linalg.norm(mean, axis=1, keepdims=True))[order]
    F_ = views[0].astype(np.float64)  # epoch 0 trains on view 0
    one_hot = np.eye(len(NAMES))[y[order]]
    E = np.exp(-(beta - beta * F_ @ keys.T))
    logits = 100.0 * F_ @ W + alpha * E @ one_hot
    grad_logits = (softmax(logits, axis=1) - np.eye(len(NAMES))[y]) / len(y)
    grad_keys = ((grad_logits @ one_hot.T) * alpha * E * beta).T @ F_
    # AdamW's first step: decoupled decay, then lr * g / (|g| + eps) (bias-corrected moments), eps = 1e-4
    expected = keys * (1 - lr * decay) - lr * grad_keys / (np.abs(grad_keys) + 1e-4)
    np.testing.assert_allclose(head.cache_keys_, expected, atol=2e-5)
    expected_loss = -np.mean(np.log(softmax(logits, axis=1)[np.arange(len(y)), y]))
    assert head.training_loss_ == pytest.approx([expected_loss], rel=1e-5)
    assert head.fit_summary() == {"alpha": alpha, "beta": beta, "searched": False, "epochs": 1}


def test_tip_f_training_lowers_the_loss_and_is_reproducible(tiny, tmp_path):
    X, y, X_val, y_val, X_test, y_test = _task(seed=9, spread=1.4)
    params = {"epochs": 15, "batch_size": 8, "lr": 0.01}
    head = _head(tiny, tmp_path, TipAdapterF, random_state=3, **params).fit(X, y, X_val, y_val)
    losses = head.training_loss_
    assert len(losses) == 15 and losses[-1] < 0.5 * losses[0]
    again = _head(tiny, tmp_path, TipAdapterF, random_state=3, **params).fit(X, y, X_val, y_val)
    np.testing.assert_array_equal(again.cache_keys_, head.cache_keys_)
    assert again.training_loss_ == losses and again.fit_summary() == head.fit_summary()
    other = _head(tiny, tmp_path, TipAdapterF, random_state=4, **params).fit(X, y, X_val, y_val)
    assert not np.array_equal(other.cache_keys_, head.cache_keys_)  # the seed drives the batch order
    assert isinstance(head.cache_keys_, np.ndarray) and head.cache_keys_.dtype == np.float32
    assert not np.allclose(np.linalg.norm(head.cache_keys_, axis=1), 1.0, atol=1e-4)  # not re-normalised
    # searched on validation with the trained keys: the authors' loop with adapter(f) = f K_trainedᵀ
    alpha, beta, _ = _authors_search(X_val, y_val, _text(tiny, tmp_path), head.cache_keys_, head.cache_labels_)
    assert (head.alpha_, head.beta_) == (alpha, beta) and head.fit_summary()["epochs"] == 15


def test_tip_f_without_training_is_tip_adapter(tiny, tmp_path):
    X, y, X_val, y_val, X_test, _ = _task(seed=10)
    tip = _head(tiny, tmp_path).fit(X, y, X_val, y_val)
    untrained = _head(tiny, tmp_path, TipAdapterF, epochs=0).fit(X, y, X_val, y_val)
    np.testing.assert_array_equal(untrained.cache_keys_, tip.cache_keys_)
    np.testing.assert_array_equal(untrained.logits(X_test), tip.logits(X_test))
    assert untrained.training_loss_ == []


# ------------------------------------------------------------------------------------------ registry, saving


def test_registered_built_by_name_and_saved(tiny, tmp_path):
    assert get_head("tip-adapter") is TipAdapter and get_head("tip-adapter-f") is TipAdapterF
    for name in ("tip-adapter", "tip-adapter-f"):
        entry = head_entry(name)
        assert (entry.family, entry.paper, entry.needs_train, entry.needs_backbone) == ("fewshot", None, True, True)
    X, y, X_val, y_val, X_test, _ = _task(seed=11)
    head = create_head("tip-adapter-f", backbone=tiny, class_names=NAMES, templates=TEMPLATES,
                       cache_dir=tmp_path, epochs=2).fit(X, y, X_val, y_val)
    save_head(head, tmp_path / "saved")
    loaded = load_head(tmp_path / "saved", backbone=tiny)
    np.testing.assert_array_equal(loaded.logits(X_test), head.logits(X_test))
    assert loaded.fit_summary() == head.fit_summary()
