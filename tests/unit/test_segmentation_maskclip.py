"""MaskCLIP and the dense pipeline: a hand loop through the last block's value path, no query-key attention,
the strip upsampling against torch's bilinear interpolation, sliding-window averaging and the background rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cliplab.dense.inference import Segmenter, SegmentSettings, upsample_argmax
from cliplab.dense.registry import create_dense, describe_dense, list_dense
from cliplab.errors import CliplabError
from cliplab.models.dense import dense_tower


def _vit_backbone():
    """A random small open_clip ViT (3 blocks, patch 4, 16 px, 48-d) with random biases everywhere."""
    import open_clip
    from open_clip.model import CLIP

    from cliplab.models.backbone import BackboneInfo
    from cliplab.models.openclip import OpenClipBackbone, transform_for

    torch.manual_seed(3)
    model = CLIP(embed_dim=24, vision_cfg={"image_size": 16, "patch_size": 4, "width": 48, "layers": 3,
                                           "head_width": 16},
                 text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}).eval()
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    open_clip.set_model_preprocess_cfg(model, {"size": 16, "mode": "RGB", "mean": open_clip.OPENAI_DATASET_MEAN,
                                               "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic",
                                               "resize_mode": "shortest", "fill_color": 0})
    info = BackboneInfo(name="vit-test", source="test", pretrained=None, random_weights=True)
    return OpenClipBackbone(model, transform_for(model), open_clip.get_tokenizer("ViT-B-32"), info, "cpu")


@pytest.fixture(scope="module")
def vit():
    return _vit_backbone()


def hand_maskclip(model, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token by token through the last block's value projection, written from the weights (no module calls but
    the layer norms and the MLP)."""
    v = model.visual
    n = images.shape[0]
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(n, 1, -1), x], 1) + v.positional_embedding
    x = v.ln_pre(x)
    for block in v.transformer.resblocks[:-1]:
        x = block(x)
    last = v.transformer.resblocks[-1]
    width = x.shape[-1]
    w_v, b_v = last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:]
    w_o, b_o = last.attn.out_proj.weight, last.attn.out_proj.bias
    out = torch.zeros(n, weights.shape[1], x.shape[1] - 1)
    for i in range(n):
        for t in range(1, x.shape[1]):
            token = x[i, t]
            value = w_o @ (w_v @ last.ln_1(token) + b_v) + b_o
            y = token + value
            y = y + last.mlp(last.ln_2(y))
            feature = v.ln_post(y) @ v.proj
            cos = (feature / feature.norm()) @ weights
            out[i, :, t - 1] = torch.softmax(100 * cos, dim=0)
    side = int((x.shape[1] - 1) ** 0.5)
    return out.reshape(n, -1, side, side)


def _setup(backbone, classes=5, seed=0):
    from cliplab.dense.base import DenseContext

    g = torch.Generator().manual_seed(seed)
    weights = F.normalize(torch.randn(backbone.embed_dim, classes, generator=g), dim=0)
    method = create_dense("maskclip")
    method.setup(DenseContext(backbone, [f"c{i}" for i in range(classes)], weights, dense_tower(backbone)))
    return method, weights


