"""CapSAdapter against the authors' formulas recomputed in NumPy, Tip-Adapter and zero-shot as special cases,
and its vectorised search against the authors' brute-force loop."""

import itertools
import json

import numpy as np
import pytest
from scipy.special import rel_entr, softmax
from sklearn.base import clone

from cliplab.errors import CliplabError, DimensionMismatchError, FeatureError
from cliplab.eval import evaluate
from cliplab.features import ImageFeatures, class_weights
from cliplab.heads import caps_adapter, create_head, head_entry
from cliplab.heads.base import accuracy, best_on_validation
from cliplab.heads.caps_adapter import ALPHAS, BETAS, DELTAS, GAMMAS, GRIDS, CapSAdapter, _count_correct
from cliplab.heads.saving import load_head, save_head

NAMES = ["cat", "dog", "car", "tree", "boat"]
TEMPLATES = ["a photo of a {c}."]


def _unit(a):
    a = np.asarray(a, np.float64)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _data(d, shots=8, val=4, test=20, spread=1.5, seed=0):
    """Five Gaussian classes on the sphere: train, caption embeddings of the train items, validation, test."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(len(NAMES), d))

    def draw(n):
        y = np.repeat(np.arange(len(NAMES)), n)
        return _unit(centers[y] + spread * rng.normal(size=(len(y), d))), y

    X, y = draw(shots)
    captions = _unit(centers[y] + spread * rng.normal(size=(len(y), d)))
    Xv, yv = draw(val)
    Xt, yt = draw(test)
    return X, y, captions, Xv, yv, Xt, yt


def _head(tiny, tmp_path, **params):
    params.setdefault("logit_scale", 100.0)  # the authors' constant, which the reference formulas below write out
    return CapSAdapter(tiny, NAMES, TEMPLATES, cache_dir=tmp_path, **params)


def _weights(tiny, tmp_path):
    return class_weights(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).astype(np.float64)


def _kl_reference(F, S, W, temperature, space):
    """KL(p_i || q_j) by scipy: softmax over the features (the code) or over classes of F W (SuS-X)."""
    F, S = F.astype(np.float64), S.astype(np.float64)
    if space == "classes":
        F, S = F @ W, S @ W
    p, q = softmax(F / temperature, axis=1), softmax(S / temperature, axis=1)
    return rel_entr(p[:, None, :], q[None, :, :]).sum(axis=2)


def _scale(x, target):  # the code's scale_: global min-max of x into target's [min, max]
    return (x - x.min()) / (x.max() - x.min()) * (target.max() - target.min()) + target.min()


def _reference_logits(Xt, keys, captions, y, W, alpha, beta, gamma, delta, temperature=0.5, space="features",
                      logit_scale=100.0):
    """madapter.py's test-time formula, in float64 NumPy over the whole test matrix (its 100 as ``logit_scale``)."""
    f = Xt.astype(np.float64)
    L = np.eye(W.shape[1])[y]
    knowledge = (1 - delta) * f @ keys.astype(np.float64).T + delta * f @ captions.astype(np.float64).T
    cache = np.exp(-beta * (1 - knowledge)) @ L
    clip = logit_scale * f @ W
    kl_logits = -_scale(_kl_reference(Xt, keys, W, temperature, space), knowledge) @ L
    return clip + kl_logits * gamma + cache * alpha


def test_registered_with_paper_and_the_authors_grids():
    entry = head_entry("caps-adapter")
    assert entry.cls is CapSAdapter and entry.paper == 13 and entry.family == "fewshot"
    assert entry.needs_train and entry.needs_backbone
    np.testing.assert_allclose([ALPHAS[0], ALPHAS[-1]], [0.1, 0.1 + 19 * 49.9 / 20])
    assert (len(ALPHAS), len(BETAS), len(GAMMAS), len(DELTAS)) == (20, 200, 50, 11)
    np.testing.assert_allclose([BETAS[0], BETAS[-1], GAMMAS[0], GAMMAS[-1]], [1, 1 + 199 * 49 / 200, 0.1, 29.402])
    np.testing.assert_array_equal(DELTAS, [i / 10 for i in range(11)])
    for key, values in GRIDS["coarse"].items():  # the coarse grid is a subset of the authors' lists, in their order
        full = list(GRIDS["full"][key])
        assert [full.index(v) for v in values] == sorted(full.index(v) for v in values)
    assert [len(GRIDS["coarse"][k]) for k in ("alpha", "beta", "gamma", "delta")] == [6, 6, 7, 6]
    assert GRIDS["coarse"]["beta"][:3] == (1.0, BETAS[8], BETAS[20])


