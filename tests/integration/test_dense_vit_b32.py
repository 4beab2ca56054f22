"""Dense features of a real ViT-B/32 (random weights): the final path equals ``dense_features``, the value path
equals the last block under self-only attention, and sliding windows run through the cache."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cliplab.data import image_folder
from cliplab.features.dense import embed_dense
from cliplab.models import BackboneInfo
from cliplab.models.dense import DenseSpec, dense_tokens
from cliplab.models.openclip import OpenClipBackbone, transform_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def vit_b32():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    info = BackboneInfo(name="ViT-B-32", pretrained=None, source="open_clip", random_weights=True)
    return OpenClipBackbone(model, transform_for(model), open_clip.get_tokenizer("ViT-B-32"), info,
                            "test:vit-b-32-seed1234", "cpu")


def test_final_and_value_paths_on_vit_b32(vit_b32):
    x = torch.randn(2, 3, 224, 224)
    final = dense_tokens(vit_b32, x)
    assert final.shape == (2, 7, 7, 512)
    assert torch.equal(final.reshape(2, 49, 512), vit_b32.dense_features(x))
    visual = vit_b32.model.visual
    blocks = visual.transformer.resblocks
    self_only = torch.full((50, 50), float("-inf")).fill_diagonal_(0.0)
    with torch.no_grad():
        h = visual._embeds(x)
        for block in blocks[:-1]:
            h = block(h)
        out = blocks[-1](h, attn_mask=self_only)
        expected = F.normalize(visual.ln_post(out)[:, 1:] @ visual.proj, dim=-1)
    torch.testing.assert_close(dense_tokens(vit_b32, x, DenseSpec(path="value")).reshape(2, 49, 512), expected,
                               atol=1e-5, rtol=0)


def test_sliding_windows_through_the_cache_on_vit_b32(tmp_path, vit_b32):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (240, 330, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    data = image_folder(tmp_path / "imgs")
    spec = DenseSpec(input="sliding", path="value")
    out = embed_dense(vit_b32, data, tmp_path / "cache", spec=spec, batch_size=2, num_workers=0, progress=False)
    assert out.grid_shape == (7, 10) and out.key["stride"] == 96 and out.key["resolution"] == 224
    np.testing.assert_allclose(np.linalg.norm(out.tokens, axis=-1), 1.0, atol=1e-5)
    from cliplab.models.dense import dense_transform

    full = dense_transform(vit_b32, spec)(data.load_image(0))[None]
    assert full.shape[-2:] == (224, 320)
    left = dense_tokens(vit_b32, full[..., :224], DenseSpec(path="value"))[0]
    np.testing.assert_allclose(out.grid(0)[:, :3], left[:, :3].numpy(), atol=1e-5)  # columns only window 0 covers
    again = embed_dense(vit_b32, data, tmp_path / "cache", spec=spec, batch_size=2, num_workers=0, progress=False)
    assert again.computed == 0
