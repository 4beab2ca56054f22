"""CLIP-MoE's multiplet upcycling: hardness and clusters written out, one expert is the dense model, only MLPs move."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliplab.train.moe_upcycle import hard_clusters, multiplet_upcycle, pair_losses
from cliplab.train.objectives_mlcd import spherical_kmeans
from cliplab.train.objectives_moe import _blocks, moe_layers


@pytest.fixture(scope="module")
def pool():
    from cliplab.models import load_model

    backbone = load_model("tiny")
    size = backbone.preprocess_config.get("size", 224)
    size = size[0] if isinstance(size, list | tuple) else size
    images = torch.randn(12, 3, size, size, generator=torch.Generator().manual_seed(0))
    words = ["cat", "dog", "red truck", "bird", "green tree", "boat", "blue car", "horse", "frog", "ship", "deer",
             "sun"]
    return backbone.model, images, backbone.tokenize([f"a photo of a {w}" for w in words])


def test_pair_losses_written_out(pool):
    model, images, tokens = pool
    with torch.no_grad():
        img = F.normalize(model.encode_image(images), dim=-1).numpy().astype(np.float64)
        txt = F.normalize(model.encode_text(tokens), dim=-1).numpy().astype(np.float64)
    logits = float(model.logit_scale.exp()) * img @ txt.T

    def ce(rows):
        return np.array([np.log(np.exp(r).sum()) - r[i] for i, r in enumerate(rows)])

    expected = (ce(logits) + ce(logits.T)) / 2
    assert np.abs(pair_losses(model, images, tokens).numpy() - expected).max() < 1e-4


def test_one_expert_is_the_dense_model_and_copies_move_only_their_mlps(pool):
    model, images, tokens = pool
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one, stages = multiplet_upcycle(model, images, tokens, experts=1)
    assert stages == []
    with torch.no_grad():
        assert torch.allclose(one.encode_image(images), model.encode_image(images), atol=1e-6)
        assert torch.allclose(one.encode_text(tokens), model.encode_text(tokens), atol=1e-6)
    moe, stages = multiplet_upcycle(model, images, tokens, experts=2, steps=2, batch_size=4, lr=1e-2, clusters=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model never changes
    layers = moe_layers(moe)
    assert len(layers) == len(_blocks(model)) and all(len(layer.experts) == 2 for layer in layers)
    first = [b.mlp for b in _blocks(model)]
    assert all(torch.equal(layer.experts[0].c_fc.weight, mlp.c_fc.weight) for layer, mlp in zip(layers, first,
                                                                                               strict=True))
    assert any(not torch.equal(layer.experts[1].c_fc.weight, mlp.c_fc.weight) for layer, mlp in zip(layers, first,
                                                                                                   strict=True))
    # everything outside the MLPs is the dense model's
    moe_state = {k: v for k, v in moe.state_dict().items() if ".mlp." not in k}
    assert moe_state and all(torch.equal(v, before[k]) for k, v in moe_state.items())


def test_copy_k_is_clustered_on_the_previous_copys_hard_pairs_only(pool):
    model, images, tokens = pool
    _, stages = multiplet_upcycle(model, images, tokens, experts=2, steps=1, batch_size=4, hard_fraction=0.5,
                                  clusters=2, seed=3)
    losses = pair_losses(model, images, tokens)
    hardest = sorted(torch.argsort(losses, descending=True)[:6].tolist())
    assert list(stages[0].hard) == hardest  # copy 0's (the model's) hardest half
    # the assignment is a cosine k-means (seed + k, as the stage draws it) of the hard pairs' joint features alone
    with torch.no_grad():
        joint = torch.cat([F.normalize(model.encode_image(images[hardest]), dim=-1),
                           F.normalize(model.encode_text(tokens[hardest]), dim=-1)], dim=1)
    centres = spherical_kmeans(joint, 2, seed=4)
    expected = (F.normalize(joint, dim=-1) @ centres.T).argmax(1)
    assert stages[0].clusters == tuple(expected.tolist()) and len(set(stages[0].clusters)) == 2
    hard, labels = hard_clusters(model, images, tokens, 0.5, 2, seed=4)
    assert hard.tolist() == hardest and torch.equal(labels, expected)


def test_copy_two_uses_copy_ones_hard_pairs_and_routing_trains_the_routers_alone(pool):
    import copy

    model, images, tokens = pool
    fixed, _ = multiplet_upcycle(model, images, tokens, experts=3, steps=2, batch_size=4, lr=1e-2, seed=1)
    moe, stages = multiplet_upcycle(model, images, tokens, experts=3, steps=2, batch_size=4, lr=1e-2, seed=1,
                                    routing_steps=2)
    copy_one = copy.deepcopy(model)  # copy 1 rebuilt from the second expert of every layer
    for block, layer in zip(_blocks(copy_one), moe_layers(moe), strict=True):
        block.mlp = copy.deepcopy(layer.experts[1])
    losses = pair_losses(copy_one, images, tokens)
    assert list(stages[1].hard) == sorted(torch.argsort(losses, descending=True)[:6].tolist())
    for routed, plain in zip(moe_layers(moe), moe_layers(fixed), strict=True):
        assert routed.router.weight.abs().sum() > 0 and plain.router.weight.abs().sum() == 0
        for a, b in zip(routed.experts.parameters(), plain.experts.parameters(), strict=True):
            assert torch.equal(a, b)
