"""COOkeD (paper 1) against the authors' ensemble and OOD scores (github.com/glhr/COOkeD eval.py), recomputed here."""

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression

from cliplab.errors import CliplabError, FeatureError, LabelError
from cliplab.eval import evaluate
from cliplab.features import ImageFeatures, class_weights
from cliplab.heads import create_head, head_entry
from cliplab.heads.cooked import SEARCH_LIST, closed_world_probs_from_checkpoint, cooked_scores
from cliplab.heads.saving import load_head, save_head

NAMES = ["cat", "dog", "car", "tree", "boat"]
TEMPLATES = ["a photo of a {c}."]
MODEL = {"model": "tiny", "pretrained": "", "model_id": "tiny-seed0", "weights": "random"}


def _unit(a):
    a = np.asarray(a, np.float64)
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def _task(per_class=8, val_per_class=4, dim=64, seed=0, spread=0.9):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(len(NAMES), dim))

    def draw(k):
        y = np.repeat(np.arange(len(NAMES)), k)
        return _unit(centres[y] + spread * rng.normal(size=(len(y), dim))), y

    return (*draw(per_class), *draw(val_per_class), *draw(6))


def _head(tiny, tmp_path, **params):
    return create_head("cooked", backbone=tiny, class_names=NAMES, templates=TEMPLATES, cache_dir=tmp_path, **params)


def _entr(p):
    """torch.special.entr(p).sum(-1), written out."""
    return np.sum(np.where(p > 0, -p * np.log(np.where(p > 0, p, 1)), 0), axis=1)


def _reference(tiny, tmp_path, X_train, y_train, X, C, p_classifier, scale=100.0):
    """eval.py's ood_eval on precomputed features: softmax(100 * cos) for CLIP, softmax(probe), softmax(classifier),
    ``torch.stack([cls, probe, clip]).mean(0)``; msp = its max, entropy = its entropy."""
    text = class_weights(tiny, NAMES, TEMPLATES, cache_dir=tmp_path).astype(np.float64)
    text = text / np.linalg.norm(text, axis=0, keepdims=True)
    x = X.astype(np.float64)
    p_clip = softmax(scale * (x / np.linalg.norm(x, axis=1, keepdims=True)) @ text, axis=1)
    probe = LogisticRegression(C=C, max_iter=1000, tol=1e-4 / len(X_train)).fit(X_train.astype(np.float64), y_train)
    p_probe = np.zeros_like(p_clip)
    p_probe[:, probe.classes_] = probe.predict_proba(x)  # classes absent from training: probability 0
    p_cls = p_probe if p_classifier is None else p_classifier
    ensemble = np.stack([p_cls, p_probe, p_clip]).mean(0)
    return ensemble, ensemble.max(1), _entr(ensemble), p_clip, p_probe


def test_ensemble_and_scores_match_the_authors_formula(tiny, tmp_path):
    X, y, X_val, y_val, X_test, _ = _task()
    head = _head(tiny, tmp_path).fit(X, y, X_val, y_val)
    p_cls = np.random.default_rng(1).dirichlet(np.ones(len(NAMES)), size=len(X_test))
    ens, msp, entropy, p_clip, p_probe = _reference(tiny, tmp_path, X, y, X_test, head.C_, p_cls)
    np.testing.assert_allclose(head.predict_proba(X_test, closed_world_probs=p_cls), ens, atol=1e-5)
    np.testing.assert_array_equal(head.predict(X_test, closed_world_probs=p_cls), ens.argmax(1))
    scores = cooked_scores(head, X_test, closed_world_probs=p_cls, members=True)
    np.testing.assert_allclose(scores["msp"], msp, atol=1e-5)
    np.testing.assert_allclose(scores["entropy"], -entropy, atol=1e-5)  # higher = more in-distribution
    np.testing.assert_allclose(scores["msp_clip"], p_clip.max(1), atol=1e-5)
    np.testing.assert_allclose(scores["entropy_probe"], -_entr(p_probe), atol=1e-5)
    np.testing.assert_allclose(scores["msp_classifier"], p_cls.max(1), atol=1e-12)
    # without a closed-world classifier the probe stands in for it: (2 p_probe + p_clip) / 3
    ens_fallback = _reference(tiny, tmp_path, X, y, X_test, head.C_, None)[0]
    np.testing.assert_allclose(head.predict_proba(X_test), ens_fallback, atol=1e-5)
    np.testing.assert_allclose(ens_fallback, (2 * p_probe + p_clip) / 3, atol=1e-12)
    assert not np.allclose(ens_fallback, ens, atol=1e-3)


def test_clip_temperature_is_100_unless_the_learned_scale_is_asked_for(tiny, tmp_path):
    X, y, _, _, X_test, _ = _task(seed=2)
    t100 = _head(tiny, tmp_path).fit(X, y)
    learned = _head(tiny, tmp_path, clip_scale=None).fit(X, y)
    assert t100.clip_scale_ == 100.0 and learned.clip_scale_ == pytest.approx(tiny.logit_scale)
    ref = _reference(tiny, tmp_path, X, y, X_test, 0.316, None, scale=tiny.logit_scale)[0]
    np.testing.assert_allclose(learned.predict_proba(X_test), ref, atol=1e-5)
    if abs(tiny.logit_scale - 100.0) > 1:
        assert not np.allclose(t100.predict_proba(X_test), ref, atol=1e-4)


