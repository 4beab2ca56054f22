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


class _Identity(torch.nn.Module):
    def get_cast_dtype(self):
        return torch.float32

    def forward(self, x, attn_mask=None):
        return x


def _stub_text_model(table):
    """A text tower that is the identity: the hidden state of a position is its (masked) word embedding."""
    model = torch.nn.Module()
    model.token_embedding = torch.nn.Embedding.from_pretrained(torch.tensor(table), freeze=False)
    model.positional_embedding = torch.zeros(3, 2)
    model.transformer, model.ln_final, model.attn_mask = _Identity(), torch.nn.Identity(), None
    return model


def _layer_norm(v):
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return [(x - mean) / math.sqrt(var + 1e-5) for x in v]


def _cross_entropy(logits, target):
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))


def test_mlm_loss_hand_computed_with_and_without_the_image():
    from cliplab.train.objectives_lightclip import MlmFusion, mlm_loss

    table = [[1.0, 0.0], [0.0, 1.0], [2.0, -2.0]]
    model = _stub_text_model(table)
    fusion = MlmFusion(width=2, image_dim=2, heads=1)
    with torch.no_grad():
        fusion.mask.copy_(torch.tensor([0.3, -0.1]))
        fusion.to_text.weight.copy_(torch.eye(2))
        fusion.to_text.bias.zero_()
        fusion.attention.out_proj.weight.zero_()  # first: the image cannot reach the text
        fusion.attention.out_proj.bias.zero_()
    text = torch.tensor([[0, 1, 2]])
    masked = torch.tensor([[False, True, False]])  # the word with id 1 is masked
    patches = torch.tensor([[[5.0, 1.0]]])  # one patch: attention gives it weight 1 whatever the query

    def by_hand(hidden):
        normed = _layer_norm(hidden)
        logits = [sum(a * b for a, b in zip(normed, row, strict=True)) for row in table]
        return _cross_entropy(logits, 1)

    assert mlm_loss(model, fusion, text, masked, patches).item() == pytest.approx(by_hand([0.3, -0.1]), rel=1e-5)
    with torch.no_grad():  # now the value path is the identity: the masked word's state becomes mask + patch
        width = 2
        fusion.attention.in_proj_weight[2 * width:].copy_(torch.eye(2))
        fusion.attention.in_proj_bias.zero_()
        fusion.attention.out_proj.weight.copy_(torch.eye(2))
    assert mlm_loss(model, fusion, text, masked, patches).item() == pytest.approx(by_hand([5.3, 0.9]), rel=1e-5)


def test_mask_words_masks_only_words_and_at_least_one_per_caption():
    from cliplab.train.objectives_lightclip import mask_words

    words = torch.tensor([[False, True, True, True, False], [False, True, False, False, False],
                          [False, False, False, False, False]])
    torch.manual_seed(0)
    for rate in (0.01, 0.5):
        chosen = mask_words(words, rate)
        assert not (chosen & ~words).any()
        assert chosen.any(dim=1).tolist() == [True, True, False]
    assert torch.equal(mask_words(words, 1.0), words)


def test_mlm_weight_zero_is_todays_loss_and_the_term_adds_with_its_weight(tiny_batch):
    model, batch = tiny_batch
    work = model.derive("lightclip-mlm", trainable=True)
    today, logs = get_objective("lightclip", soften=0.0, token_weight=0.5)(work, batch)
    zero, zero_logs = get_objective("lightclip", soften=0.0, token_weight=0.5, mlm_weight=0.0)(work, batch)
    assert zero.item() == today.item() and "mlm" not in zero_logs
    torch.manual_seed(1)
    total, mlm_logs = get_objective("lightclip", soften=0.0, token_weight=0.5, mlm_weight=2.0)(work, batch)
    assert mlm_logs["mlm"] > 0 and mlm_logs["instance"] == pytest.approx(logs["instance"], abs=1e-6)
    assert total.item() == pytest.approx(today.item() + 2.0 * mlm_logs["mlm"], abs=1e-5)


def test_mlm_trains_its_fusion_module_and_keeps_it_in_the_checkpoint(tiny_batch, tmp_path):
    from cliplab.train.engine import TrainSettings, run_training

    model, batch = tiny_batch
    objective = get_objective("lightclip", token_weight=0.0, mlm_weight=1.0)
    settings = TrainSettings(steps=2, lr=1e-2, checkpoint_dir=tmp_path / "state", checkpoint_every=1,
                             progress=False)
    run_training(model.derive("lightclip-mlm-train", trainable=True), objective,
                 lambda epoch, start=0: iter([batch] * 2), settings)
    trained = {k: v.clone() for k, v in objective.fusion.state_dict().items()}
    fresh = get_objective("lightclip", token_weight=0.0, mlm_weight=1.0)
    fresh.param_groups(model.derive("x", trainable=True).model, 0.1)
    assert any(not torch.equal(trained[k], v) for k, v in fresh.fusion.state_dict().items())  # the step moved it
    fresh.load_state_dict(objective.state_dict())
    assert all(torch.equal(trained[k], v) for k, v in fresh.fusion.state_dict().items())
    with pytest.raises(Exception, match="mlm_weight is 0"):
        get_objective("lightclip").load_state_dict(objective.state_dict())
