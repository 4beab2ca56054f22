"""Paper 30's description selection in the top-k neighbourhood (heads/desc_select.py) on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.errors import LabelError
from cliplab.features.text import embed_texts
from cliplab.heads import create_head

CLASSES = ["cat", "dog", "bird", "fish"]
DESCRIPTIONS = {"cat": ["pointed ears", "whiskers"], "dog": ["a long tail"], "bird": ["feathers"],
                "fish": ["fins", "scales"]}


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _head(tiny, tmp_path, **params):
    params = {"descriptions": DESCRIPTIONS, "templates": ["a photo of a {c}."], "cache_dir": tmp_path} | params
    return create_head("desc-select", backbone=tiny, class_names=CLASSES, **params)


def _random(tiny, n, seed):
    return _unit(np.random.default_rng(seed).normal(size=(n, tiny.embed_dim))).astype(np.float32)


def test_selection_picks_the_description_that_separates_confusable_classes(tiny, tmp_path):
    e1, e2 = embed_texts(tiny, ["pointed ears", "a long tail"], tmp_path).astype(np.float64)
    u = _unit(e1 - (e1 @ e2) * e2)  # the part of "pointed ears" that "a long tail" does not see
    w = np.random.default_rng(0).normal(size=tiny.embed_dim)
    for v in (e2, u):
        w -= (w @ _unit(v)) * _unit(v)
    w = _unit(w)
    cat, dog = _unit(w + 0.5 * u), _unit(w - 0.5 * u)  # "a long tail" is equally far from both
    noise = np.random.default_rng(1).normal(size=(6, tiny.embed_dim)) * 1e-3
    X = np.vstack([_unit(cat + noise[:3]), _unit(dog + noise[3:]), _random(tiny, 4, 2)]).astype(np.float32)
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    head = _head(tiny, tmp_path, m=1).fit(X, y)
    ears, tail = head.pool_.index("pointed ears"), head.pool_.index("a long tail")
    assert head.S_[ears, 0] > head.S_[ears, 1] and abs(head.S_[tail, 0] - head.S_[tail, 1]) < 1e-2
    assert head.select(0, (0, 1)).tolist() == [ears]
    two = head.set_params(m=2).select(0, (0, 1))
    assert two[0] == ears  # the separating description ranks first
    assert ears not in head.select(1, (0, 1))  # it favours cat, so it never describes dog against cat


def test_predictions_only_change_inside_the_top_k(tiny, tmp_path):
    Xs, ys = _random(tiny, 40, 3), np.arange(40) % 4
    X = _random(tiny, 50, 4)
    head = _head(tiny, tmp_path, k=2, cls_weight=0.0).fit(Xs, ys)
    zeroshot = create_head("zeroshot", backbone=tiny, class_names=CLASSES, templates=["a photo of a {c}."],
                           cache_dir=tmp_path).fit()
    top = head.neighbourhoods(X)
    np.testing.assert_array_equal(top, np.argsort(-zeroshot.logits(X), axis=1, kind="stable")[:, :2])
    pred = head.predict(X)
    assert all(p in row for p, row in zip(pred, top))
    assert (pred != zeroshot.predict(X)).any()  # the descriptions do change some predictions
    logits, zs = head.logits(X), zeroshot.logits(X)
    for i, row in enumerate(top):
        outside = np.setdiff1d(np.arange(4), row)
        assert logits[i, outside].max() <= logits[i, row].min() + 1e-4
        np.testing.assert_allclose(logits[i, outside] - logits[i, outside[0]], zs[i, outside] - zs[i, outside[0]],
                                   atol=1e-3)
    # one row by hand: (w * cos(x, t_c) + mean over the selected descriptions) / (w + 1), w = 0 here
    i, c = 0, top[0][0]
    picked = head.select(c, tuple(sorted(top[0])))
    expected = head.logit_scale_ * (X[0] @ head.pool_embeddings_[picked].T).mean()
    assert logits[i, c] == pytest.approx(expected, rel=1e-4)


def test_fit_uses_only_the_selection_set(tiny, tmp_path):
    Xs, ys = _random(tiny, 24, 5), np.arange(24) % 4
    head = _head(tiny, tmp_path).fit(Xs, ys)
    S = head.S_.copy()
    choices = {c: head.select(c, (0, 1, 2)).tolist() for c in range(3)}
    test_a, test_b = _random(tiny, 10, 6), _random(tiny, 10, 6)
    test_b[5:] = _random(tiny, 5, 7)  # other test rows
    la, lb = head.logits(test_a), head.logits(test_b)
    np.testing.assert_array_equal(la[:5], lb[:5])  # a row's scores do not depend on the other test rows
    np.testing.assert_array_equal(head.S_, S)
    assert choices == {c: head.select(c, (0, 1, 2)).tolist() for c in range(3)}
    refit = _head(tiny, tmp_path).fit(Xs[:12], ys[:12])
    assert not np.allclose(refit.S_, S)  # what it is given is what it uses
    with pytest.raises(LabelError):
        _head(tiny, tmp_path).fit(Xs, ys + 1)


def test_no_descriptions_is_the_zero_shot_classifier(tiny, tmp_path):
    X, Xs, ys = _random(tiny, 20, 8), _random(tiny, 8, 9), np.arange(8) % 4
    head = _head(tiny, tmp_path, descriptions=None).fit(Xs, ys)
    zeroshot = create_head("zeroshot", backbone=tiny, class_names=CLASSES, templates=["a photo of a {c}."],
                           cache_dir=tmp_path).fit()
    assert head.pool_ == []
    np.testing.assert_allclose(head.logits(X), zeroshot.logits(X), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(head.predict(X), zeroshot.predict(X))


def test_a_class_without_selection_images_falls_back_to_its_own_descriptions(tiny, tmp_path):
    Xs, ys = _random(tiny, 9, 10), np.array([0, 1, 2] * 3)  # no fish in the selection set
    head = _head(tiny, tmp_path, m=1).fit(Xs, ys)
    assert head.select(3, (0, 3)).tolist() == [head.pool_.index("fins")]
    assert np.isnan(head.S_[:, 3]).all() and len(head.select(0, (0, 3))) == 1


@pytest.mark.parametrize("k", [1, 2])
def test_an_outside_class_tied_with_the_neighbourhood_stays_a_margin_below(tiny, tmp_path, k):
    head = _head(tiny, tmp_path, k=k).fit(_random(tiny, 16, 10), np.arange(16) % 4)
    head.text_weights_ = np.eye(tiny.embed_dim, 4, dtype=np.float32)  # zero-shot scores = X's first 4 coordinates
    X = np.zeros((1, tiny.embed_dim), np.float32)
    X[0, :4] = [0.6, 0.3, 0.1, 0.3] if k == 2 else [0.6, 0.1, 0.05, 0.6]
    X[0, 4] = np.sqrt(1 - (X[0, :4] ** 2).sum())
    zs = X @ head.text_weights_
    assert zs[0, 3] == zs[0, k - 1] and head.neighbourhoods(X)[0].tolist() == list(range(k))  # fish ties, is out
    logits = head.logits(X)[0]
    # the tied outside class sits at least the margin below the weakest neighbour (it used to be level with it)
    assert logits[3] <= logits[:k].min() - 0.99 * head.margin * head.logit_scale_
    outside = [c for c in range(4) if c >= k]
    np.testing.assert_allclose(np.diff(logits[outside]), head.logit_scale_ * np.diff(zs[0, outside]), atol=1e-4)
    assert head.predict(X)[0] in range(k)
    wide = head.set_params(margin=0.5).logits(X)[0]
    assert wide[3] <= wide[:k].min() - 0.499 * head.logit_scale_
