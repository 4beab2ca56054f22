"""OOD scores against SciPy's formulas, and OpenOOD's metrics against scikit-learn and hand-computed cases."""

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from cliplab.errors import CliplabError, DimensionMismatchError, FeatureError
from cliplab.ood import create_score, energy, fpr_at_tpr, max_logit, mcm, msp, ood_metrics, threshold_at_tpr
from cliplab.ood.base import ScoreContext, ScoreInputs


def score(name, logits, **params):
    """The registered score ``name`` on ``logits``, through the plugin path (``create_score`` + ``score``)."""
    plugin = create_score(name, **params)
    plugin.setup(ScoreContext(backbone=None, class_names=[]))
    return plugin.score(ScoreInputs("x", np.ones((np.shape(logits)[0] if np.ndim(logits) else 1, 2)), logits=logits))


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(scale=3.0, size=(50, 7))


def test_energy_is_temperature_times_logsumexp(logits):
    np.testing.assert_allclose(energy(logits), logsumexp(logits, axis=1), rtol=1e-12)
    np.testing.assert_allclose(energy(logits, temperature=2.5), 2.5 * logsumexp(logits / 2.5, axis=1), rtol=1e-12)
    assert not np.allclose(energy(logits), max_logit(logits))  # differs from the max logit it bounds
    assert (energy(logits) >= max_logit(logits)).all()


def test_msp_is_max_of_scipy_softmax(logits):
    np.testing.assert_allclose(msp(logits), softmax(logits, axis=1).max(axis=1), rtol=1e-12)
    assert ((msp(logits) > 1 / 7) & (msp(logits) <= 1)).all()


def test_max_logit(logits):
    np.testing.assert_array_equal(max_logit(logits), logits.max(axis=1))


def test_mcm_is_max_softmax_of_cosines_and_ignores_class_order():
    rng = np.random.default_rng(1)
    features, weights = rng.normal(size=(20, 16)), rng.normal(size=(16, 9))
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    w = weights / np.linalg.norm(weights, axis=0, keepdims=True)
    expected = softmax(x @ w, axis=1).max(axis=1)
    np.testing.assert_allclose(mcm(features, weights), expected, rtol=1e-12)
    np.testing.assert_allclose(mcm(3 * features, weights * 0.1), expected, rtol=1e-12)  # cosine: scale-free
    np.testing.assert_allclose(mcm(features, weights, 0.01), softmax(x @ w / 0.01, axis=1).max(axis=1), rtol=1e-12)
    perm = rng.permutation(9)
    np.testing.assert_allclose(mcm(features, weights[:, perm]), mcm(features, weights), rtol=1e-12)
    with pytest.raises(DimensionMismatchError):
        mcm(features, weights.T)


def test_registry_and_score(logits):
    from cliplab.ood import list_scores

    assert {"msp", "max-logit", "energy", "mcm", "glmcm", "cooked", "clipn-ctw", "clipn-atd"} <= {
        e.name for e in list_scores()}
    np.testing.assert_array_equal(score("energy", logits, temperature=2.0), energy(logits, 2.0))
    np.testing.assert_array_equal(score("max-logit", logits), max_logit(logits))
    np.testing.assert_array_equal(score("msp", logits), msp(logits))
    with pytest.raises(CliplabError, match="unknown OOD score 'odin'"):
        score("odin", logits)
    with pytest.raises(CliplabError, match="takes no parameter 'T'; it takes temperature"):
        score("energy", logits, T=2.0)


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((0, 3)), np.zeros((2, 3, 4)), [[1.0, np.nan]],
                                 [[np.inf, 0.0]]])
@pytest.mark.parametrize("name", ["msp", "max-logit", "energy"])
def test_bad_logits_raise_feature_error(name, bad):
    with pytest.raises(FeatureError, match="logits"):
        score(name, bad)


def test_bad_mcm_inputs_and_temperatures_raise(logits):
    with pytest.raises(FeatureError, match="all zeros"):
        mcm(np.zeros((2, 4)), np.ones((4, 3)))
    with pytest.raises(FeatureError, match="text_weights"):
        mcm(np.ones((2, 4)), np.full((4, 3), np.nan))
    for t in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(CliplabError, match="temperature"):
            energy(logits, temperature=t)