def _coop_search(acc):
    """CoOp lpclip/linear_probe.py's search, written out (first best of the sweep, then 8 halvings)."""
    accs = [acc(c) for c in SEARCH_LIST]
    c_peak = SEARCH_LIST[int(np.argmax(accs))]
    c_final, c_left, c_right = c_peak, 0.1 * c_peak, 10 * c_peak
    for _ in range(8):
        a_left, a_right = acc(c_left), acc(c_right)
        if a_left < a_right:
            c_final = c_right
            c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_right = np.log10(c_right)
        else:
            c_final = c_left
            c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_left = np.log10(c_left)
        c_left, c_right = np.power(10, c_left), np.power(10, c_right)
    return c_final


def test_probe_C_is_searched_on_validation_and_fitted_on_train_only(tiny, tmp_path):
    X, y, X_val, y_val, X_test, _ = _task(seed=8, spread=2.5)  # noisy: C matters
    head = _head(tiny, tmp_path).fit(X, y, X_val, y_val)

    def acc(c):
        clf = LogisticRegression(C=c, max_iter=1000, tol=1e-4 / len(X)).fit(X.astype(np.float64), y)
        return np.mean(clf.predict(X_val.astype(np.float64)) == y_val)

    assert head.searched_ and pytest.approx(_coop_search(acc), rel=1e-12) == head.C_
    # the final probe is the fit at C_ on the training rows only (validation rows never fitted on)
    at_c = _head(tiny, tmp_path, C=head.C_).fit(X, y)
    np.testing.assert_allclose(head.predict_proba(X_test), at_c.predict_proba(X_test), atol=1e-10)
    # other validation labels give another C: the choice depends on validation data
    other = _head(tiny, tmp_path).fit(X, y, X_val, np.roll(y_val, 3))
    assert 1e-2 < head.C_ < 1e2 and other.C_ != head.C_
    assert not _head(tiny, tmp_path, search=False).fit(X, y, X_val, y_val).searched_


def test_test_data_never_reaches_the_fit(tiny, tmp_path):
    X, y, X_val, y_val, X_test, y_test = _task(seed=4)

    def features(F, labels, split):
        return ImageFeatures(F, labels, [f"{split}/{i}" for i in range(len(labels))], np.arange(len(labels)),
                             class_names=NAMES, dataset="toy", split=split, model_id="tiny-seed0", model=MODEL,
                             cache_key=split)

    train, val = features(X, y, "train"), features(X_val, y_val, "val")
    fitted = []
    for poison in (0, 2):  # two test sets with different rows and labels
        test = features(np.roll(X_test, poison, axis=0), (y_test + poison) % len(NAMES), "test")
        head = _head(tiny, tmp_path)
        evaluate(head, test, train, val=val)
        fitted.append((head.fit_summary(), head.coef_.copy()))
    assert fitted[0][0] == fitted[1][0] and fitted[0][0]["searched"]
    np.testing.assert_array_equal(fitted[0][1], fitted[1][1])


def test_save_and_load_round_trip(tiny, tmp_path):
    X, y, X_val, y_val, X_test, _ = _task(seed=5)
    head = _head(tiny, tmp_path).fit(X, y, X_val, y_val)
    save_head(head, tmp_path / "cooked")
    assert not list((tmp_path / "cooked").glob("*.pkl"))
    loaded = load_head(tmp_path / "cooked", backbone=tiny)
    np.testing.assert_array_equal(loaded.logits(X_test), head.logits(X_test))
    assert loaded.C_ == head.C_ and head_entry(loaded).paper == 1


def test_two_classes_and_a_class_missing_from_training(tiny, tmp_path):
    X, y, _, _, X_test, _ = _task(seed=6)
    keep = y < 2  # only classes 0 and 1 trained: the probe gives the other three probability 0
    head = _head(tiny, tmp_path).fit(X[keep], y[keep])
    ref = _reference(tiny, tmp_path, X[keep], y[keep], X_test, 0.316, None)
    proba = head.predict_proba(X_test)
    np.testing.assert_allclose(proba, ref[0], atol=1e-5)
    np.testing.assert_allclose(proba[:, 2:], ref[3][:, 2:] / 3, atol=1e-5)  # CLIP's share only
    assert ref[4][:, :2].sum(1) == pytest.approx(1.0)


def test_bad_inputs_are_clear_errors(tiny, tmp_path):
    X, y, X_val, y_val, X_test, _ = _task(seed=7)
    head = _head(tiny, tmp_path).fit(X, y)
    with pytest.raises(FeatureError, match="closed_world_probs"):
        head.predict_proba(X_test, closed_world_probs=np.ones((len(X_test), 2)))
    with pytest.raises(FeatureError, match="closed_world_probs"):
        head.predict(X_test, closed_world_probs=np.ones((len(X_test), len(NAMES))))  # rows do not sum to 1
    with pytest.raises(LabelError, match="y_val"):
        _head(tiny, tmp_path).fit(X, y, X_val=X_val)
    with pytest.raises(LabelError, match="two classes"):
        _head(tiny, tmp_path).fit(X[y == 0], y[y == 0])
    with pytest.raises(ValueError, match="clip_scale"):
        _head(tiny, tmp_path, clip_scale=0).fit(X, y)


def test_closed_world_probabilities_from_a_torchvision_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    torch.save(model.state_dict(), tmp_path / "cls.pt")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = torch.softmax(model(images), dim=1).double().numpy()
    probs = closed_world_probs_from_checkpoint(tmp_path / "cls.pt", "resnet18", images, num_classes=5, batch_size=2)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    with pytest.raises(CliplabError, match="cls.pt"):
        closed_world_probs_from_checkpoint(tmp_path / "cls.pt", "resnet18", images, num_classes=7)
