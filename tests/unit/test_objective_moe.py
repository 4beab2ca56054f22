"""CLIP-MoE (paper 46): one expert is the dense model, routing and load balancing by hand, balance 0 = clip."""

import pytest
import torch

from cliplab.train.engine import get_objective
from cliplab.train.objectives_moe import MoeMlp, moe_layers, upcycle


def test_routing_and_balance_hand_computed():
    experts = [torch.nn.Linear(2, 2, bias=False) for _ in range(3)]
    for e, layer in enumerate(experts):
        layer.weight.data = torch.eye(2) * (e + 1)  # expert e multiplies by e + 1
    moe = MoeMlp(experts, width=2, top_k=2)
    moe.router.weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # token 0: router logits (2, 0, -2) -> experts 0 and 1; token 1: (0, 1, -1) -> experts 1 and 0
    p0 = torch.softmax(torch.tensor([2.0, 0.0, -2.0]), 0)
    w0 = p0[[0, 1]] / p0[[0, 1]].sum()
    p1 = torch.softmax(torch.tensor([0.0, 1.0, -1.0]), 0)
    w1 = p1[[1, 0]] / p1[[1, 0]].sum()
    want = torch.stack([x[0] * (w0[0] * 1 + w0[1] * 2), x[1] * (w1[0] * 2 + w1[1] * 1)])
    assert torch.allclose(moe(x), want, atol=1e-6)
    fraction = torch.tensor([0.5, 0.5, 0.0])  # top-1 choices: expert 0, expert 1
    mean_prob = (p0 + p1) / 2
    assert moe.aux_loss.item() == pytest.approx(3 * (fraction * mean_prob).sum().item(), rel=1e-6)


@pytest.fixture(scope="module")
def tiny_batch():
    from cliplab.models import load_model

    model = load_model("tiny")
    gen = torch.Generator().manual_seed(0)
    size = model.preprocess_config.get("size", 224)
    size = size[0] if isinstance(size, list | tuple) else size
    images = torch.randn(4, 3, size, size, generator=gen)
    tokens = model.tokenize(["a cat", "a dog", "a truck", "a bird"])
    return model, {"images": images, "tokens": tokens}


def test_one_expert_is_the_dense_model(tiny_batch):
    model, batch = tiny_batch
    dense = model.model
    moe = upcycle(dense, experts=1)
    assert len(moe_layers(moe)) == len(dense.visual.transformer.resblocks) + len(dense.transformer.resblocks)
    with torch.no_grad():
        assert torch.allclose(moe.encode_image(batch["images"]), dense.encode_image(batch["images"]), atol=1e-6)
        assert torch.allclose(moe.encode_text(batch["tokens"]), dense.encode_text(batch["tokens"]), atol=1e-6)
        # copies of the dense MLP as experts give the dense model too, whatever the routing (weights sum to 1)
        four = upcycle(dense, experts=4, top_k=2)
        for layer in moe_layers(four):
            layer.router.weight.normal_()
        assert torch.allclose(four.encode_image(batch["images"]), dense.encode_image(batch["images"]), atol=1e-5)
    assert not moe_layers(dense)  # the dense model never changes


def test_balance_zero_is_the_clip_loss_and_routers_only(tiny_batch):
    model, batch = tiny_batch
    dense = model.model
    clip, _ = get_objective("clip")(dense, batch)
    work = upcycle(dense, experts=2).requires_grad_(True)
    got, logs = get_objective("clip-moe", balance=0.0)(work, batch)
    assert got.item() == pytest.approx(clip.item(), abs=1e-5)
    assert logs["balance"] == pytest.approx(1.0, abs=1e-6)  # zero-initialised routers: uniform, balance 1
    objective = get_objective("clip-moe", balance=0.5, routers_only=True)
    groups = objective.param_groups(work, 0.1)
    assert sum(len(g["params"]) for g in groups) == len(moe_layers(work))
    total, logs = objective(work, batch)
    assert total.item() == pytest.approx(logs["infonce"] + 0.5 * logs["balance"], rel=1e-6)
