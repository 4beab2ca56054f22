"""LightCLIP objective (paper 41): softened labels by hand, Sinkhorn written out (and POT when installed), token
alignment on a known matching, the one-pass token features, soften 0 and no token term = the clip loss."""

import math

import numpy as np
import pytest
import torch

from cliplab.train.engine import get_objective
from cliplab.train.objectives_lightclip import sinkhorn, soft_clip_loss, soft_targets, token_alignment


def test_soft_clip_loss_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale, eps = 2.0, 0.2
    logits = [[2 * 0.6, 0.0], [2 * 0.8, 2 * 1.0]]  # img @ txt^T * scale
    target = [[0.8, 0.2], [0.2, 0.8]]

    def ce(rows):
        return sum(-sum(t * (r[j] - math.log(sum(math.exp(v) for v in r))) for j, t in enumerate(trow))
                   for r, trow in zip(rows, target, strict=True)) / len(rows)

    by_hand = (ce(logits) + ce([list(c) for c in zip(*logits, strict=True)])) / 2
    assert soft_clip_loss(img, txt, torch.tensor(scale), eps).item() == pytest.approx(by_hand, rel=1e-6)
    assert torch.allclose(soft_targets(3, 0.3).sum(1), torch.ones(3))


def _sinkhorn_written_out(cost, a, b, eps, iters):
    kernel = np.exp(-cost / eps)
    u, v = np.ones_like(a), np.ones_like(b)
    for _ in range(iters):
        u = a / (kernel @ v)
        v = b / (kernel.T @ u)
    return u[:, None] * kernel * v[None, :]


def test_sinkhorn_matches_the_written_out_iteration_and_pot():
    rng = np.random.default_rng(0)
    cost = rng.uniform(0, 2, size=(3, 4))
    a, b = np.full(3, 1 / 3), np.array([0.1, 0.2, 0.3, 0.4])
    got = sinkhorn(torch.tensor(cost)[None], torch.tensor(a)[None], torch.tensor(b)[None], eps=0.5, iters=200)[0]
    ref = _sinkhorn_written_out(cost, a, b, 0.5, 200)
    assert np.abs(got.numpy() - ref).max() < 1e-10
    assert np.allclose(ref.sum(1), a) and np.allclose(ref.sum(0), b, atol=1e-8)
    try:
        import ot
    except ImportError:
        return
    assert np.abs(got.numpy() - ot.sinkhorn(a, b, cost, 0.5, numItermax=200, stopThr=0)).max() < 1e-8


def test_token_alignment_finds_the_matching():
    basis = torch.eye(3)
    patches = basis[[2, 0, 1]].unsqueeze(0)  # patch k matches word perm[k]; a padded 4th word is masked out
    words = torch.cat([basis, torch.ones(1, 3)]).unsqueeze(0)
    mask = torch.tensor([[True, True, True, False]])
    loss = token_alignment(patches, words, mask, eps=0.01, iters=200)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # all mass on cost-0 pairs
    shuffled = token_alignment(patches, words[:, [1, 2, 0, 3]] * 0 + 1, mask, eps=0.01, iters=200)
    assert shuffled.item() == pytest.approx(1 - 1 / math.sqrt(3), rel=1e-5)  # every cosine with (1,1,1) is 1/sqrt 3


@pytest.fixture(scope="module")
def tiny_batch():
    from cliplab.models import load_model

    model = load_model("tiny")
    gen = torch.Generator().manual_seed(0)
    size = model.preprocess_config.get("size", 224)
    size = size[0] if isinstance(size, list | tuple) else size
    images = torch.randn(4, 3, size, size, generator=gen)
    tokens = model.tokenize(["a photo of a cat", "a dog", "a big red truck on a road", "a bird"])
    return model, {"images": images, "tokens": tokens}


def test_no_extra_terms_is_the_clip_loss_and_token_features_match(tiny_batch):
    from cliplab.train.objectives_lightclip import tokens_and_features

    model, batch = tiny_batch
    work = model.derive("lightclip", trainable=True)
    clip, _ = get_objective("clip")(work, batch)
    plain = get_objective("lightclip", soften=0.0, token_weight=0.0)
    assert plain(work, batch)[0].item() == pytest.approx(clip.item(), abs=1e-6)
    # with the token term: one pass gives the model's own pooled features, and the total is the sum
    img, patches, txt, words, mask = tokens_and_features(work.model, batch["images"], batch["tokens"])
    assert torch.allclose(img, work.model.encode_image(batch["images"]), atol=1e-5)
    assert torch.allclose(txt, work.model.encode_text(batch["tokens"]), atol=1e-5)
    assert mask.sum(1).tolist() == [5, 2, 7, 2]  # words between the start and end tokens
    full = get_objective("lightclip", soften=0.0, token_weight=0.5)
    total, logs = full(work, batch)
    assert logs["instance"] == pytest.approx(clip.item(), abs=1e-5)
    assert total.item() == pytest.approx(clip.item() + 0.5 * logs["token"], abs=1e-5)
    total.backward()
    assert work.model.visual.proj.grad is not None
    # the softening grows with the steps and is the objective's state
    soft = get_objective("lightclip", soften=0.2, soften_steps=2, token_weight=0.0)
    soft.load_state_dict({"calls": 1})
    assert soft.eps() == pytest.approx(0.1)
