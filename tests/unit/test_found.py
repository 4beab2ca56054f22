"""FOUND's background discovery: seed and mask on a hand-built attention + key case (with and without the head
weights), the attention and keys read from a CLIP ViT block equal torch's own attention weights and the block's
key projection, and the timm path gives a mask of the guidance grid."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cliplab.dense.found import FoundBackground, found_background, head_weights, tower_attention_keys
from cliplab.errors import CliplabError
from cliplab.models.dense import dense_tower

# 2 heads, a 2x2 grid (patches 0..3 row-major). Head 0 attends sharply to patch 0, head 1 broadly.
ATT = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.3, 0.3, 0.3, 0.1]]).reshape(1, 2, 2, 2)
# one key dimension per head; per patch (head 0, head 1): p0 (-1, 1), p1 (1, 1), p2 (1, -1), p3 (1, 1)
KEYS = torch.tensor([[-1.0, 1.0, 1.0, 1.0], [1.0, 1.0, -1.0, 1.0]]).reshape(1, 2, 1, 2, 2)


def test_head_weights_hand_computed():
    # mean attention 2/8 = 0.25: head 0 has 1 of 4 patches above it, head 1 has 3 of 4
    b0, b1 = math.log(1.0 / 0.25), math.log(1.0 / 0.75)
    torch.testing.assert_close(head_weights(ATT), torch.tensor([[b0, b1]]), atol=1e-6, rtol=1e-6)


def test_seed_and_background_hand_computed():
    b0, b1 = math.log(4.0), math.log(4.0 / 3.0)
    # weighted attention sums: p0 .7b0+.3b1, p1 = p2 = .1b0+.3b1, p3 .1b0+.1b1 -> the seed is patch 3 (key (b0, b1))
    cos = {0: (-b0 * b0 + b1 * b1) / (b0 * b0 + b1 * b1), 1: 1.0, 2: (b0 * b0 - b1 * b1) / (b0 * b0 + b1 * b1), 3: 1.0}
    assert cos[0] < 0.3 < cos[2]
    mask, seed = found_background(ATT, KEYS, threshold=0.3)
    assert seed.tolist() == [3]
    assert mask.reshape(-1).tolist() == [float(cos[p] > 0.3) for p in range(4)] == [0.0, 1.0, 1.0, 1.0]
    # without the head weights: sums 1.0, 0.4, 0.4, 0.2 (seed 3 again); cosines -> 0, 1, 0, 1 (p2 is orthogonal)
    mask, seed = found_background(ATT, KEYS, threshold=0.3, reweight=False)
    assert seed.tolist() == [3]
    assert mask.reshape(-1).tolist() == [0.0, 1.0, 0.0, 1.0]
    # a higher threshold keeps only the patches with cosine above it
    assert found_background(ATT, KEYS, threshold=0.95)[0].reshape(-1).tolist() == [0.0, 1.0, 0.0, 1.0]


def test_shapes_are_checked():
    with pytest.raises(CliplabError):
        found_background(ATT, KEYS[:, :1])


@pytest.fixture(scope="module")
def vit():
    from test_segmentation_maskclip import _vit_backbone

    return _vit_backbone()


@torch.no_grad()
def test_tower_attention_equals_torch_attention_weights(vit):
    tower = dense_tower(vit)
    images = torch.randn(2, 3, 16, 20)
    x = tower.embed(images)
    for index in range(tower.depth - 1):
        x = tower.block(index, x)
    block = tower.blocks[-1]
    y = block.ln_1(x)
    _, weights = block.attn(y, y, y, need_weights=True, average_attn_weights=False)  # (n, heads, T, T)
    att, keys = tower_attention_keys(tower, images)
    heads = block.attn.num_heads
    torch.testing.assert_close(att, weights[:, :, 0, 1:].reshape(2, heads, 4, 5), atol=1e-6, rtol=1e-5)
    width = block.attn.embed_dim
    k = F.linear(y, block.attn.in_proj_weight[width:2 * width], block.attn.in_proj_bias[width:2 * width])
    expected = k[:, 1:].reshape(2, 4, 5, heads, width // heads).permute(0, 3, 4, 1, 2)
    torch.testing.assert_close(keys, expected, atol=1e-6, rtol=1e-5)
    mask = FoundBackground(tower=tower)(images)
    torch.testing.assert_close(mask, found_background(att, keys, 0.3)[0])
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


@torch.no_grad()
def test_timm_guidance_attention(tmp_path):
    import timm
    from safetensors.torch import save_file

    from cliplab.dense.found import timm_attention_keys
    from cliplab.dense.guidance import timm_guidance

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    guidance = timm_guidance(path, arch="vit_tiny_patch16_224")
    seen = {}
    guidance.model.blocks[-1].register_forward_hook(lambda m, args, out: seen.__setitem__("x", args[0]))
    images = torch.randn(1, 3, 32, 48)
    att, keys = timm_attention_keys(guidance, images)
    attn = guidance.model.blocks[-1].attn
    qkv = attn.qkv(guidance.model.blocks[-1].norm1(seen["x"]))  # written out from the block's input
    heads, width = attn.num_heads, qkv.shape[-1] // 3
    q = qkv[..., :width].reshape(1, -1, heads, width // heads).transpose(1, 2)
    k = qkv[..., width:2 * width].reshape(1, -1, heads, width // heads).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
    torch.testing.assert_close(att, weights[:, :, 0, 1:].reshape(1, heads, 2, 3), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(keys, k[:, :, 1:].transpose(2, 3).reshape(1, heads, -1, 2, 3))
    assert FoundBackground(guidance=guidance)(images).shape == (1, 2, 3)
