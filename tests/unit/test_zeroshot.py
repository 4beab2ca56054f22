"""ZeroShotClassifier against the closed form of CLIP's prompt ensembling."""

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from cliplab.errors import DimensionMismatchError, LabelError
from cliplab.heads import ZeroShotClassifier, get_head, list_heads

NAMES = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}.", "{c}"]


def _expected_weights(backbone):
    rows = []
    for name in NAMES:
        emb = backbone.encode_texts([t.replace("{c}", name) for t in TEMPLATES]).numpy()
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        mean = emb.mean(axis=0)
        rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows, axis=1)


def test_weights_logits_and_probabilities_match_closed_form(tiny, tmp_path):
    head = ZeroShotClassifier(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).fit()
    weights = _expected_weights(tiny)
    np.testing.assert_allclose(head.weights_, weights, atol=1e-5)
    X = np.random.default_rng(0).normal(size=(6, tiny.embed_dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    logits = tiny.logit_scale * X @ weights
    np.testing.assert_allclose(head.decision_function(X), logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head.predict_proba(X), softmax(logits, axis=1), atol=1e-5)
    assert (head.predict(X) == logits.argmax(1)).all()


def test_class_embeddings_are_classified_as_their_class(tiny, tmp_path):
    head = ZeroShotClassifier(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).fit()
    X = head.weights_.T.copy()
    assert head.predict(X).tolist() == [0, 1, 2]
    assert head.score(X, [0, 1, 2]) == 1.0


def test_temperature_override_and_top_k(tiny, tmp_path):
    head = ZeroShotClassifier(tiny, NAMES, TEMPLATES, temperature=1.0, cache_dir=tmp_path).fit()
    X = head.weights_.T.copy()
    np.testing.assert_allclose(head.decision_function(X), X @ head.weights_, atol=1e-6)
    order, probs = head.top_k(X, k=5)
    assert order.shape == (3, 3) and (order[:, 0] == [0, 1, 2]).all()
    assert (np.diff(probs, axis=1) <= 0).all()


def test_predicting_without_fit_builds_weights(tiny, tmp_path):
    head = ZeroShotClassifier(tiny, NAMES, TEMPLATES, cache_dir=tmp_path)
    assert head.predict(_expected_weights(tiny).T).tolist() == [0, 1, 2]


def test_sklearn_contract(tiny, tmp_path):
    head = ZeroShotClassifier(tiny, NAMES, "generic", cache_dir=tmp_path)
    params = head.get_params()
    assert params["templates"] == "generic" and params["backbone"] is tiny
    cloned = clone(head)
    assert cloned.backbone is tiny and cloned.get_params()["class_names"] == NAMES
    cloned.set_params(temperature=10.0)
    assert cloned.temperature == 10.0
    X = ZeroShotClassifier(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).fit().weights_.T
    search = GridSearchCV(head, {"temperature": [1.0, 50.0]}, cv=[(np.arange(3), np.arange(3))]).fit(X, [0, 1, 2])
    assert search.best_score_ == 1.0


def test_errors(tiny, tmp_path):
    with pytest.raises(LabelError, match="duplicate"):
        ZeroShotClassifier(tiny, ["cat", "cat"], TEMPLATES, cache_dir=tmp_path).fit()
    with pytest.raises(LabelError, match="no class names"):
        ZeroShotClassifier(tiny, [], TEMPLATES, cache_dir=tmp_path).fit()
    head = ZeroShotClassifier(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).fit()
    with pytest.raises(DimensionMismatchError, match="dimension 64"):
        head.predict(np.zeros((2, 512), np.float32))


def test_registered_by_name():
    assert get_head("zeroshot") is ZeroShotClassifier
    assert [e.name for e in list_heads("zeroshot")] == ["zeroshot"]