def test_without_kl_and_captions_it_is_tip_adapter(tiny, tmp_path):
    X, y, captions, _, _, Xt, _ = _data(tiny.embed_dim)
    views = np.stack([_unit(X + 0.3 * np.random.default_rng(v).normal(size=X.shape)) for v in range(3)])
    head = _head(tiny, tmp_path, alpha=2.5, beta=3.0, gamma=0.0, delta=0.0).fit(X, y, views=views,
                                                                                caption_features=captions)
    keys = views.astype(np.float64).mean(axis=0)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)  # Tip-Adapter's cache keys: normalised mean over views
    f, W, L = Xt.astype(np.float64), _weights(tiny, tmp_path), np.eye(len(NAMES))[y]
    tip = 100.0 * f @ W + 2.5 * np.exp(-3.0 * (1 - f @ keys.T)) @ L
    np.testing.assert_allclose(head.logits(Xt), tip, rtol=1e-5, atol=1e-4)
    assert head.fit_summary() == {"alpha": 2.5, "beta": 3.0, "gamma": 0.0, "delta": 0.0, "searched": False}


def test_without_cache_and_kl_it_is_zero_shot(tiny, tmp_path):
    X, y, captions, Xv, yv, Xt, _ = _data(tiny.embed_dim)
    head = _head(tiny, tmp_path, alpha=0.0, gamma=0.0).fit(X, y, Xv, yv, caption_features=captions)
    zeroshot = create_head("zeroshot", backbone=tiny, class_names=NAMES, templates=TEMPLATES, logit_scale=100.0,
                           cache_dir=tmp_path).fit()
    np.testing.assert_allclose(head.logits(Xt), zeroshot.logits(Xt), rtol=1e-5, atol=1e-4)
    assert head.searched_  # beta and delta were searched (and cannot matter)


@pytest.mark.parametrize("space", ["features", "classes"])
def test_kl_matrix_matches_scipy_for_every_row(tiny, tmp_path, space):
    X, y, _, _, _, Xt, _ = _data(tiny.embed_dim)
    Xt = Xt[:13]  # 13 rows: the code's batches of 10 would leave the last 3 at zero
    head = _head(tiny, tmp_path, kl_space=space, temperature=0.5).fit(X, y)
    order = np.argsort(y, kind="stable")  # keys_ are grouped by class
    expected = _kl_reference(Xt, X[order], _weights(tiny, tmp_path), 0.5, space)
    kl = head.kl_divergences(Xt)
    np.testing.assert_allclose(kl, expected, rtol=1e-6, atol=1e-9)
    assert (kl[-3:] > 0).all() and np.array_equal(head.support_labels_, y[order])


@pytest.mark.parametrize("space", ["features", "classes"])
def test_logits_match_the_authors_formula(tiny, tmp_path, space):
    X, y, captions, _, _, Xt, _ = _data(tiny.embed_dim)
    params = {"alpha": 3.0, "beta": 5.5, "gamma": 7.0, "delta": 0.3}
    head = _head(tiny, tmp_path, kl_space=space, temperature=0.7, **params).fit(X, y, caption_features=captions)
    expected = _reference_logits(Xt, X, captions, y, _weights(tiny, tmp_path), temperature=0.7, space=space, **params)
    np.testing.assert_allclose(head.logits(Xt), expected, rtol=1e-5, atol=1e-4)
    kl_only = clone(head).set_params(alpha=0.0, gamma=1.0).fit(X, y, caption_features=captions)
    kl_part = kl_only.logits(Xt) - 100.0 * Xt.astype(np.float64) @ _weights(tiny, tmp_path)
    reference = _reference_logits(Xt, X, captions, y, _weights(tiny, tmp_path), 0.0, 5.5, 1.0, 0.3, 0.7, space)
    np.testing.assert_allclose(kl_part, reference - 100.0 * Xt.astype(np.float64) @ _weights(tiny, tmp_path),
                               rtol=1e-5, atol=1e-5)  # the KL term alone, not drowned by the CLIP logits
    assert np.ptp(kl_part) > 0.1


