"""Encoder access on real architectures (random weights): ViT-B-32, RN50 and a Hugging Face CLIPModel folder.

Without prompts, through the per-block hook and with every projection weight reparametrised by the identity,
each tower equals the plain forward to 1e-6; one prompted training step moves the prompts only; the same
network as open_clip and as a transformers folder gives the same prompted embeddings.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from _hf_convert import to_hf_clip
from PIL import Image

from cliplab.errors import UnsupportedOperationError
from cliplab.models import BackboneInfo, load_model
from cliplab.models.openclip import OpenClipBackbone, tokenizer_for, transform_for
from cliplab.models.reparam import identity

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = ["a photo of a cat", "a diagram of a bridge at night"]
EXACT = 1e-6


def _open_clip(arch: str) -> OpenClipBackbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None).eval()
    info = BackboneInfo(name=arch, pretrained=None, source="open_clip", random_weights=True)
    return OpenClipBackbone(model, transform_for(model), tokenizer_for(arch, model), info, f"test:{arch}", "cpu")


@pytest.fixture(scope="module")
def vit():
    return _open_clip("ViT-B-32")


@pytest.fixture(scope="module")
def hf(vit, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "vit-b-32"
    to_hf_clip(vit.model.state_dict(), hidden_act="gelu").save_pretrained(str(folder))
    return load_model(str(folder), device="cpu")


def _images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _size(backbone) -> int:
    """The model's input resolution, read from its own preprocessing."""
    return int(backbone.preprocess(Image.new("RGB", (300, 300))).shape[-1])


def _check_exact(backbone, *, image_tower: bool) -> None:
    images, tokens = _images(_size(backbone)), backbone.tokenize(TEXTS)
    with torch.no_grad():
        plain_i, plain_t = backbone.forward_images(images), backbone.forward_texts(tokens)
        assert float((backbone.forward_texts(tokens, hook=lambda j, x: None) - plain_t).abs().max()) <= EXACT
        if image_tower:
            assert float((backbone.forward_images(images, hook=lambda j, x: None) - plain_i).abs().max()) <= EXACT
    derived = backbone.derive("id", trainable=False)
    names = derived.reparametrize(identity, targets=("linear", "attention", "projection"))
    assert any(n.endswith(("in_proj_weight", "q_proj.weight")) for n in names)
    with torch.no_grad():
        assert float((derived.forward_images(images) - plain_i).abs().max()) <= EXACT
        assert float((derived.forward_texts(tokens) - plain_t).abs().max()) <= EXACT


def _prompted_step(backbone) -> None:
    """One SGD step on two-layer deep prompts of both towers: they move, every weight has no gradient."""
    image_prompts = [torch.nn.Parameter(0.02 * torch.randn(2, backbone.image_tower().width)) for _ in range(2)]
    text_prompts = [torch.nn.Parameter(0.02 * torch.randn(2, backbone.text_tower().width)) for _ in range(2)]
    params = image_prompts + text_prompts
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    images = backbone.forward_images(_images(_size(backbone)), prompts=image_prompts)
    texts = backbone.forward_texts(backbone.tokenize(TEXTS), prompts=text_prompts)
    F.cross_entropy(50 * images @ texts.T, torch.tensor([0, 1])).backward()
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert all(p.grad is None for p in backbone.model.parameters())


def test_vit_b_32_towers_are_exact_and_train_prompts_only(vit):
    _check_exact(vit, image_tower=True)
    _prompted_step(vit)


def test_rn50_reparametrisation_is_exact_and_prompts_are_refused():
    rn50 = _open_clip("RN50")
    _check_exact(rn50, image_tower=False)
    with pytest.raises(UnsupportedOperationError, match="ModifiedResNet"):
        rn50.forward_images(_images(224), prompts=[torch.zeros(1, 64)])


def test_hugging_face_vit_b_32_towers_are_exact_and_agree_with_open_clip_under_prompts(vit, hf):
    _check_exact(hf, image_tower=True)
    images, tokens = _images(224), hf.tokenize(TEXTS)
    with torch.no_grad():  # the converted model is the same network: the prompted runs agree across formats
        prompts = [0.02 * torch.randn(3, 768, generator=torch.Generator().manual_seed(1)) for _ in range(3)]
        torch.testing.assert_close(hf.forward_images(images, prompts=prompts),
                                   vit.forward_images(images, prompts=prompts), atol=1e-4, rtol=0)
        text_prompts = [0.02 * torch.randn(3, 512, generator=torch.Generator().manual_seed(2)) for _ in range(3)]
        torch.testing.assert_close(hf.forward_texts(tokens, prompts=text_prompts),
                                   vit.forward_texts(tokens, prompts=text_prompts), atol=1e-4, rtol=0)
