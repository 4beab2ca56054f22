"""Bayes-PFL (regions/flows.py, regions/bayes_pfl.py): planar flow Jacobians, identity at u = 0, the authors'
segmentation losses by hand, training on the auxiliary split, seeded prediction, saving, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cliplab.errors import CliplabError
from cliplab.regions.flows import ImageAgnosticFlow, ImageSpecificFlow, flow_kl, planar_step, run_flows

DATA = "/work/shared/datasets"


def test_log_det_equals_autograd():
    torch.manual_seed(0)
    d, k = 6, 4
    z = torch.randn(1, d, dtype=torch.float64)
    u, w, b = torch.randn(k, d, dtype=torch.float64), torch.randn(k, d, dtype=torch.float64), torch.randn(k)
    b = b.double()
    for steps in (1, k):
        def f(x, steps=steps):
            return run_flows(x[None], u[:steps], w[:steps], b[:steps], eps=0.0)[0][0]

        jac = torch.autograd.functional.jacobian(f, z[0])
        expected = torch.linalg.slogdet(jac).logabsdet
        _, log_det = run_flows(z, u[:steps], w[:steps], b[:steps], eps=0.0)
        assert float(log_det[0]) == pytest.approx(float(expected), abs=1e-10)


def test_zero_u_is_the_identity():
    z = torch.randn(3, 5)
    out, log_det = planar_step(z, torch.zeros(3, 5), torch.randn(3, 5), torch.randn(3), eps=0.0)
    assert torch.equal(out, z) and torch.equal(log_det, torch.zeros(3))
    out, log_det = run_flows(z, torch.zeros(4, 5), torch.randn(4, 5), torch.randn(4))
    assert torch.equal(out, z) and torch.allclose(log_det, torch.full((3,), 4 * math.log(1 + 1e-5)), atol=1e-6)


def test_flow_kl_written_out():
    torch.manual_seed(1)
    z0, zk, mu, var = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.rand(2, 3) + 0.5
    log_det = torch.randn(2)
    log_q = (-0.5 * (var.log() + (z0 - mu) ** 2 / var)).sum(-1)
    log_p = (-0.5 * zk ** 2).sum(-1)
    expected = ((log_q - log_p).sum() - log_det.sum()) / 2
    assert float(flow_kl(z0, zk, mu, var, log_det)) == pytest.approx(float(expected), rel=1e-5)


def test_flows_draw_shapes_and_seeding():
    flow = ImageSpecificFlow(8, 5, 16, 3)
    torch.manual_seed(0)
    a = flow(torch.randn(4, 8), samples=2)
    assert a.zk.shape == (2, 4, 5) and a.log_det.shape == (2, 4) and torch.isfinite(a.kl())
    agnostic = ImageAgnosticFlow(8, 5, 16, 3)
    assert agnostic(3).zk.shape == (3, 1, 5)


def test_focal_and_dice_by_hand():
    from cliplab.regions.bayes_pfl import dice_loss, focal_loss

    p1 = torch.tensor([0.9, 0.2, 0.6, 0.1])  # abnormal probabilities of 4 pixels
    pred = torch.stack([1 - p1, p1]).reshape(1, 2, 2, 2)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 2, 2)
    pt = torch.tensor([0.9, 0.2, 0.4, 0.9])
    terms = -(1 - pt) ** 2 * torch.log(pt + 1e-8)
    assert float(focal_loss(pred, target)) == pytest.approx(float(terms[:2].mean() + terms[2:].mean()), rel=1e-6)
    dice = 1 - (2 * (0.9 + 0.2) + 1e-5) / (0.9 + 0.2 + 0.6 + 0.1 + 2 + 1e-5)
    assert float(dice_loss(pred, target)) == pytest.approx(dice, rel=1e-6)


@pytest.fixture(scope="module")
def trained():
    from cliplab.data.anomaly import anomaly_set
    from cliplab.models import load_model
    from cliplab.regions.anomaly import patch_features

    if not (Path(DATA) / "dtd_sample" / "labels.json").is_file():
        pytest.skip("dtd_sample not available")
    backbone = load_model("tiny")
    aux = anomaly_set("aux", root=DATA, size=32, limit=5, per_source=2, anomaly_ratio=0.6)
    test = anomaly_set("test", root=DATA, size=32, limit=5, per_source=2, anomaly_ratio=0.6)
    aux_f = patch_features(backbone, aux.images(), size=32)
    test_f = patch_features(backbone, test.images(), size=32)
    return backbone, aux, aux_f, test, test_f


def test_training_lowers_the_loss_and_prediction_is_seeded(trained, tmp_path):
    from cliplab.regions.bayes_pfl import BayesPFL, fit_bayes_pfl, training_masks
    from cliplab.train.engine import list_objectives

    assert "bayes-pfl" in list_objectives()
    backbone, aux, aux_f, test, test_f = trained
    params = dict(n_flows=2, prompt_num=2, context_len=2, state_len=2)
    batch = {"global": aux_f.global_, "patches": aux_f.patches, "masks": training_masks(aux.masks, 16),
             "labels": torch.as_tensor(aux.labels)}

    def loss(model):
        torch.manual_seed(0)
        with torch.no_grad():
            return float(model.loss(batch)[0])

    before = loss(BayesPFL(backbone, seed=3, **params))
    model = fit_bayes_pfl(backbone, aux_f, aux.masks, aux.labels, epochs=6, batch_size=10, lr=1e-2, map_size=16,
                          seed=3, **params)
    assert loss(model) < before
    first = model.predict(test_f, 32, samples=2, seed=1)
    assert first.scores.shape == (len(test),) and first.maps.shape == (len(test), 32, 32)
    assert float(first.maps.min()) >= 0 and float(first.maps.max()) <= 1
    again = model.predict(test_f, 32, samples=2, seed=1)
    assert torch.equal(first.maps, again.maps) and torch.equal(first.scores, again.scores)
    loaded = BayesPFL.load(model.save(tmp_path / "pfl"), backbone)
    assert torch.equal(loaded.predict(test_f, 32, samples=2, seed=1).maps, first.maps)


def test_one_sample_mean_is_the_pair_softmax(trained):
    """With one sample and one prompt the map is softmax(exp(tau) [f.t_n, f.t_a])[1] of the upsampled logits."""
    from cliplab.regions.anomaly import upsample
    from cliplab.regions.bayes_pfl import BayesPFL

    backbone, _, _, _, test_f = trained
    model = BayesPFL(backbone, prompt_num=1, n_flows=1, context_len=1, state_len=1)
    result = model.predict(test_f, 32, samples=1, seed=5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        agnostic = (model.normal_flow(1), model.abnormal_flow(1))
        with torch.no_grad():
            text, _ = model.text_features(test_f.global_, 1, agnostic)
            t = text[0, :, :, 0]  # (n, 2, d)
            logits = model.temperature_pixel.exp() * torch.einsum("nhwd,nkd->nkhw", test_f.patches, t)
    expected = torch.softmax(upsample(logits, 32), dim=1)[:, 1]
    assert torch.allclose(result.maps, expected, atol=1e-6)


def test_bad_input_is_one_line(trained):
    from cliplab.regions.bayes_pfl import BayesPFL, fit_bayes_pfl

    backbone, aux, aux_f, _, _ = trained
    for call in (lambda: BayesPFL(backbone, "  "), lambda: BayesPFL(backbone, prompt_num=0),
                 lambda: fit_bayes_pfl(backbone, aux_f, aux.masks[:2], aux.labels),
                 lambda: fit_bayes_pfl(backbone, aux_f, aux.masks, np.full(len(aux), 2))):
        with pytest.raises(CliplabError) as info:
            call()
        assert "\n" not in str(info.value)
