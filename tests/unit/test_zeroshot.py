"""ZeroShotClassifier against the closed form of CLIP's prompt ensembling; the text API below it."""

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV

from cliplab.errors import DimensionMismatchError, FeatureError, LabelError
from cliplab.features import class_weights, embed_prompts, ensemble
from cliplab.heads import ZeroShotClassifier, create_head, get_head

NAMES = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}.", "{c}"]


def _prompt_embeddings(backbone, prompts_per_class):
    out = []
    for prompts in prompts_per_class:
        emb = backbone.encode_texts(prompts).numpy().astype(np.float64)
        out.append(emb / np.linalg.norm(emb, axis=1, keepdims=True))
    return out


def _expected_weights(backbone, renormalize=True):
    means = [e.mean(axis=0) for e in _prompt_embeddings(backbone, [[t.replace("{c}", n) for t in TEMPLATES]
                                                                   for n in NAMES])]
    if renormalize:
        means = [m / np.linalg.norm(m) for m in means]
    return np.stack(means, axis=1)


def _unit_rows(n, d, seed=0):
    X = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_weights_logits_and_probabilities_match_closed_form(tiny, tmp_path):
    head = ZeroShotClassifier(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).fit()
    weights = _expected_weights(tiny)
    np.testing.assert_allclose(head.weights_, weights, atol=1e-5)
    X = _unit_rows(6, tiny.embed_dim)
    logits = tiny.logit_scale * X @ weights
    np.testing.assert_allclose(head.decision_function(X), logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head.predict_proba(X), softmax(logits, axis=1), atol=1e-5)
    assert (head.predict(X) == logits.argmax(1)).all()


def test_without_renormalisation_logits_are_mean_prompt_similarities(tiny, tmp_path):
    head = ZeroShotClassifier(tiny, NAMES, TEMPLATES, logit_scale=1.0, renormalize=False, cache_dir=tmp_path).fit()
    X = _unit_rows(5, tiny.embed_dim, seed=3)
    per_prompt = _prompt_embeddings(tiny, [[t.replace("{c}", n) for t in TEMPLATES] for n in NAMES])
    mean_similarity = np.stack([(X @ e.T).mean(axis=1) for e in per_prompt], axis=1)  # DCLIP's score average
    np.testing.assert_allclose(head.decision_function(X), mean_similarity, atol=1e-5)
    assert not np.allclose(head.weights_, _expected_weights(tiny), atol=1e-3)  # really not renormalised


def test_class_to_prompts_mapping_gives_each_class_its_own_prompts(tiny, tmp_path):
    mapping = {"cat": ["a fluffy cat", "a cat on a sofa"], "dog": ["a dog barking"], "car": ["a red car", "a car",
                                                                                           "a parked car"]}
    head = ZeroShotClassifier(tiny, NAMES, mapping, cache_dir=tmp_path).fit()
    expected = [e.mean(axis=0) for e in _prompt_embeddings(tiny, [mapping[n] for n in NAMES])]
    expected = np.stack([m / np.linalg.norm(m) for m in expected], axis=1)
    np.testing.assert_allclose(head.weights_, expected, atol=1e-5)
    assert head.prompts_per_class_ == [2, 1, 3]
    with pytest.raises(LabelError, match="'dog'"):
        ZeroShotClassifier(tiny, NAMES, {"cat": ["x"], "car": ["y"]}, cache_dir=tmp_path).fit()


def test_text_api_below_the_heads(tiny, tmp_path):
    per_class = embed_prompts(tiny, [["a cat", "the cat"], ["a dog"]], tmp_path)
    assert [e.shape for e in per_class] == [(2, tiny.embed_dim), (1, tiny.embed_dim)]
    np.testing.assert_allclose(per_class[0], tiny.encode_texts(["a cat", "the cat"]).numpy(), atol=1e-6)
    plain = ensemble(per_class, renormalize=False)
    np.testing.assert_allclose(plain[:, 0], per_class[0].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ensemble(per_class), axis=0), 1.0, atol=1e-6)
    np.testing.assert_allclose(class_weights(tiny, NAMES, TEMPLATES, cache_dir=tmp_path), _expected_weights(tiny),
                               atol=1e-5)


