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


def test_background_conv_zero_weights_give_sigmoid_of_bias():
    from cliplab.dense.dinoiser_train import BackgroundConv

    conv = BackgroundConv(7)
    with torch.no_grad():
        conv.bkg_decoder.weight.zero_()
        conv.bkg_decoder.bias.fill_(-0.4)
    logits = conv(torch.randn(2, 7, 3, 5))
    assert logits.shape == (2, 1, 3, 5)
    torch.testing.assert_close(torch.sigmoid(logits), torch.full((2, 1, 3, 5), 1 / (1 + math.exp(0.4))))
    # the 1x1 conv reads the L2-normalised features: scaling a patch's features changes nothing
    feats = torch.randn(1, 7, 2, 2)
    torch.nn.init.normal_(conv.bkg_decoder.weight)
    torch.testing.assert_close(conv(feats * 5.0), conv(feats))
    expected = (F.normalize(feats, dim=1) * conv.bkg_decoder.weight.reshape(1, 7, 1, 1)).sum(1) + conv.bkg_decoder.bias
    torch.testing.assert_close(conv(feats)[:, 0], expected)


def test_background_loss_hand_computed():
    from cliplab.dense.dinoiser_train import background_loss

    logits = torch.tensor([2.0, -1.0, 0.5]).reshape(1, 1, 1, 3)
    target = torch.tensor([1.0, 1.0, 0.0]).reshape(1, 1, 1, 3)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = -(math.log(sig(2.0)) + math.log(sig(-1.0)) + math.log(1 - sig(0.5))) / 3
    assert background_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_apply_background_hand_case():
    from cliplab.dense.dinoiser import apply_background

    # 3 classes, 4 patches: best probabilities .995 (certain), .6, .5, .7; foreground logits +, -, -, 0
    scores = torch.tensor([[0.995, 0.6, 0.3, 0.2], [0.004, 0.3, 0.5, 0.1], [0.001, 0.1, 0.2, 0.7]]).reshape(1, 3, 1, 4)
    logits = torch.tensor([3.0, -2.0, -0.1, 0.0]).reshape(1, 1, 1, 4)
    # marked: uncertain (< .99) and sigmoid <= .5: patches 1, 2, 3 (sigmoid(0) = .5 is not foreground); 0 is certain
    out = apply_background(scores, logits, 0, 0.99)
    expected = scores.clone()
    expected[0, 0, 0, 1:] = 1.0
    torch.testing.assert_close(out, expected)
    assert out.argmax(1).reshape(-1).tolist() == [0, 0, 0, 0]
    zeroed = apply_background(scores, logits, None, 0.99)
    expected = scores.clone()
    expected[0, :, 0, 1:] = 0.0
    torch.testing.assert_close(zeroed, expected)
    # a foreground patch keeps its scores even when uncertain
    assert torch.equal(apply_background(scores, torch.full_like(logits, 5.0), 0, 0.99), scores)


def test_background_training_saves_loads_and_is_applied(vit, tmp_path):
    from PIL import Image

    from cliplab.dense.dinoiser import apply_background
    from cliplab.dense.dinoiser_train import (
        BackgroundConv,
        background_loss,
        foreground_targets,
        load_dinoiser_convs,
        train_background_conv,
    )
    from cliplab.dense.found import FoundBackground

    frozen = {k: v.clone() for k, v in vit.model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    images = [Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()) for _ in range(6)]
    tower = dense_tower(vit)
    found = FoundBackground(tower=tower, threshold=0.3)
    feats, targets = foreground_targets(vit, found, images)
    with torch.no_grad():  # the targets are 1 - FOUND's background of each centre crop on CLIP's last block
        batch = torch.stack([vit.preprocess(im) for im in images])
        torch.testing.assert_close(targets, 1.0 - found(batch)[:, None])
        torch.testing.assert_close(feats, clip_intermediate(tower, batch, -3))
    torch.manual_seed(0)
    before = background_loss(BackgroundConv(feats.shape[1])(feats), targets).item()
    bkg = train_background_conv(vit, images, steps=30, lr=1e-2, batch_size=3, progress=False)
    assert background_loss(bkg(feats), targets).item() < before
    for key, value in vit.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    only = save_guidance_conv(None, tmp_path / "bkg.safetensors", vit, background=bkg)
    conv, loaded = load_dinoiser_convs(only, vit)
    assert conv is None and loaded.found == {"source": "clip", "threshold": 0.3}
    assert torch.equal(loaded.bkg_decoder.weight, bkg.bkg_decoder.weight)
    with pytest.raises(ModelLoadError):
        load_guidance_conv(only, vit)
    both = save_guidance_conv(GuidanceConv(feats.shape[1], 8), tmp_path / "both.safetensors", vit, background=bkg)
    conv, loaded = load_dinoiser_convs(both, vit)
    assert conv is not None and loaded is not None

    # at inference: scores = the authors' rule applied to the same method's scores without the background conv
    weights = F.normalize(torch.randn(vit.embed_dim, 3, generator=torch.Generator().manual_seed(0)), dim=0)
    names = ["background", "cat", "dog"]
    with torch.no_grad():
        windows = torch.randn(2, 3, 16, 16)
        with_bkg = create_dense("dinoiser", conv=str(only), delta=0.99)
        with_bkg.setup(DenseContext(vit, names, weights, tower, None))
        plain = create_dense("dinoiser", conv=str(only), background=False)
        plain.setup(DenseContext(vit, names, weights, tower, None))
        base = plain.patch_scores(windows)
        logits = loaded(clip_intermediate(tower, windows, -3))
        torch.testing.assert_close(with_bkg.patch_scores(windows), apply_background(base, logits, 0, 0.99))
        no_class = create_dense("dinoiser", conv=str(only))
        no_class.setup(DenseContext(vit, ["cat", "dog", "bird"], weights, tower, None))
        plain.setup(DenseContext(vit, ["cat", "dog", "bird"], weights, tower, None))
        torch.testing.assert_close(no_class.patch_scores(windows),
                                   apply_background(plain.patch_scores(windows), logits, None, 0.99))


def test_cli_background_alone_then_segment(tmp_path):
    """dinoiser-train --background without --guidance (FOUND on tiny's own last block); segment uses the file."""
    import json

    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from cliplab.cli.app import app

    images = []
    for i in range(2):
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images[-1])
    out = tmp_path / "bkg.safetensors"
    common = ["--model", "tiny", "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, ["dinoiser-train", *map(str, images), "-o", str(out), "--steps", "2",
                                      "--background", "--layer", "-2", "--quiet", *common])
    assert result.exit_code == 0, result.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["background"] is True and meta["correlation"] is False
    result = CliRunner().invoke(app, ["segment", str(images[0]), "--labels", "cat,dog", "--method", "dinoiser",
                                      "--param", f"conv={out}", "--param", "guidance=identity",
                                      "--background-threshold", "0.5",
                                      "-o", str(tmp_path / "out"), *common])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["dinoiser-train", *map(str, images), "-o", str(out), *common])
    assert result.exit_code != 0 and "--background" in result.output
