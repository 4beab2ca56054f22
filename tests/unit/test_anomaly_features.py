"""Patch features for anomaly maps (regions/anomaly.py): window cells against the model's own transform of each
window, dense tokens against models/dense.py, the prompt baseline's scores written out, bad input one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cliplab.errors import CliplabError
from cliplab.models import load_model
from cliplab.regions.anomaly import PromptBaseline, patch_features, upsample


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)) for _ in range(2)]
    return load_model("tiny"), images


def _embed(backbone, pil):
    return F.normalize(backbone.encode_images(backbone.preprocess(pil)[None]).float(), dim=-1)[0]


def test_window_cells_average_the_windows_covering_them(setup):
    backbone, images = setup
    features = patch_features(backbone, images, mode="windows", size=64)  # window 32, stride 16: 3 x 3 windows
    assert features.mode == "windows" and features.patches.shape == (2, 4, 4, 64)
    resized = images[1].resize((64, 64), Image.BICUBIC)

    def window(top, left):
        return _embed(backbone, resized.crop((left, top, left + 32, top + 32)))

    assert torch.allclose(features.patches[1, 0, 0], window(0, 0), atol=1e-5)
    expected = F.normalize(window(0, 0) + window(0, 16) + window(16, 0) + window(16, 16), dim=-1)
    assert torch.allclose(features.patches[1, 1, 1], expected, atol=1e-5)
    assert torch.allclose(features.global_[0], _embed(backbone, images[0]), atol=1e-6)


def test_dense_patches_are_models_dense_tokens(setup):
    from cliplab.models.dense import DenseSpec, dense_tokens, dense_transform

    backbone, images = setup
    features = patch_features(backbone, images, mode="dense", size=48)
    spec = DenseSpec(path="value", input="aspect", resolution=48)
    tokens = dense_tokens(backbone, dense_transform(backbone, spec)(images[0].resize((48, 48), Image.BICUBIC))[None],
                          spec)
    assert features.patches.shape == (2, 6, 6, 64)
    assert torch.allclose(features.patches[0], tokens[0], atol=1e-6)


def test_prompt_baseline_written_out(setup):
    backbone, images = setup
    features = patch_features(backbone, images, size=32)
    baseline = PromptBaseline(backbone, "texture")
    out = baseline.score(features, 32)
    t = baseline.text
    scale = backbone.logit_scale
    image = torch.exp(scale * features.global_ @ t[1]) / (torch.exp(scale * features.global_ @ t[0])
                                                          + torch.exp(scale * features.global_ @ t[1]))
    assert torch.allclose(out.scores, image, atol=1e-6)
    patch = torch.sigmoid(scale * (features.patches @ t[1] - features.patches @ t[0]))
    assert torch.allclose(out.maps, upsample(patch, 32), atol=1e-6)


@pytest.mark.parametrize("call", [
    lambda b, im: patch_features(b, [], mode="auto"),
    lambda b, im: patch_features(b, im, mode="tiles"),
    lambda b, im: patch_features(b, im, mode="windows", size=40),
    lambda b, im: PromptBaseline(b, " "),
])
def test_bad_input_is_one_line(setup, call):
    with pytest.raises(CliplabError) as info:
        call(*setup)
    assert "\n" not in str(info.value)
