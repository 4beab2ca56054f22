"""AMUTuning against the authors' formulas recomputed in NumPy and their training loop re-implemented in torch."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import softmax
from scipy.stats import kurtosis

from cliplab.errors import CliplabError, DimensionMismatchError, FeatureError
from cliplab.heads import ZeroShotClassifier, create_head, get_head
from cliplab.heads.amu import ALPHAS, AMUTuning
from cliplab.heads.registry import head_entry
from cliplab.heads.saving import load_head, save_head

NAMES = ["cat", "dog", "car", "ship", "tree"]
TEMPLATES = ["a photo of a {c}."]
D_AUX = 32


def _unit(a):
    a = np.asarray(a, dtype=np.float64)
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def _concat(clip, aux):
    return np.concatenate([_unit(clip), _unit(aux)], axis=-1).astype(np.float32)


def _text(tiny, tmp_path):
    return ZeroShotClassifier(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).fit().weights_.astype(np.float64)


def _orthogonal(a, text):
    """Unit rows orthogonal to the text weights (zero-shot logits 0)."""
    basis, _ = np.linalg.qr(text)
    return _unit(a - (a @ basis) @ basis.T)


def _task(tiny, tmp_path, per_class=8, noise=1.0, seed=0, n_classes=5):
    """CLIP block carrying no class signal (orthogonal to the text weights, plus a little noise along them);
    the auxiliary block is a noisy class centre."""
    rng = np.random.default_rng(seed)
    text = _text(tiny, tmp_path)
    y = np.repeat(np.arange(n_classes), per_class)
    clip = _orthogonal(rng.normal(size=(len(y), tiny.embed_dim)), text) + 0.002 * rng.normal(size=(len(y),
                                                                                             tiny.embed_dim))
    centres = np.random.default_rng(100).normal(size=(len(NAMES), D_AUX))
    aux = centres[y] + noise * rng.normal(size=(len(y), D_AUX))
    return _concat(clip, aux), y


def _head(tiny, tmp_path, **params):
    return AMUTuning(tiny, NAMES, TEMPLATES, cache_dir=tmp_path, **params)


def _expected_logits(X, text, weights, alpha, uncertainty, d, power=0.4, scale=100.0):
    """The code's forward (clip/amu.py) in NumPy: z-score with ddof=1, kurtosis factor from scipy."""
    clip, aux = _unit(X[:, :d]).astype(np.float64), _unit(X[:, d:]).astype(np.float64)
    clip_logits = scale * clip @ text
    raw = aux @ weights.astype(np.float64).T
    z = (raw - raw.mean(1, keepdims=True)) / raw.std(1, ddof=1, keepdims=True)
    factor = 1.0
    if uncertainty == "moment":
        p = softmax(clip_logits, axis=1)
        n_classes = p.shape[1]
        # mean(z^4) with the unbiased std = the biased (Pearson) kurtosis x ((C - 1) / C)^2
        kappa = kurtosis(p, axis=1, fisher=False, bias=True) * ((n_classes - 1) / n_classes) ** 2
        factor = (kappa[:, None] / 250.0) ** -power
    return clip_logits + factor * z * alpha


def _expected_loss(X, y, text, weights, alpha, lam, d):
    clip_logits = 100.0 * _unit(X[:, :d]).astype(np.float64) @ text
    raw = _unit(X[:, d:]).astype(np.float64) @ weights.astype(np.float64).T
    z = (raw - raw.mean(1, keepdims=True)) / raw.std(1, ddof=1, keepdims=True)
    rows = np.arange(len(y))

    def ce(logits):
        return -np.mean(np.log(softmax(logits, axis=1))[rows, y])

    return lam * ce(clip_logits + z * alpha) + (1 - lam) * ce(z)


# ---------------------------------------------------------------- the authors' code, re-implemented in torch

def _logit_normalize(logit):  # clip/amu.py
    return (logit - torch.mean(logit, dim=1, keepdim=True)) / torch.std(logit, dim=1, keepdim=True)


