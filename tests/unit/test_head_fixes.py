"""Two heads made honest: PerceptionCLIP checks labels against its C classes (not its C x Z prompt groups), and
CapS-Adapter has a per-image mode whose logits for a row do not depend on the other rows scored with it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import rel_entr, softmax

from cliplab.errors import CliplabError, LabelError
from cliplab.eval.inputs import for_single_images
from cliplab.features import class_weights
from cliplab.heads import create_head, head_entry
from cliplab.heads.saving import load_head, save_head

NAMES = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {c}."]


def _unit(a):
    a = np.asarray(a, np.float64)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _draw(d, n, seed):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(7).normal(size=(len(NAMES), d))
    y = np.repeat(np.arange(len(NAMES)), n)
    return _unit(centers[y] + 1.2 * rng.normal(size=(len(y), d))), y


def test_perceptionclip_refuses_a_label_outside_its_classes(tiny, tmp_path):
    attributes = {"background": ["", "on a table", "in water"]}  # Z = 3 contexts: 9 prompt groups
    head = create_head("perceptionclip", backbone=tiny, class_names=NAMES, attributes=attributes, cache_dir=tmp_path)
    X = _unit(np.random.default_rng(0).normal(size=(4, tiny.embed_dim)))
    head.fit(X, np.array([0, 1, 2, 2]))  # class indices: fine
    assert head.weights_.shape == (tiny.embed_dim, 9) and list(head.classes_) == [0, 1, 2]
    for bad in ([0, 1, 2, 3], [0, 1, 8, 2], [-1, 0, 1, 2]):  # 3 and 8 index a prompt group, not a class
        with pytest.raises(LabelError, match=r"0\.\.2"):
            head.fit(X, np.array(bad))


def _caps(tiny, tmp_path, **params):
    return create_head("caps-adapter", backbone=tiny, class_names=NAMES, templates=TEMPLATES, cache_dir=tmp_path,
                       **params)


def test_caps_adapter_per_image_mode_scores_each_row_alone(tiny, tmp_path):
    d = tiny.embed_dim
    X, y = _draw(d, 6, 0)
    Xv, yv = _draw(d, 3, 1)
    Xt, _ = _draw(d, 10, 2)
    captions = _unit(X + 0.3 * np.random.default_rng(3).normal(size=X.shape))
    batch = _caps(tiny, tmp_path, gamma=2.0).fit(X, y, Xv, yv, caption_features=captions)
    assert batch.scaling == "batch" and head_entry("caps-adapter").per_image == {"scaling": "fit"}
    single = for_single_images(batch)
    assert single is batch and batch.scaling == "fit"
    alone = np.vstack([single.logits(Xt[i:i + 1]) for i in range(len(Xt))])
    np.testing.assert_allclose(single.logits(Xt), alone, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(single.logits(Xt[:3]), alone[:3], rtol=1e-5, atol=1e-4)

    # the fixed rescaling is the min-max of KL into the range of N over the validation rows (the code's scale_)
    W = class_weights(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).astype(np.float64)
    keys, caps = batch.keys_.astype(np.float64), batch.caption_keys_.astype(np.float64)
    delta, L = batch.delta_, np.eye(len(NAMES))[batch.support_labels_]

    def kl(F):
        p, q = softmax(F.astype(np.float64) / 0.5, axis=1), softmax(keys / 0.5, axis=1)
        return rel_entr(p[:, None, :], q[None, :, :]).sum(axis=2)

    def knowledge(F):
        return (1 - delta) * F.astype(np.float64) @ keys.T + delta * F.astype(np.float64) @ caps.T

    kv, nv = kl(Xv), knowledge(Xv)
    a = (nv.max() - nv.min()) / (kv.max() - kv.min())
    b = nv.min() - kv.min() * a
    assert batch.kl_scale_ == pytest.approx([a, b], rel=1e-5)
    assert batch.logit_scale_ == pytest.approx(float(tiny.logit_scale))  # the model's own, not the code's 100
    f = Xt.astype(np.float64)
    expected = batch.logit_scale_ * f @ W - batch.gamma_ * (a * kl(Xt) + b) @ L \
        + batch.alpha_ * np.exp(-batch.beta_ * (1 - knowledge(Xt))) @ L
    np.testing.assert_allclose(alone, expected, rtol=1e-4, atol=1e-3)

    # the authors' batch mode is kept for evaluation: it rescales over the rows given, so it differs row by row,
    # and on the validation rows themselves both modes agree
    batch.set_params(scaling="batch")
    together = batch.logits(Xt)
    by_one = np.vstack([batch.logits(Xt[i:i + 1]) for i in range(len(Xt))])
    assert not np.allclose(together, by_one, atol=1e-3)
    np.testing.assert_allclose(batch.logits(Xv), batch.set_params(scaling="fit").logits(Xv), rtol=1e-5, atol=1e-4)


def test_caps_adapter_modes_survive_saving_and_are_checked(tiny, tmp_path):
    X, y = _draw(tiny.embed_dim, 4, 0)
    Xt, _ = _draw(tiny.embed_dim, 2, 5)
    head = _caps(tiny, tmp_path, scaling="fit").fit(X, y)  # no validation part: the range of the training rows
    loaded = load_head(save_head(head, tmp_path / "saved"), backbone=tiny)
    np.testing.assert_allclose(loaded.logits(Xt), head.logits(Xt), rtol=1e-6)
    assert loaded.get_params()["scaling"] == "fit"
    with pytest.raises(CliplabError, match="scaling must be one of batch, fit"):
        _caps(tiny, tmp_path, scaling="rows").fit(X, y)
