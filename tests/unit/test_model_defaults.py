"""Default model resolution, identities for cache keys (preprocess_id, tokenizer_id) and CLIP_benchmark names."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torchvision import transforms

from cliplab.models import DEFAULT_MODEL_SPEC, BackboneInfo, load_model, resolve_model_spec
from cliplab.models import loader as loader_module
from cliplab.models.openclip import OpenClipBackbone, transform_for
from cliplab.models.tiny import TINY_CONFIG, build_tiny_model

FAKE_ARCH = "cliplab-test-tiny"


@pytest.fixture()
def fake_arch(monkeypatch):
    """The tiny config registered as an open_clip architecture (no pretrained tags) for this test only."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, FAKE_ARCH, json.loads(json.dumps(TINY_CONFIG)))
    return FAKE_ARCH


def _small_hf_dir(path, max_positions: int = 77, preprocessor: dict | None = None, tokenizer_vocab=None):
    """A random transformers CLIPModel folder; optionally a preprocessor config and a word-level tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        projection_dim=16,
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": max_positions},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    )
    CLIPModel(config).save_pretrained(str(path))
    if preprocessor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    if tokenizer_vocab is not None:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(tokenizer_vocab)}}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(
            str(path))
    return path


# --------------------------------------------------------------------------------------------
# one default model
# --------------------------------------------------------------------------------------------
def test_default_model_spec_is_vit_b_32_laion2b():
    assert DEFAULT_MODEL_SPEC == "ViT-B-32:laion2b_s34b_b79k"
    assert resolve_model_spec() == ("ViT-B-32", "laion2b_s34b_b79k")
    assert resolve_model_spec("ViT-B-32") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert resolve_model_spec(*DEFAULT_MODEL_SPEC.split(":")) == ("ViT-B-32", "laion2b_s34b_b79k")


def test_explicit_tag_wins():
    assert resolve_model_spec("ViT-B-32:openai") == ("ViT-B-32", "openai")
    assert resolve_model_spec("ViT-B-32", "openai") == ("ViT-B-32", "openai")
    assert resolve_model_spec("ViT-B-32", "random") == ("ViT-B-32", "random")


def test_fallbacks_openai_then_first_tag_then_none(fake_arch):
    assert "laion2b_s34b_b79k" not in open_clip.list_pretrained_tags_by_model("RN50")
    assert resolve_model_spec("RN50") == ("RN50", "openai")
    tags = open_clip.list_pretrained_tags_by_model("ViT-B-16-SigLIP")
    assert "openai" not in tags and "laion2b_s34b_b79k" not in tags
    assert resolve_model_spec("ViT-B-16-SigLIP") == ("ViT-B-16-SigLIP", tags[0])
    assert resolve_model_spec(fake_arch) == (fake_arch, None)


def test_non_arch_names_pass_through(tmp_path):
    assert resolve_model_spec("tiny") == ("tiny", None)
    assert resolve_model_spec("hf-hub:org/repo") == ("hf-hub:org/repo", None)
    assert resolve_model_spec(str(tmp_path)) == (str(tmp_path), None)


def test_load_model_without_arguments_loads_the_default(monkeypatch):
    calls = []
    monkeypatch.setattr(loader_module, "_load_arch", lambda arch, tag, *args: calls.append((arch, tag)))
    load_model()
    load_model("ViT-B-32")
    load_model("ViT-B-32:openai")
    assert calls == [("ViT-B-32", "laion2b_s34b_b79k")] * 2 + [("ViT-B-32", "openai")]


# --------------------------------------------------------------------------------------------
# preprocess_id from the preprocessing config
# --------------------------------------------------------------------------------------------
def _tiny_with(preprocess) -> OpenClipBackbone:
    model = build_tiny_model(0)
    info = BackboneInfo(name="tiny", pretrained=None, source="tiny", random_weights=True)
    return OpenClipBackbone(model, preprocess, open_clip.SimpleTokenizer(), info, "tiny-seed0", "cpu")


def test_preprocess_id_ignores_memory_addresses_in_the_transform():
    def make():
        model = build_tiny_model(0)
        return transforms.Compose([lambda image: image.convert("RGB"), transform_for(model)])

    first, second = make(), make()
    assert "0x" in repr(first) and repr(first) != repr(second)
    a, b = _tiny_with(first), _tiny_with(second)
    assert a.preprocess_id == b.preprocess_id
    assert "0x" not in a.preprocess_id
    config = json.loads(a.preprocess_id)
    assert config == a.preprocess_config
    assert config["size"] == 32 and config["resize_mode"] == "shortest" and config["pipeline"] == "open_clip"


def test_preprocess_id_changes_with_the_size():
    small = load_model("tiny", device="cpu")
    model = build_tiny_model(0)
    open_clip.set_model_preprocess_cfg(model, {**open_clip.get_model_preprocess_cfg(model), "size": 48})
    larger = OpenClipBackbone(model, transform_for(model), open_clip.SimpleTokenizer(), small.info, "tiny-seed0")
    assert larger.preprocess_config["size"] == 48
    assert larger.preprocess_id != small.preprocess_id


def test_hugging_face_preprocess_id_is_stable_and_follows_the_config(tmp_path):
    plain = _small_hf_dir(tmp_path / "plain")
    half = _small_hf_dir(tmp_path / "half", preprocessor={
        "size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    a, b = load_model(str(plain), device="cpu"), load_model(str(plain), device="cpu")
    assert a.preprocess_id == b.preprocess_id and "0x" not in a.preprocess_id
    other = load_model(str(half), device="cpu")
    assert other.preprocess_config["size"] == 40 and other.preprocess_config["mean"] == [0.5, 0.5, 0.5]
    assert other.preprocess_id != a.preprocess_id
    image = transforms.functional.to_pil_image(torch.rand(3, 50, 60))
    assert other.preprocess(image).shape == (3, 32, 32)


# --------------------------------------------------------------------------------------------
# tokenizer_id
# --------------------------------------------------------------------------------------------
def test_tokenizer_id_depends_on_context_length():
    a, b = _tiny_with(None), _tiny_with(None)
    short = _tiny_with(None)
    short._tokenizer = open_clip.SimpleTokenizer(context_length=32)
    assert a.tokenizer_id == b.tokenizer_id
    assert short.tokenizer_id != a.tokenizer_id
    assert a.tokenizer_id.startswith("SimpleTokenizer:ctx77:") and short.tokenizer_id.startswith(
        "SimpleTokenizer:ctx32:")


def test_tokenizer_id_of_hugging_face_tokenizers_hashes_content_not_path(tmp_path):
    words = ["a", "photo", "of", "cat"]
    one = load_model(str(_small_hf_dir(tmp_path / "one", tokenizer_vocab=words)), device="cpu")
    same = load_model(str(_small_hf_dir(tmp_path / "same", tokenizer_vocab=words)), device="cpu")
    other = load_model(str(_small_hf_dir(tmp_path / "other", tokenizer_vocab=[*words, "dog"])), device="cpu")
    shorter = load_model(str(_small_hf_dir(tmp_path / "shorter", max_positions=16, tokenizer_vocab=words)),
                         device="cpu")
    assert one.tokenizer_id == same.tokenizer_id
    assert len({one.tokenizer_id, other.tokenizer_id, shorter.tokenizer_id}) == 3
    assert one.tokenize(["a photo of cat"])[0, :4].tolist() == [2, 3, 4, 5]


# --------------------------------------------------------------------------------------------
# CLIP_benchmark names
# --------------------------------------------------------------------------------------------
def test_benchmark_names_of_a_local_checkpoint_are_arch_and_path(tmp_path, fake_arch, monkeypatch):
    state = {k: v.contiguous() for k, v in build_tiny_model(5).state_dict().items()}
    path = tmp_path / "tiny-ft.safetensors"
    save_file(state, str(path))
    backbone = load_model(str(path), arch=fake_arch, device="cpu")
    assert backbone.benchmark_names() == (fake_arch, str(path))
    monkeypatch.chdir(tmp_path)
    assert load_model("tiny-ft.safetensors", arch=fake_arch, device="cpu").benchmark_names() == (
        fake_arch, "tiny-ft.safetensors")
    assert load_model(fake_arch, pretrained=str(path), device="cpu").benchmark_names() == (fake_arch, str(path))
    config = tmp_path / "tiny-config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    by_config = load_model(str(path), config=config, device="cpu")
    model, pretrained = by_config.benchmark_names()
    assert model == by_config.info.extra["arch"] and model.startswith("tiny-config-") and pretrained == str(path)


def test_benchmark_names_of_other_sources(tmp_path, fake_arch):
    assert load_model("tiny", device="cpu").benchmark_names() == ("tiny", "random")
    assert load_model(fake_arch, pretrained="random", device="cpu").benchmark_names() == (fake_arch, "random")
    folder = tmp_path / "my-open-clip"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in build_tiny_model(1).state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG}))
    assert load_model(str(folder), device="cpu").benchmark_names() == ("my-open-clip", str(folder))
    hf = _small_hf_dir(tmp_path / "hf-clip")
    assert load_model(str(hf), device="cpu").benchmark_names() == (str(hf), str(hf))
