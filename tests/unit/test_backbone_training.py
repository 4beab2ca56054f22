"""Trainable encoders: on-device forwards with autograd, prompt learning from token embeddings, derive()."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CustomTextCLIP

from cliplab.errors import CliplabError, UnsupportedOperationError
from cliplab.models import BackboneInfo, load_model
from cliplab.models.openclip import OpenClipBackbone, transform_for
from cliplab.models.tiny import TINY_CONFIG

TEXTS = ["a photo of a cat", "a diagram of a bridge at night", "x"]
VISION = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32}


def _text_cfg(**overrides) -> dict:
    return {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, **overrides}


def _wrap(model: torch.nn.Module, name: str) -> OpenClipBackbone:
    """An open_clip model built in-test, with CLIP's BPE tokenizer at the model's context length."""
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    context_length = getattr(model, "context_length", None) or model.text.context_length
    info = BackboneInfo(name=name, pretrained=None, source="test", random_weights=True)
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    return OpenClipBackbone(model, transform_for(model), tokenizer, info, f"test:{name}", "cpu")


def _seeded(cls, **text_overrides) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(embed_dim=32, vision_cfg=VISION, text_cfg=_text_cfg(**text_overrides))


def _with_pad_mask(model: CustomTextCLIP) -> CustomTextCLIP:
    model.text.use_pad_mask = True  # TextTransformer option that CLIPTextCfg does not expose
    return model


# open_clip text towers with each pooling rule: CLIP class (argmax / eos / last) and CustomTextCLIP's
# TextTransformer (bidirectional with padding mask, CoCa-style appended class token)
OPEN_CLIP_TOWERS = {
    "clip-eos": lambda: _seeded(CLIP, pool_type="eos", eos_id=49407),
    "clip-last": lambda: _seeded(CLIP, pool_type="last"),
    "custom-last-bidirectional": lambda: _with_pad_mask(_seeded(CustomTextCLIP, pool_type="last",
                                                                no_causal_mask=True, pad_id=0)),
    "custom-cls-token": lambda: _seeded(CustomTextCLIP, embed_cls=True, pad_id=0),
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small random transformers CLIPModel saved with ``save_pretrained`` (no tokenizer files)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        projection_dim=16,
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf-clip") / "small-clip"
    CLIPModel(config).save_pretrained(str(path))
    return path


@pytest.fixture()
def fresh_tiny():
    return load_model("tiny", device="cpu")


def _assert_embeddings_path_matches(backbone) -> None:
    tokens = backbone.tokenize(TEXTS)
    embeddings = backbone.token_embeddings(tokens)
    width = embeddings.shape[-1]
    assert embeddings.shape == (len(TEXTS), tokens.shape[1], width)
    got = backbone.forward_text_embeddings(embeddings, tokens)
    torch.testing.assert_close(got, backbone.encode_texts(TEXTS), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, backbone.forward_texts(tokens), atol=1e-5, rtol=0)
    raw = backbone.forward_text_embeddings(embeddings, tokens, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(TEXTS)))


def test_text_tower_from_token_embeddings_equals_encode_texts_tiny(fresh_tiny):
    _assert_embeddings_path_matches(fresh_tiny)


@pytest.mark.parametrize("kind", sorted(OPEN_CLIP_TOWERS))
def test_text_tower_from_token_embeddings_equals_encode_texts_open_clip(kind):
    _assert_embeddings_path_matches(_wrap(OPEN_CLIP_TOWERS[kind](), kind))


def test_text_tower_from_token_embeddings_equals_encode_texts_hugging_face(hf_dir):
    _assert_embeddings_path_matches(load_model(str(hf_dir), device="cpu"))


def _learn_prompt(backbone, n_ctx: int = 4) -> torch.nn.Parameter:
    """One CoOp-style step: learnable context vectors replace the embeddings of placeholder words."""
    classnames = ["cat", "dog"]
    tokens = backbone.tokenize([" ".join(["X"] * n_ctx) + f" {name}." for name in classnames])
    base = backbone.token_embeddings(tokens)
    assert not base.requires_grad  # the model is frozen
    ctx = torch.nn.Parameter(0.02 * torch.randn(n_ctx, base.shape[-1]))
    prompts = torch.cat([base[:, :1], ctx.expand(len(classnames), -1, -1), base[:, 1 + n_ctx:]], dim=1)
    text = backbone.forward_text_embeddings(prompts, tokens)
    images = backbone.forward_images(torch.randn(3, 3, 32, 32))
    loss = torch.nn.functional.cross_entropy(100 * images @ text.T, torch.tensor([0, 1, 0]))
    loss.backward()
    return ctx


def test_gradients_reach_a_learnable_prompt_only(fresh_tiny, hf_dir):
    for backbone in (fresh_tiny, load_model(str(hf_dir), device="cpu")):
        ctx = _learn_prompt(backbone)
        assert ctx.grad is not None and ctx.grad.abs().sum() > 0
        assert all(param.grad is None for param in backbone.model.parameters())


def test_parameters_are_frozen_on_load(fresh_tiny, hf_dir):
    for backbone in (fresh_tiny, load_model(str(hf_dir), device="cpu")):
        assert not any(param.requires_grad for param in backbone.model.parameters())


def test_forward_images_keeps_autograd_and_device(fresh_tiny):
    pixels = torch.randn(2, 3, 32, 32, requires_grad=True)
    feats = fresh_tiny.forward_images(pixels)
    assert feats.shape == (2, fresh_tiny.embed_dim) and feats.device == fresh_tiny.device
    assert feats.requires_grad
    feats.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    torch.testing.assert_close(feats.detach(), fresh_tiny.encode_images(pixels.detach()), atol=1e-6, rtol=0)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)


def test_encode_methods_stay_cpu_and_gradient_free_on_a_trainable_copy(fresh_tiny):
    trainable = fresh_tiny.derive("ft")
    images = trainable.encode_images(torch.randn(2, 3, 32, 32))
    texts = trainable.encode_texts(TEXTS)
    for out in (images, texts, trainable.dense_features(torch.randn(1, 3, 32, 32))):
        assert out.device.type == "cpu" and not out.requires_grad and out.dtype == torch.float32


def test_derived_copy_trains_without_touching_the_original(fresh_tiny):
    original_state = {k: v.clone() for k, v in fresh_tiny.model.state_dict().items()}
    original_id = fresh_tiny.model_id
    derived = fresh_tiny.derive("ft")
    assert derived.model is not fresh_tiny.model and type(derived) is type(fresh_tiny)
    assert all(p.requires_grad for p in derived.model.parameters())
    assert not any(p.requires_grad for p in fresh_tiny.model.parameters())
    first_id = derived.model_id
    assert first_id != original_id and first_id.startswith(f"{original_id}+ft:")
    assert derived.model_id == first_id  # stable while the weights are
    assert fresh_tiny.derive("ft").model_id == first_id  # same weights, same id
    assert derived.benchmark_names() == ("tiny", "random+ft")

    optimizer = torch.optim.SGD(derived.model.parameters(), lr=0.1)
    images = derived.forward_images(torch.randn(4, 3, 32, 32))
    texts = derived.forward_texts(derived.tokenize(TEXTS[:2]))
    torch.nn.functional.cross_entropy(images @ texts.T * 10, torch.tensor([0, 1, 0, 1])).backward()
    optimizer.step()

    assert derived.model_id != first_id and derived.model_id.startswith(f"{original_id}+ft:")
    assert fresh_tiny.model_id == original_id
    for key, value in fresh_tiny.model.state_dict().items():
        assert torch.equal(value, original_state[key]), key
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(derived.encode_images(x), fresh_tiny.encode_images(x))


def test_derived_model_id_is_memoised_and_tracks_in_place_and_replaced_tensors(fresh_tiny, monkeypatch):
    from cliplab.models import backbone as backbone_module

    calls = []
    real = backbone_module.weights_digest
    monkeypatch.setattr(backbone_module, "weights_digest", lambda model: calls.append(1) or real(model))
    derived = fresh_tiny.derive("ft", trainable=False)
    assert not any(p.requires_grad for p in derived.model.parameters())
    ids = {derived.model_id for _ in range(3)}
    assert len(ids) == 1 and len(calls) == 1
    with torch.no_grad():
        derived.model.ln_final.bias.add_(0.5)
    assert derived.model_id not in ids and len(calls) == 2
    ids.add(derived.model_id)
    derived.model.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
    assert derived.model_id not in ids and len(calls) == 3


def test_derive_of_a_derived_copy_and_bad_tags(fresh_tiny):
    child = fresh_tiny.derive("a")
    grandchild = child.derive("b")
    assert grandchild.model_id.startswith(child.model_id + "+b:")
    with pytest.raises(ValueError):
        fresh_tiny.derive("bad:tag")


def test_deepcopy_shares_a_frozen_backbone_and_really_copies_a_derived_one(fresh_tiny):
    assert copy.deepcopy(fresh_tiny) is fresh_tiny
    derived = fresh_tiny.derive()
    twin = copy.deepcopy(derived)  # a trainable copy is never aliased (tests/unit/test_encoder_access.py)
    assert twin is not derived and twin.model is not derived.model and twin.model_id == derived.model_id


def test_text_tower_that_is_not_open_clip_raises_unsupported_naming_the_model():
    backbone = _wrap(OPEN_CLIP_TOWERS["custom-last-bidirectional"](), "custom-hf-text")

    class ForeignTower(torch.nn.Module):
        context_length = 16

        def forward(self, tokens):
            return torch.zeros(tokens.shape[0], 32)

    backbone.model.text = ForeignTower()
    tokens = backbone.tokenize(["a cat"])
    with pytest.raises(UnsupportedOperationError, match="custom-hf-text.*ForeignTower") as err:
        backbone.token_embeddings(tokens)
    assert isinstance(err.value, CliplabError)
    with pytest.raises(UnsupportedOperationError, match="custom-hf-text"):
        backbone.forward_text_embeddings(torch.zeros(1, 16, 32), tokens)


def test_tiny_config_is_the_clip_class():
    """The tiny backbone exercises the CLIP-class path (text tower attributes on the model itself)."""
    model = load_model("tiny", device="cpu").model
    assert isinstance(model, CLIP) and model.text_pool_type == "argmax"
    assert TINY_CONFIG["text_cfg"]["context_length"] == model.context_length
