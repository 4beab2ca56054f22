"""PerceptionCLIP (paper 21): context inference and context-conditioned classification against written-out formulas."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import log_softmax

from cliplab.errors import TemplateError
from cliplab.features.text import embed_texts
from cliplab.heads import create_head
from cliplab.heads.perceptionclip import context_prompt, default_attributes, load_attributes

NAMES = ["cat", "dog", "ship"]
ATTRS = {"background": ["", "on grass", "in the water"], "illumination": ["", "dark"]}


def _features(tiny, n=10, seed=0):
    X = np.random.default_rng(seed).normal(size=(n, tiny.embed_dim)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def _head(tiny, tmp_path, **params):
    return create_head("perceptionclip", backbone=tiny, class_names=NAMES, cache_dir=tmp_path / "cache",
                       **params).fit()


def _context_logits(tiny, tmp_path, X, scale):
    """f(y, z; x) (n, C, Z) written out: z runs over background x illumination, background-major."""
    contexts = [(b, i) for b in ATTRS["background"] for i in ATTRS["illumination"]]
    F = np.empty((len(X), len(NAMES), len(contexts)))
    for y, name in enumerate(NAMES):
        for z, (b, i) in enumerate(contexts):
            text = "a photo of a " + name + "".join(f", {t}" for t in (b, i) if t) + "."
            F[:, y, z] = scale * X.astype(np.float64) @ embed_texts(tiny, [text], tmp_path / "cache")[0]
    return F


def test_prompts_follow_compose_template():
    assert context_prompt("a photo of a {c}.", "cat", ["on grass", "", "dark"]) == "a photo of a cat, on grass, dark."
    assert context_prompt("a photo of a {c}", "cat", ["upside-down"]) == "a photo of a cat, upside-down"
    assert context_prompt("a photo of a {c}.", "cat", ["", ""]) == "a photo of a cat."


@pytest.mark.parametrize("variant", ["weighted", "argmax"])
def test_one_empty_value_is_the_template_classifier(tiny, tmp_path, variant):
    X = _features(tiny)
    zs = create_head("zeroshot", backbone=tiny, class_names=NAMES, templates=["a photo of a {c}."],
                     cache_dir=tmp_path / "cache").fit()
    head = _head(tiny, tmp_path, attributes={"background": [""]}, variant=variant, temperature=3.0)
    np.testing.assert_allclose(head.predict_proba(X), zs.predict_proba(X), rtol=1e-5, atol=1e-7)
    expected = zs.logits(X) if variant == "argmax" else log_softmax(zs.logits(X).astype(np.float64), axis=1)
    np.testing.assert_allclose(head.logits(X), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(head.predict(X), zs.predict(X))


def test_context_inference_is_the_marginal_over_classes(tiny, tmp_path):
    X = _features(tiny)
    T = 2.0
    head = _head(tiny, tmp_path, attributes=ATTRS, temperature=T)
    F = _context_logits(tiny, tmp_path, X, head.logit_scale_)
    unnorm = np.exp(F / T).sum(axis=1)  # sum_y exp(f(y,z;x)/T), (n, Z)
    expected = unnorm / unnorm.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(head.infer_contexts(X), expected, rtol=1e-5, atol=1e-8)
    assert head.contexts_[1] == ["", "dark"] and head.n_contexts_ == 6
    marginals = head.attribute_probabilities(X)
    np.testing.assert_allclose(marginals["background"][:, 1], expected[:, 2] + expected[:, 3], rtol=1e-5)
    np.testing.assert_allclose(marginals["illumination"][:, 1], expected[:, 1::2].sum(axis=1), rtol=1e-5)


def test_weighted_and_argmax_variants_equal_their_formulas(tiny, tmp_path):
    X = _features(tiny, seed=1)
    T = 1.0
    weighted = _head(tiny, tmp_path, attributes=ATTRS, temperature=T)
    F = _context_logits(tiny, tmp_path, X, weighted.logit_scale_)
    p_z = np.exp(F / T).sum(axis=1)
    p_z /= p_z.sum(axis=1, keepdims=True)
    p_y = np.zeros((len(X), len(NAMES)))
    for n in range(len(X)):
        for z in range(F.shape[2]):
            p_y_given_z = np.exp(F[n, :, z]) / np.exp(F[n, :, z]).sum()
            p_y[n] += p_z[n, z] * p_y_given_z
    np.testing.assert_allclose(weighted.predict_proba(X), p_y, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(weighted.logits(X), np.log(p_y), rtol=1e-5, atol=1e-5)
    hard = _head(tiny, tmp_path, attributes=ATTRS, temperature=T, variant="argmax")
    best = p_z.argmax(axis=1)
    np.testing.assert_allclose(hard.logits(X), F[np.arange(len(X)), :, best], rtol=1e-5, atol=1e-5)


def test_attribute_files_and_the_builtin_set(tiny, tmp_path):
    path = tmp_path / "attrs.json"
    path.write_text(json.dumps({"attributes": {"quality": ["", ["blurry", "out of focus"]]}}))
    assert load_attributes(path) == {"quality": [[""], ["blurry", "out of focus"]]}
    head = _head(tiny, tmp_path, attributes=str(path))
    assert head.prompts_per_class_ == [1, 2] * 3  # the synonyms of one value are averaged
    builtin = default_attributes()
    assert {"orientation", "background", "illumination", "quality"} <= set(builtin)
    assert all(values[0] == "" for values in builtin.values())
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TemplateError, match="bad.json"):
        load_attributes(bad)
    with pytest.raises(TemplateError, match="non-empty list"):
        load_attributes({"background": []})
    with pytest.raises(TemplateError, match="variant"):
        _head(tiny, tmp_path, attributes=ATTRS, variant="soft")