def _uncertainty(logits, kind, power):  # clip/amu.py, the two types offered
    logits = torch.softmax(logits, dim=-1)
    if kind == "moment":
        mu, sigma = torch.mean(logits, dim=-1, keepdim=True), torch.std(logits, dim=-1, keepdim=True)
        moment_4 = torch.mean(((logits - mu) / sigma) ** 4, dim=-1, keepdim=True)
        return 1 / ((moment_4 / 250) ** power)
    return torch.tensor(1.0)


def _authors_training(X, y, text, d, views=None, alpha=0.5, lam=0.35, epochs=3, lr=1e-3, batch=8,
                      uncertainty="none", power=0.4, seed=1):
    """train.py's loop on features: Linear_Adapter initialised from the (normalised, view-averaged) aux features,
    AdamW(wd 0.01, eps 1e-4) + CosineAnnealingLR stepped per batch, randperm shuffling from a seeded generator."""
    samples = torch.from_numpy(np.asarray(views if views is not None else X[None], dtype=np.float32))
    n_classes = text.shape[1]
    aux = F.normalize(samples[:, :, d:], dim=-1).mean(0)
    aux = aux / aux.norm(dim=-1, keepdim=True)
    init = torch.zeros(aux.shape[1], n_classes)
    for i in range(len(y)):
        init[:, y[i]] += aux[i]
    init = init / (len(y) / n_classes)
    fc = torch.nn.Linear(aux.shape[1], n_classes, bias=False)
    fc.weight = torch.nn.Parameter(init.t())
    optimizer = torch.optim.AdamW(fc.parameters(), weight_decay=0.01, lr=lr, eps=1e-4)
    n = len(y)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * math.ceil(n / batch))
    generator = torch.Generator().manual_seed(seed)
    clip_weights = torch.from_numpy(text.astype(np.float32))
    targets = torch.from_numpy(y)
    for epoch in range(epochs):
        view = samples[epoch % len(samples)]
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            rows = order[start:start + batch]
            clip_features, aux_features = view[rows, :d].clone(), view[rows, d:].clone()
            clip_features /= clip_features.norm(dim=-1, keepdim=True)
            aux_features /= aux_features.norm(dim=-1, keepdim=True)
            clip_logits = 100. * clip_features @ clip_weights
            aux_logits = _logit_normalize(fc(aux_features))
            factor = _uncertainty(clip_logits.float(), uncertainty, power)
            logits = clip_logits + factor * aux_logits * alpha
            loss = lam * F.cross_entropy(logits, targets[rows]) + (1 - lam) * F.cross_entropy(aux_logits,
                                                                                               targets[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return fc.weight.detach().numpy()


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("uncertainty", ["none", "moment"])
def test_logits_equal_the_formula_recomputed_in_numpy(tiny, tmp_path, uncertainty):
    X, y = _task(tiny, tmp_path)
    head = _head(tiny, tmp_path, epochs=3, uncertainty=uncertainty, alpha=0.7).fit(X, y)
    d = tiny.embed_dim
    text = _text(tiny, tmp_path)
    np.testing.assert_allclose(head.text_weights_, text, atol=1e-6)
    rng = np.random.default_rng(5)
    # test rows whose CLIP block leans more or less on a text weight, so that the moment factor varies
    Xt = _concat(_orthogonal(rng.normal(size=(30, d)), text) + rng.uniform(0, 0.1, (30, 1)) * text.T[rng.integers(
        0, 5, 30)], rng.normal(size=(30, D_AUX)))
    expected = _expected_logits(Xt, text, head.aux_weights_, 0.7, uncertainty, d)
    np.testing.assert_allclose(head.logits(Xt), expected, rtol=1e-5, atol=1e-4)
    if uncertainty == "moment":
        factors = (expected - 100 * Xt[:, :d] @ text) / (0.7 * head.aux_logits(Xt))
        assert np.ptp(np.median(factors, axis=1)) > 0.1  # the factor really differs between rows
    # the code's forward normalises each block: scaling the blocks of a row changes nothing
    scaled = np.concatenate([3.0 * Xt[:, :d], 0.25 * Xt[:, d:]], axis=1)
    np.testing.assert_allclose(head.logits(scaled), head.logits(Xt), rtol=1e-5, atol=1e-4)
    assert (head.predict(Xt) == expected.argmax(1)).all()
    np.testing.assert_allclose(head.predict_proba(Xt), softmax(expected, axis=1), atol=1e-5)


def test_alpha_zero_is_zero_shot_on_the_clip_block(tiny, tmp_path):
    X, y = _task(tiny, tmp_path)
    head = _head(tiny, tmp_path, alpha=0.0, epochs=2).fit(X, y)
    zeroshot = ZeroShotClassifier(tiny, NAMES, TEMPLATES, logit_scale=100.0, cache_dir=tmp_path).fit()
    Xt, _ = _task(tiny, tmp_path, seed=3)
    Xt[:, :tiny.embed_dim] = _unit(np.random.default_rng(4).normal(size=(len(Xt), tiny.embed_dim)))
    np.testing.assert_allclose(head.logits(Xt), zeroshot.logits(Xt[:, :tiny.embed_dim]), rtol=1e-5, atol=1e-4)


def test_initial_weights_are_class_means_of_the_aux_features(tiny, tmp_path):
    X, y = _task(tiny, tmp_path)
    d = tiny.embed_dim
    head = _head(tiny, tmp_path, epochs=0).fit(X, y)
    means = np.stack([_unit(X[y == c, d:]).mean(0) for c in range(5)])
    np.testing.assert_allclose(head.initial_weights_, means, atol=1e-6)
    np.testing.assert_array_equal(head.aux_weights_, head.initial_weights_)
    assert head.training_loss_ == [] and head.fit_summary()["epochs"] == 0
    # views: the normalised mean over the views of each item's aux block (utils.load_aux_weight), then class means
    rng = np.random.default_rng(1)
    views = np.stack([_concat(X[:, :d] + 0.1 * rng.normal(size=(len(X), d)),
                              X[:, d:] + 0.3 * rng.normal(size=(len(X), D_AUX))) for _ in range(3)])
    item = _unit(views[:, :, d:].astype(np.float64).mean(0))
    with_views = _head(tiny, tmp_path, epochs=0).fit(X, y, views=views)
    np.testing.assert_allclose(with_views.initial_weights_, np.stack([item[y == c].mean(0) for c in range(5)]),
                               atol=1e-6)
    # unbalanced classes divide by their own counts; a class without shots starts from zero
    keep = np.r_[0:8, 8:11, 16:32]
    partial = _head(tiny, tmp_path, epochs=0).fit(X[keep], y[keep])
    expected = [_unit(X[keep][y[keep] == c, d:]).mean(0) for c in range(4)] + [np.zeros(D_AUX)]
    np.testing.assert_allclose(partial.initial_weights_, np.stack(expected), atol=1e-6)
    assert partial.logits(X).shape == (len(X), 5) and list(partial.classes_) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("uncertainty", ["none", "moment"])
def test_training_equals_the_authors_loop(tiny, tmp_path, uncertainty):
    """Views cycled per epoch, a last short batch, both fusion types: the same weights as train.py's loop."""
    X, y = _task(tiny, tmp_path, noise=2.0)
    d, text = tiny.embed_dim, _text(tiny, tmp_path)
    rng = np.random.default_rng(2)
    views = np.stack([_concat(X[:, :d] + 0.2 * rng.normal(size=(len(X), d)),
                              X[:, d:] + 0.2 * rng.normal(size=(len(X), D_AUX))) for _ in range(2)])
    # CLIP blocks leaning on the text weights: confident rows, so the moment factor is far from constant
    views[:, :, :d] = _unit(views[:, :, :d] + 0.5 * text.T[rng.integers(0, 5, len(X))])
    params = dict(epochs=3, batch_size=6, alpha=0.8, lambda_merge=0.35, lr=5e-3, uncertainty=uncertainty,
                  random_state=7)
    head = _head(tiny, tmp_path, **params).fit(X, y, views=views)
    reference = _authors_training(X, y, text, d, views=views, epochs=3, batch=6, alpha=0.8, lam=0.35, lr=5e-3,
                                  uncertainty=uncertainty, seed=7)
    assert np.abs(reference - head.initial_weights_).max() > 1e-3  # it really moved
    np.testing.assert_allclose(head.aux_weights_, reference, atol=2e-5)
    assert head.batch_size_ == 6 and len(head.training_loss_) == 3


def test_training_reduces_the_loss_and_beats_zero_shot(tiny, tmp_path):
    d, text = tiny.embed_dim, _text(tiny, tmp_path)
    X, y = _task(tiny, tmp_path, noise=2.5)  # hard enough that the class-mean start is not already optimal
    head = _head(tiny, tmp_path, lr=1e-2).fit(X, y)
    before = _expected_loss(X, y, text, head.initial_weights_, 0.5, 0.35, d)
    after = _expected_loss(X, y, text, head.aux_weights_, 0.5, 0.35, d)
    assert after < 0.8 * before
    assert head.training_loss_[-1] < head.training_loss_[0]
    # only the aux block carries the classes: zero-shot on the CLIP block is at chance, AMU is not
    X, y = _task(tiny, tmp_path, noise=1.0)
    head = _head(tiny, tmp_path).fit(X, y)
    Xt, yt = _task(tiny, tmp_path, per_class=40, noise=1.0, seed=9)
    zeroshot = ZeroShotClassifier(tiny, NAMES, TEMPLATES, logit_scale=100.0, cache_dir=tmp_path).fit()
    assert zeroshot.score(Xt[:, :d], yt) < 0.4 and head.score(Xt, yt) > 0.85


def test_same_seed_same_weights_and_threads_restored(tiny, tmp_path):
    X, y = _task(tiny, tmp_path, noise=2.0)
    threads = torch.get_num_threads()
    a = _head(tiny, tmp_path, epochs=4, random_state=3).fit(X, y)
    assert torch.get_num_threads() == threads
    b = _head(tiny, tmp_path, epochs=4, random_state=3).fit(X, y)
    c = _head(tiny, tmp_path, epochs=4, random_state=4).fit(X, y)
    np.testing.assert_array_equal(a.aux_weights_, b.aux_weights_)
    assert a.training_loss_ == b.training_loss_
    assert not np.array_equal(a.aux_weights_, c.aux_weights_)


def test_features_without_an_aux_block_are_a_clear_error(tiny, tmp_path):
    X, y = _task(tiny, tmp_path)
    with pytest.raises(DimensionMismatchError, match="no auxiliary block") as info:
        _head(tiny, tmp_path, aux_model="ViT-S-32").fit(X[:, :tiny.embed_dim], y)
    assert "\n" not in str(info.value) and "ViT-S-32" in str(info.value)
    head = _head(tiny, tmp_path, epochs=1).fit(X, y)
    with pytest.raises(DimensionMismatchError):
        head.predict(X[:, :tiny.embed_dim])


def test_alpha_is_searched_on_validation_only(tiny, tmp_path):
    X, y = _task(tiny, tmp_path)
    d, text = tiny.embed_dim, _text(tiny, tmp_path)
    rng = np.random.default_rng(11)
    n = 200
    # validation rows where the CLIP logits (differences of a few units) and the aux branch disagree
    clip = _unit(rng.normal(size=(n, d))) * 0.2 + 0.03 * text.T[rng.integers(0, 5, n)]
    Xv = _concat(clip, np.random.default_rng(100).normal(size=(5, D_AUX))[rng.integers(0, 5, n)]
                 + 0.8 * rng.normal(size=(n, D_AUX)))
    head = _head(tiny, tmp_path, epochs=0)
    unsearched = head.fit(X, y)
    assert unsearched.fit_summary() == {"alpha": 0.5, "uncertainty": "none", "epochs": 0, "searched": False,
                                        "batch_size": 8}
    weights = unsearched.aux_weights_
    clip_labels = (100 * _unit(Xv[:, :d]) @ text).argmax(1)
    aux_labels = (_unit(Xv[:, d:]) @ weights.T).argmax(1)
    assert np.mean(clip_labels != aux_labels) > 0.5

    def chosen(y_val):  # the search recomputed: first best in the order alpha, then ALPHAS
        candidates = [0.5] + [a for a in ALPHAS if a != 0.5]
        accs = [np.mean(_expected_logits(Xv, text, weights, a, "none", d).argmax(1) == y_val) for a in candidates]
        return candidates[int(np.argmax(accs))]

    by_clip = _head(tiny, tmp_path, epochs=0).fit(X, y, Xv, clip_labels)
    by_aux = _head(tiny, tmp_path, epochs=0).fit(X, y, Xv, aux_labels)
    assert by_clip.alpha_ == chosen(clip_labels) == 0.1 and by_aux.alpha_ == chosen(aux_labels) == 2.0
    assert by_clip.fit_summary()["searched"] and by_aux.fit_summary()["alpha"] == 2.0
    np.testing.assert_allclose(by_aux.logits(Xv), _expected_logits(Xv, text, weights, 2.0, "none", d),
                               rtol=1e-5, atol=1e-4)
    # the same validation set in another order chooses the same alpha; the weights never depend on validation
    order = rng.permutation(n)
    shuffled = _head(tiny, tmp_path, epochs=0).fit(X, y, Xv[order], aux_labels[order])
    assert shuffled.alpha_ == by_aux.alpha_
    np.testing.assert_array_equal(by_clip.aux_weights_, by_aux.aux_weights_)


def test_large_training_sets_use_larger_batches(tiny, tmp_path):
    X, y = _task(tiny, tmp_path, per_class=401, noise=2.0)  # 2005 items > 250 batches of 8
    head = _head(tiny, tmp_path, epochs=1).fit(X, y)
    assert head.batch_size_ == math.ceil(2005 / 250) == 9 and head.fit_summary()["batch_size"] == 9
    small = _head(tiny, tmp_path, epochs=1).fit(X[:2000], y[:2000])
    assert small.batch_size_ == 8


def test_bad_hyperparameters_and_views(tiny, tmp_path):
    X, y = _task(tiny, tmp_path)
    with pytest.raises(CliplabError, match="uncertainty must be one of none, moment"):
        _head(tiny, tmp_path, uncertainty="entropy").fit(X, y)
    with pytest.raises(CliplabError, match="epochs"):
        _head(tiny, tmp_path, epochs=-1).fit(X, y)
    with pytest.raises(FeatureError, match="views must have shape"):
        _head(tiny, tmp_path, epochs=1).fit(X, y, views=X[None, :, :-1])


def test_registered_saved_and_loaded(tiny, tmp_path):
    entry = head_entry("amu")
    assert get_head("amu") is AMUTuning and entry.paper == 4 and entry.family == "fewshot" and entry.needs_train
    X, y = _task(tiny, tmp_path)
    head = create_head("amu", backbone=tiny, class_names=NAMES, templates=TEMPLATES, cache_dir=tmp_path,
                       aux_model="vit_small_patch16_224.dino", epochs=2, uncertainty="moment").fit(X, y)
    assert head.get_params()["aux_model"] == "vit_small_patch16_224.dino"
    save_head(head, tmp_path / "amu")
    loaded = load_head(tmp_path / "amu", backbone=tiny)
    np.testing.assert_array_equal(loaded.logits(X), head.logits(X))