def test_logit_scale_override_and_top_k(tiny, tmp_path):
    head = ZeroShotClassifier(tiny, NAMES, TEMPLATES, logit_scale=1.0, cache_dir=tmp_path).fit()
    X = head.weights_.T.copy()
    np.testing.assert_allclose(head.decision_function(X), X @ head.weights_, atol=1e-6)
    order, probs = head.top_k(X, k=5)
    assert order.shape == (3, 3) and (order[:, 0] == [0, 1, 2]).all()
    assert (np.diff(probs, axis=1) <= 0).all()


def test_predicting_before_fit_is_an_error(tiny, tmp_path):
    head = ZeroShotClassifier(tiny, NAMES, TEMPLATES, cache_dir=tmp_path)
    with pytest.raises(NotFittedError):
        head.predict(_unit_rows(2, tiny.embed_dim))
    assert not hasattr(head, "weights_")  # predict did not fit it behind the user's back


def test_sklearn_contract_and_grid_search_picks_the_better_value(tiny, tmp_path):
    head = ZeroShotClassifier(tiny, NAMES, "generic", cache_dir=tmp_path)
    params = head.get_params()
    assert params["templates"] == "generic" and params["backbone"] is tiny
    cloned = clone(head)
    assert cloned.backbone is tiny and cloned.get_params()["class_names"] == NAMES
    # Two prompt sets that classify differently: the images are noisy class embeddings under prompts A;
    # B gives each class the prompt of another class, so it scores worse. The search must pick A.
    a = ["a photo of a {c}."]
    b = {"cat": ["a photo of a dog."], "dog": ["a photo of a car."], "car": ["a photo of a cat."]}
    X = ZeroShotClassifier(tiny, NAMES, a, cache_dir=tmp_path).fit().weights_.T
    X = np.repeat(X, 4, axis=0) + 0.15 * _unit_rows(12, tiny.embed_dim, seed=1)
    y = np.repeat([0, 1, 2], 4)
    scores = {name: ZeroShotClassifier(tiny, NAMES, t, cache_dir=tmp_path).fit().score(X, y)
              for name, t in (("a", a), ("b", b))}
    assert scores["a"] > scores["b"]
    search = GridSearchCV(head, {"templates": [b, a]}, cv=[(np.arange(12), np.arange(12))]).fit(X, y)
    assert search.best_params_["templates"] == a and search.best_score_ == scores["a"]


def test_input_validation_errors(tiny, tmp_path):
    with pytest.raises(LabelError, match="duplicate"):
        ZeroShotClassifier(tiny, ["cat", "cat"], TEMPLATES, cache_dir=tmp_path).fit()
    with pytest.raises(LabelError, match="no class names"):
        ZeroShotClassifier(tiny, [], TEMPLATES, cache_dir=tmp_path).fit()
    head = ZeroShotClassifier(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).fit()
    assert head.n_features_in_ == tiny.embed_dim
    with pytest.raises(DimensionMismatchError, match="expecting 64 features"):
        head.predict(np.zeros((2, 512), np.float32))
    bad = _unit_rows(3, tiny.embed_dim)
    bad[1, 5] = np.nan
    with pytest.raises(FeatureError, match="NaN"):
        head.predict(bad)  # a NaN row was silently predicted as class 0 before


def test_registered_and_built_by_name(tiny, tmp_path):
    assert get_head("zeroshot") is ZeroShotClassifier
    head = create_head("zeroshot", backbone=tiny, class_names=NAMES, templates=TEMPLATES, cache_dir=tmp_path)
    assert isinstance(head, ZeroShotClassifier) and head.class_names == NAMES