@torch.no_grad()
def test_maskclip_equals_a_hand_loop_through_the_value_path(vit):
    method, weights = _setup(vit)
    images = torch.randn(2, 3, 16, 16)
    ours = method.patch_scores(images)
    assert ours.shape == (2, 5, 4, 4)
    torch.testing.assert_close(ours, hand_maskclip(vit.model, images, weights), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_query_and_key_weights_do_not_matter(vit):
    method, _ = _setup(vit)
    images = torch.randn(1, 3, 16, 16)
    before, plain = method.patch_scores(images), vit.model.encode_image(images)
    attn = vit.model.visual.transformer.resblocks[-1].attn
    saved = attn.in_proj_weight.detach().clone()
    try:
        width = attn.embed_dim
        attn.in_proj_weight[:2 * width].normal_()
        torch.testing.assert_close(method.patch_scores(images), before)
        assert not torch.allclose(vit.model.encode_image(images), plain)  # the ordinary forward does change
        attn.in_proj_weight[2 * width:].normal_()
        assert not torch.allclose(method.patch_scores(images), before)  # the value projection does matter
    finally:
        attn.in_proj_weight.copy_(saved)


@pytest.mark.parametrize("size,grid", [((37, 53), (5, 7)), ((64, 20), (3, 4)), ((5, 5), (8, 8))])
def test_strip_upsampling_equals_torch_bilinear(size, grid):
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(6, *grid, generator=g)
    expected = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
    out = upsample_argmax(scores, size, strip_floats=6 * size[1] * 3)  # 3 rows a strip
    np.testing.assert_array_equal(out, expected.argmax(0).numpy())
    low = upsample_argmax(scores, size, 0.7, 9, strip_floats=6 * size[1] * 2)
    below = expected.max(0).values < 0.7
    np.testing.assert_array_equal(low[below.numpy()], 9)
    np.testing.assert_array_equal(low[~below.numpy()], expected.argmax(0).numpy()[~below.numpy()])


@torch.no_grad()
def test_sliding_windows_average_per_patch(vit):
    seg = Segmenter(vit, "maskclip", ["a", "b", "c"], templates=["{}"], settings=SegmentSettings(stride=8))
    image = torch.randn(3, 24, 32)
    grid, windows = seg.score_grid(image)
    assert windows == 2 * 3 and grid.shape == (3, 6, 8)
    per_window = {(t, left): seg.method.patch_scores(image[None, :, t:t + 16, left:left + 16])[0]
                  for t in (0, 8) for left in (0, 8, 16)}
    # patch (row 2, col 3) lies in the windows starting at rows 0, 8 and columns 0, 8: each covers it
    covering = [s[:, 2 - t // 4, 3 - left // 4] for (t, left), s in per_window.items()
                if t <= 8 and t // 4 <= 2 < t // 4 + 4 and left // 4 <= 3 < left // 4 + 4]
    assert len(covering) == 4
    torch.testing.assert_close(grid[:, 2, 3], torch.stack(covering).mean(0))
    torch.testing.assert_close(grid[:, 0, 0], per_window[(0, 0)][:, 0, 0])  # one window covers a corner


def test_segment_sizes_background_and_areas(vit):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 45, 3), dtype=np.uint8))
    plain = Segmenter(vit, "maskclip", ["a", "b"], templates=["{}"]).segment(image)
    assert plain.labels.shape == (30, 45) and plain.input_size == (16, 24)  # shorter side at the model's 16 px
    assert sum(plain.areas.values()) == 30 * 45 and set(np.unique(plain.labels)) <= {0, 1}
    everything = Segmenter(vit, "maskclip", ["a", "b"], templates=["{}"], params={"temperature": 1.0},
                           settings=SegmentSettings(background_threshold=1.0)).segment(image)
    assert everything.class_names == ["a", "b", "background"] and (everything.labels == 2).all()
    nothing = Segmenter(vit, "maskclip", ["a", "b"], templates=["{}"],
                        settings=SegmentSettings(background_threshold=0.0)).segment(image)
    np.testing.assert_array_equal(nothing.labels, plain.labels)
    named = Segmenter(vit, "maskclip", ["background", "a", "b"], templates=["{}"], background_index=0,
                      params={"temperature": 1.0},  # probabilities below 1 (at 100 two classes saturate)
                      settings=SegmentSettings(background_threshold=1.0)).segment(image)
    assert named.class_names == ["background", "a", "b"] and (named.labels == 0).all()


def test_registry_names_and_errors():
    assert [name for name, _ in describe_dense()] == [e.name for e in list_dense()]
    assert "maskclip" in [e.name for e in list_dense()]
    with pytest.raises(CliplabError, match="unknown segmentation method 'maskclp'"):
        create_dense("maskclp")
    with pytest.raises(CliplabError, match="takes no parameter 'temp'; it takes temperature"):
        create_dense("maskclip", temp=1.0)


@torch.no_grad()
def test_the_vit_recipe_is_patch_4_on_32_px_and_runs_on_larger_grids():
    import open_clip
    from open_clip.model import CLIP

    from cliplab.models.backbone import BackboneInfo
    from cliplab.models.openclip import OpenClipBackbone, transform_for
    from cliplab.train.config import resolve_model_config
    from cliplab.train.recipes import recipe_config

    _, cfg = resolve_model_config(recipe_config("cifar10-vit-signal").model)
    assert cfg["vision_cfg"]["patch_size"] == 4 and cfg["vision_cfg"]["image_size"] == 32
    torch.manual_seed(0)
    model = CLIP(**cfg).eval()
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mean": open_clip.OPENAI_DATASET_MEAN,
                                               "std": open_clip.OPENAI_DATASET_STD})
    backbone = OpenClipBackbone(model, transform_for(model), open_clip.get_tokenizer("ViT-B-32"),
                                BackboneInfo(name="vit-recipe", source="test", pretrained=None,
                                             random_weights=True), "cpu")
    method, _ = _setup(backbone, classes=10)
    assert method.patch_scores(torch.randn(1, 3, 64, 96)).shape == (1, 10, 16, 24)  # positions resampled
