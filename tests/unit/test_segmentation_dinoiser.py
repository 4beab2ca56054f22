"""CLIP-DINOiser's correlation pooling: identity guidance gives MaskCLIP, a constant map is preserved, the pool
equals a written-out sum, correlations below gamma are zeroed, and a timm guidance encoder read from a file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cliplab.dense.base import DenseContext
from cliplab.dense.dinoiser import guidance_correlations, weighted_pool
from cliplab.dense.registry import create_dense
from cliplab.errors import CliplabError, ModelLoadError
from cliplab.models.dense import dense_tower


@pytest.fixture(scope="module")
def vit():
    from test_segmentation_maskclip import _vit_backbone

    return _vit_backbone()


def _method(backbone, name, encoder=None, **params):
    weights = F.normalize(torch.randn(backbone.embed_dim, 4, generator=torch.Generator().manual_seed(0)), dim=0)
    method = create_dense(name, **params)
    method.setup(DenseContext(backbone, list("abcd"), weights, dense_tower(backbone), encoder))
    return method


@torch.no_grad()
def test_identity_correlation_gives_maskclip(vit):
    images = torch.randn(2, 3, 16, 24)
    plain = _method(vit, "maskclip").patch_scores(images)
    torch.testing.assert_close(_method(vit, "dinoiser", guidance="identity").patch_scores(images), plain)
    # an encoder whose patches are mutually orthogonal: correlations = I, the same as no pooling
    eye = lambda x: torch.eye(24)[:, :24].reshape(1, 24, 4, 6).expand(x.shape[0], -1, -1, -1)  # noqa: E731
    via_encoder = _method(vit, "dinoiser", eye, guidance="encoder").patch_scores(images)
    torch.testing.assert_close(via_encoder, plain, atol=1e-5, rtol=1e-4)
    clip_guided = _method(vit, "dinoiser", guidance="clip", guidance_layer=1).patch_scores(images)
    assert not torch.allclose(clip_guided, plain)  # real guidance changes the answer


def test_constant_map_is_preserved_and_pool_equals_the_sum():
    g = torch.Generator().manual_seed(1)
    guide = torch.randn(1, 8, 3, 5, generator=g)
    corrs = guidance_correlations(guide, 0.2)
    constant = torch.randn(1, 6, 1, 1, generator=g).expand(1, 6, 3, 5)
    torch.testing.assert_close(weighted_pool(constant, corrs), constant, atol=1e-5, rtol=1e-5)
    features = torch.randn(1, 6, 3, 5, generator=g)
    pooled = weighted_pool(features, corrs)
    flat = F.normalize(guide.flatten(2)[0], dim=0)  # (8, 15)
    for p in range(15):
        a = flat[:, p] @ flat  # cosines of patch p to every patch
        a = torch.where(a < 0.2, torch.zeros_like(a), a)
        expected = (features.flatten(2)[0] * a).sum(-1) / (a.sum() + 1e-6)
        torch.testing.assert_close(pooled.flatten(2)[0, :, p], expected, atol=1e-5, rtol=1e-5)
    assert (corrs[corrs != 0] >= 0.2).all() and torch.allclose(corrs.reshape(15, 15).diagonal(), torch.ones(15))


def test_guidance_choice_is_checked(vit):
    with pytest.raises(CliplabError, match="needs a guidance encoder"):
        _method(vit, "dinoiser", guidance="encoder")
    with pytest.raises(CliplabError, match="guidance must be one of"):
        _method(vit, "dinoiser", guidance="dino")


@torch.no_grad()
def test_timm_guidance_from_a_weights_file(tmp_path, vit):
    import timm
    from safetensors.torch import save_file

    from cliplab.dense.guidance import timm_guidance

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(ModelLoadError, match="not a vit_small_patch16_224 state dict"):
        timm_guidance(path, arch="vit_small_patch16_224")
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("blocks.11.")},
              str(partial))
    with pytest.raises(ModelLoadError, match="weights missing, e.g. blocks.11"):
        timm_guidance(partial, arch="vit_tiny_patch16_224")
    guide = timm_guidance(path, arch="vit_tiny_patch16_224")
    images = torch.randn(1, 3, 32, 48)
    feats = guide(images)
    assert feats.shape == (1, 192, 2, 3)
    # the keys of the last block, computed by hand from the same input
    mean, std = torch.tensor(guide._clip[0]), torch.tensor(guide._clip[1])
    x = ((images * std + mean) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    m = guide.model
    tokens = m.patch_drop(m._pos_embed(m.patch_embed(x)))
    tokens = m.norm_pre(tokens)
    for block in m.blocks[:-1]:
        tokens = block(tokens)
    last = m.blocks[-1]
    keys = last.attn.qkv(last.norm1(tokens))[..., 192:384][:, 1:]
    torch.testing.assert_close(feats, keys.transpose(1, 2).reshape(1, 192, 2, 3))