def test_zero_shot_term_uses_the_models_logit_scale_by_default(tiny, tmp_path, monkeypatch):
    """The code's 100 is CLIP's logit scale: a model with another one gets its own in the formula and the search."""
    X, y, captions, Xv, yv, Xt, _ = _data(tiny.embed_dim, val=6, spread=2.5, seed=4)
    scale = float(tiny.logit_scale)
    assert abs(scale - 100.0) > 50  # tiny's 1/0.07: the default must differ from the constant
    params = {"alpha": 3.0, "beta": 5.5, "gamma": 7.0, "delta": 0.3}
    head = CapSAdapter(tiny, NAMES, TEMPLATES, cache_dir=tmp_path, **params).fit(X, y, caption_features=captions)
    assert head.logit_scale is None and head.logit_scale_ == pytest.approx(scale)
    expected = _reference_logits(Xt, X, captions, y, _weights(tiny, tmp_path), logit_scale=scale, **params)
    np.testing.assert_allclose(head.logits(Xt), expected, rtol=1e-5, atol=1e-4)
    # the search scores the same logits: the brute-force loop at the model's scale picks the same hyperparameters
    monkeypatch.setitem(caps_adapter.GRIDS, "coarse", SMALL)
    searched = CapSAdapter(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).fit(X, y, Xv, yv, caption_features=captions)
    expected_choice, best = _brute_force(tiny, tmp_path, X, y, captions, Xv, yv, logit_scale=scale)
    assert {k: v for k, v in searched.fit_summary().items() if k != "searched"} == expected_choice
    assert accuracy(searched.logits(Xv), yv) == best
    for bad in (float("nan"), "abc"):  # the command line hands over what it cannot read as a number as text
        with pytest.raises(CliplabError, match="logit_scale must be a finite number"):
            CapSAdapter(tiny, NAMES, TEMPLATES, cache_dir=tmp_path, logit_scale=bad).fit(X, y)


def test_rescaling_is_over_all_rows_whatever_the_chunking(tiny, tmp_path, monkeypatch):
    X, y, captions, _, _, Xt, _ = _data(tiny.embed_dim)
    head = _head(tiny, tmp_path, alpha=1.0, beta=2.0, gamma=3.0, delta=0.6).fit(X, y, caption_features=captions)
    whole = head.logits(Xt)
    monkeypatch.setattr(caps_adapter, "_CHUNK_ELEMENTS", 7 * len(X))  # chunks of 7 rows
    monkeypatch.setattr(caps_adapter, "_KEEP_BYTES", 0)  # recompute the similarities in the second pass
    np.testing.assert_allclose(head.logits(Xt), whole, rtol=1e-6, atol=1e-5)  # float32 similarities, other shapes
    # transductive, as the code: the min-max rescaling over the rows scored together changes with them
    assert not np.allclose(head.logits(Xt[:5]), whole[:5], rtol=1e-6, atol=1e-6)


def test_count_correct_is_the_plain_argmax_count_ties_included():
    rng = np.random.default_rng(0)
    alphas, gammas = np.array([0.0, 0.5, 1.0, 3.0]), np.array([0.0, 1.0, 2.0])
    for trial in range(20):
        rows, classes = 30, 7
        # small integers: many exact ties, where argmax takes the lower class
        clip, kl, cache = (rng.integers(-3, 4, size=(rows, classes)).astype(np.float64) for _ in range(3))
        if trial % 2:
            clip, kl, cache = (rng.normal(size=(rows, classes)) * s for s in (10, 1, 3))
        truth = rng.integers(0, classes, size=rows)
        naive = np.array([[accuracy(clip + g * kl + a * cache, truth) * rows for g in gammas] for a in alphas])
        np.testing.assert_array_equal(_count_correct(clip, kl, cache, truth, alphas, gammas), naive)


SMALL = {"alpha": (0.1, 2.0, 10.0), "beta": (1.0, 4.0, 20.0), "gamma": (0.1, 5.0, 20.0, 60.0), "delta": (0.0, 0.5, 1.0)}


def _brute_force(tiny, tmp_path, X, y, captions, Xv, yv, logit_scale=100.0):
    """The code's loop: alpha -> beta -> delta -> gamma, strictly better validation accuracy replaces."""
    def score(combo):
        alpha, beta, delta, gamma = combo
        head = _head(tiny, tmp_path, alpha=alpha, beta=beta, gamma=gamma, delta=delta, logit_scale=logit_scale)
        return accuracy(head.fit(X, y, caption_features=captions).logits(Xv), yv)

    grid = itertools.product(SMALL["alpha"], SMALL["beta"], SMALL["delta"], SMALL["gamma"])
    (alpha, beta, delta, gamma), best = best_on_validation(grid, score)
    return {"alpha": alpha, "beta": beta, "gamma": gamma, "delta": delta}, best


