"""CLIP-DINOiser's trained 3x3 conv: the loss against a hand-computed case, correlations against a written-out
loop, the layer -3 ln_2 features written out, training lowers the loss with CLIP frozen, saved and loaded
bit-identically, and dinoiser conv=FILE pools by the conv's correlations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cliplab.dense.base import DenseContext
from cliplab.dense.dinoiser_train import (
    GuidanceConv,
    clip_intermediate,
    conv_correlations,
    correlation_loss,
    guidance_targets,
    load_guidance_conv,
    save_guidance_conv,
    train_guidance_conv,
)
from cliplab.dense.registry import create_dense
from cliplab.errors import ModelLoadError
from cliplab.models.dense import dense_tower


@pytest.fixture(scope="module")
def vit():
    from test_segmentation_maskclip import _vit_backbone

    return _vit_backbone()


def test_loss_hand_computed():
    predicted = torch.tensor([[0.9, -0.3], [0.1, 0.6]]).reshape(1, 2, 1, 2)
    target = torch.tensor([[0.5, 0.1], [0.25, 0.2]]).reshape(1, 2, 1, 2)  # > 0.2: 1, 0, 1, 0 (0.2 is not above)
    eps = 1e-6
    expected = -(math.log(0.9) + math.log(1 - eps) + math.log(0.1) + math.log(1 - 0.6)) / 4  # -0.3 clamps to eps
    assert correlation_loss(predicted, target, 0.2).item() == pytest.approx(expected, rel=1e-5)


def test_conv_correlations_written_out():
    torch.manual_seed(0)
    conv = GuidanceConv(5, 4)
    feats = torch.randn(2, 5, 3, 4)
    out = F.conv2d(F.pad(feats, (1, 1, 1, 1), mode="replicate"), conv.conv.weight, conv.conv.bias)
    corrs = conv_correlations(conv, feats)
    for n in range(2):
        for p in range(12):
            for q in range(12):
                a, b = out[n, :, p // 4, p % 4], out[n, :, q // 4, q % 4]
                expected = (a @ b) / (a.norm() * b.norm())
                assert corrs[n, p, q // 4, q % 4].item() == pytest.approx(expected.item(), abs=1e-5)


@torch.no_grad()
def test_intermediate_is_ln2_after_attention(vit):
    tower = dense_tower(vit)
    images = torch.randn(2, 3, 16, 20)
    block = tower.blocks[0]  # layer -3 of 3 blocks is block 0: ln_2 of (input + its attention)
    x0 = tower.embed(images)
    y0 = x0 + block.ls_1(block.attn(block.ln_1(x0), block.ln_1(x0), block.ln_1(x0), need_weights=False)[0])
    expected = block.ln_2(y0)[:, 1:].reshape(2, 4, 5, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(clip_intermediate(tower, images, -3), expected, atol=1e-5, rtol=1e-4)


def _guidance(images):  # a fixed random "DINO": a 4x4-patch linear map
    weight = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    return F.conv2d(images, weight, stride=4)


def test_training_lowers_the_loss_saves_and_loads(vit, tmp_path):
    from PIL import Image

    frozen = {k: v.clone() for k, v in vit.model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()) for _ in range(6)]
    feats, targets = guidance_targets(vit, _guidance, images)
    torch.manual_seed(0)
    before = correlation_loss(conv_correlations(GuidanceConv(feats.shape[1], 16), feats), targets).item()
    conv = train_guidance_conv(vit, _guidance, images, dim=16, steps=30, lr=1e-2, batch_size=3, progress=False)
    after = correlation_loss(conv_correlations(conv, feats), targets).item()
    assert after < before
    for key, value in vit.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    path = save_guidance_conv(conv, tmp_path / "conv.safetensors", vit)
    loaded = load_guidance_conv(path, vit)
    for (k, a), (_, b) in zip(conv.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.layer == -3
    from cliplab.models import load_model

    with pytest.raises(ModelLoadError):
        load_guidance_conv(path, load_model("tiny"))

    # dinoiser conv=FILE pools by the conv's correlations: the same as an encoder giving the conv's outputs
    tower = dense_tower(vit)
    weights = F.normalize(torch.randn(vit.embed_dim, 4, generator=torch.Generator().manual_seed(0)), dim=0)
    with torch.no_grad():
        windows = torch.randn(2, 3, 16, 16)
        via_conv = create_dense("dinoiser", conv=str(path))
        via_conv.setup(DenseContext(vit, list("abcd"), weights, tower, None))
        encoder = create_dense("dinoiser", guidance="encoder")
        encoder.setup(DenseContext(vit, list("abcd"), weights, tower,
                                   lambda x: loaded(clip_intermediate(tower, x, -3))))
        torch.testing.assert_close(via_conv.patch_scores(windows), encoder.patch_scores(windows))
        clip = create_dense("dinoiser")
        clip.setup(DenseContext(vit, list("abcd"), weights, tower, None))
        assert not torch.allclose(via_conv.patch_scores(windows), clip.patch_scores(windows))


def test_cli_trains_a_conv_that_segment_uses(tmp_path):
    """cliplab dinoiser-train on two images with a timm ViT-Tiny file as the DINO; segment then runs with conv=FILE."""
    import numpy as np
    import timm
    from PIL import Image
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from cliplab.cli.app import app

    torch.manual_seed(0)
    dino = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    weights = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(weights))
    images = []
    for i in range(2):
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images[-1])
    conv = tmp_path / "conv.safetensors"
    result = CliRunner().invoke(app, ["dinoiser-train", *map(str, images), "--guidance", str(weights),
                                      "--guidance-arch", "vit_tiny_patch16_224", "-o", str(conv), "--steps", "2",
                                      "--layer", "-2", "--model", "tiny", "--quiet", "--cache-dir",
                                      str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert conv.is_file() and conv.with_suffix(".json").is_file()
    result = CliRunner().invoke(app, ["segment", str(images[0]), "--labels", "cat,dog", "--method", "dinoiser",
                                      "--param", f"conv={conv}", "--model", "tiny", "-o", str(tmp_path / "out"),
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert any((tmp_path / "out").iterdir())