def test_auroc_of_identical_score_sets_is_one_half():
    scores = np.random.default_rng(2).normal(size=40)
    assert ood_metrics(scores, scores.copy())["auroc"] == pytest.approx(0.5)
    assert ood_metrics(np.ones(5), np.ones(8))["auroc"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_aupr_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    id_s, ood_s = rng.normal(1.0, 1.0, size=200), rng.normal(0.0, 1.5, size=150)
    if seed % 2:  # ties within and across the two sets
        id_s, ood_s = np.round(id_s, 1), np.round(ood_s, 1)
    conf = np.concatenate([id_s, ood_s])
    is_id = np.r_[np.ones(id_s.size), np.zeros(ood_s.size)]
    result = ood_metrics(id_s, ood_s)
    assert result["auroc"] == pytest.approx(roc_auc_score(is_id, conf), abs=1e-12)
    # OpenOOD: auc of sklearn's precision-recall curve, in (ID positive) and out (OOD positive, negated scores)
    precision, recall, _ = precision_recall_curve(is_id, conf)
    assert result["aupr_in"] == pytest.approx(auc(recall, precision), abs=1e-12)
    precision, recall, _ = precision_recall_curve(1 - is_id, -conf)
    assert result["aupr_out"] == pytest.approx(auc(recall, precision), abs=1e-12)
    assert result["ap_in"] == pytest.approx(average_precision_score(is_id, conf), abs=1e-12)
    assert result["ap_out"] == pytest.approx(average_precision_score(1 - is_id, -conf), abs=1e-12)
    assert abs(result["aupr_in"] - result["ap_in"]) < 0.02  # two readings of the same curve


@pytest.mark.parametrize("seed", range(5))
def test_fpr95_equals_roc_curve_at_first_tpr_above_95(seed):
    rng = np.random.default_rng(seed)
    id_s, ood_s = rng.normal(1.0, 1.0, size=123), rng.normal(0.0, 1.0, size=77)
    if seed % 2:
        id_s, ood_s = np.round(id_s, 1), np.round(ood_s, 1)
    conf = np.concatenate([id_s, ood_s])
    is_id = np.r_[np.ones(id_s.size), np.zeros(ood_s.size)]
    fpr, tpr, _ = roc_curve(is_id, conf, drop_intermediate=False)  # cliplab's own convention
    assert fpr_at_tpr(id_s, ood_s, convention="id-positive-at-least") == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    fpr, tpr, _ = roc_curve(1 - is_id, -conf)  # OpenOOD's auc_and_fpr_recall (drop_intermediate=True)
    assert fpr_at_tpr(id_s, ood_s, convention="ood-positive") == pytest.approx(fpr[np.argmax(tpr >= 0.95)])


def test_fpr95_hand_computed_under_both_conventions():
    id_s = np.arange(1.0, 21.0)  # 20 ID scores 1..20; keeping 95% = 19 of them puts the threshold at 2
    ood_s = np.array([0.5, 1.5, 2.0, 2.5, 10.0])
    result = ood_metrics(id_s, ood_s, fpr_convention="id-positive-at-least")
    assert result["fpr95"] == pytest.approx(3 / 5)  # OOD scored >= 2: 2.0, 2.5, 10.0
    # MCM: thresholds 2 and 1.5 both keep 19/20 of ID (recall 0.95); the lower one, 1.5, adds OOD 1.5
    result = ood_metrics(id_s, ood_s)
    assert result["fpr95"] == pytest.approx(4 / 5)
    assert result["fpr95_convention"] == "id-positive"
    # OOD positive: catching 95% of 5 OOD means all 5 (score <= 10); ID scored <= 10 are 1..10
    result = ood_metrics(id_s, ood_s, fpr_convention="ood-positive")
    assert result["fpr95"] == pytest.approx(10 / 20)
    assert result["fpr95_convention"] == "ood-positive"
    assert result["n_id"] == 20 and result["n_ood"] == 5
    with pytest.raises(CliplabError, match="unknown FPR convention"):
        ood_metrics(id_s, ood_s, fpr_convention="ood")


@pytest.mark.parametrize("n", [1, 7, 19, 20, 21, 40, 100, 101, 1000, 1234])
def test_threshold_at_tpr_keeps_ceil_tpr_n_scores(n):
    id_s = np.random.default_rng(n).permutation(n).astype(float) * 0.37 - 5  # distinct scores
    threshold = threshold_at_tpr(id_s)
    assert np.sum(id_s >= threshold) == math.ceil(Fraction(95, 100) * n)
    assert np.sum(id_s >= threshold_at_tpr(id_s, 0.5)) == math.ceil(n / 2)
    # 0.07 * 100 is 7.000000000000001 in floating point: a naive ceil would keep 8
    assert np.sum(id_s >= threshold_at_tpr(id_s, 0.07)) == math.ceil(Fraction(7, 100) * n)


@pytest.mark.parametrize("tpr", [0, 1, 1.5, -0.1, float("nan"), "0.95"])
def test_threshold_at_tpr_refuses_tpr_outside_open_unit_interval(tpr):
    with pytest.raises(CliplabError, match="tpr must be strictly between 0 and 1") as info:
        threshold_at_tpr(np.arange(10.0), tpr)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [[], [[1.0, 2.0]], [1.0, np.nan], [np.inf]])
def test_bad_score_arrays_raise(bad):
    with pytest.raises(FeatureError):
        ood_metrics(bad, [0.0, 1.0])
    with pytest.raises(FeatureError):
        ood_metrics([0.0, 1.0], bad)
    with pytest.raises(FeatureError):
        threshold_at_tpr(bad)