def test_search_matches_the_brute_force_loop_on_validation_only(tiny, tmp_path, monkeypatch):
    X, y, captions, Xv, yv, Xt, yt = _data(tiny.embed_dim, val=6, spread=2.5, seed=4)
    monkeypatch.setitem(caps_adapter.GRIDS, "coarse", SMALL)
    head = _head(tiny, tmp_path).fit(X, y, Xv, yv, caption_features=captions)
    expected, best = _brute_force(tiny, tmp_path, X, y, captions, Xv, yv)
    chosen = {key: value for key, value in head.fit_summary().items() if key != "searched"}
    assert chosen == expected and head.searched_
    assert accuracy(head.logits(Xv), yv) == best
    # only validation labels decide: other validation labels, another choice; the test set plays no part
    shuffled = np.random.default_rng(1).permutation(yv)
    other = _head(tiny, tmp_path).fit(X, y, Xv, shuffled, caption_features=captions).fit_summary()
    assert other != head.fit_summary()
    again = _head(tiny, tmp_path).fit(X, y, Xv, yv, caption_features=captions)
    again.predict(Xt)
    assert again.fit_summary() == head.fit_summary()


def test_fixed_hyperparameters_are_not_searched_and_delta_needs_captions(tiny, tmp_path, monkeypatch):
    X, y, captions, Xv, yv, _, _ = _data(tiny.embed_dim)
    monkeypatch.setitem(caps_adapter.GRIDS, "coarse", SMALL)
    head = _head(tiny, tmp_path, beta=4.0, delta=0.5).fit(X, y, Xv, yv, caption_features=captions)
    assert (head.beta_, head.delta_) == (4.0, 0.5) and head.alpha_ in SMALL["alpha"] and head.searched_
    no_captions = _head(tiny, tmp_path).fit(X, y, Xv, yv)
    assert no_captions.delta_ == 0.0 and len(no_captions.caption_keys_) == 0
    with pytest.raises(CliplabError, match="delta=0.5 .* no caption_features"):
        _head(tiny, tmp_path, delta=0.5).fit(X, y)
    assert _head(tiny, tmp_path, delta=0).fit(X, y).delta_ == 0.0
    defaults = _head(tiny, tmp_path).fit(X, y, caption_features=captions).fit_summary()
    assert defaults == {"alpha": 1.0, "beta": 1.0, "gamma": 0.1, "delta": 0.5, "searched": False}
    assert _head(tiny, tmp_path).fit(X, y).delta_ == 0.0  # no captions: delta is 0, not the default


def test_input_errors_are_one_line(tiny, tmp_path):
    X, y, captions, _, _, _, _ = _data(tiny.embed_dim)
    with pytest.raises(DimensionMismatchError, match=r"caption_features must have shape \(40, 64\)"):
        _head(tiny, tmp_path).fit(X, y, caption_features=captions[:-1])
    with pytest.raises(FeatureError, match="views must have shape"):
        _head(tiny, tmp_path).fit(X, y, views=X[None, :-1])
    with pytest.raises(CliplabError, match="search must be one of"):
        _head(tiny, tmp_path, search="fast").fit(X, y)
    with pytest.raises(CliplabError, match="kl_space must be one of"):
        _head(tiny, tmp_path, kl_space="logits").fit(X, y)


def test_beats_zero_shot_on_an_easy_task_and_survives_saving(tiny, tmp_path):
    X, y, captions, Xv, yv, Xt, yt = _data(tiny.embed_dim, test=40)
    head = _head(tiny, tmp_path).fit(X, y, Xv, yv, caption_features=captions)
    zeroshot = accuracy(100.0 * Xt @ _weights(tiny, tmp_path), yt)
    assert head.score(Xt, yt) > 0.9 and head.score(Xt, yt) > zeroshot + 0.3
    loaded = load_head(save_head(head, tmp_path / "saved"), backbone=tiny)
    np.testing.assert_allclose(loaded.logits(Xt), head.logits(Xt), rtol=1e-6)
    assert loaded.fit_summary() == head.fit_summary()


def test_generic_evaluation_passes_captions_and_writes_the_choice(tiny, tmp_path):
    X, y, captions, Xv, yv, Xt, yt = _data(tiny.embed_dim)
    model = {"model": "tiny", "pretrained": "", "model_id": tiny.model_id}

    def features(F, labels, split):
        return ImageFeatures(F, labels, [f"{split}/{i}" for i in range(len(labels))], np.arange(len(labels)),
                             class_names=NAMES, dataset="toy", split=split, model_id=tiny.model_id, model=model)

    head = create_head("caps-adapter", backbone=tiny, class_names=NAMES, templates=TEMPLATES, cache_dir=tmp_path)
    report = evaluate(head, features(Xt, yt, "test"), features(X, y, "train"), val=features(Xv, yv, "val"),
                      fit_params={"caption_features": captions}, output_dir=tmp_path / "out")
    block = json.loads(report.files["json"].read_text())["cliplab"]
    assert block["fit"] == head.fit_summary() and block["fit"]["searched"] and len(head.caption_keys_) == len(X)
    assert block["params"]["search"] == "coarse" and block["params"]["alpha"] is None
    assert report.metrics["acc1"] == pytest.approx(head.score(Xt, yt))
