"""Offline loads from a Hugging Face cache laid out as huggingface_hub writes it (no network).

``hf-hub:`` names and open_clip pretrained tags whose weights live on the hub are read from the
cache when huggingface.co is unreachable, without changing any process-wide setting.
"""

import json
import os

import open_clip
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from cliplab.errors import WeightsUnavailableError
from cliplab.models import load_model
from cliplab.models.tiny import TINY_CONFIG, build_tiny_model

FAKE_ARCH = "cliplab-test-tiny"
HALF = (0.5, 0.5, 0.5)


def _hub_cache(root, repo, seed):
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("a" * 40)
    state = {k: v.contiguous() for k, v in build_tiny_model(seed).state_dict().items()}
    save_file(state, snapshot / "open_clip_model.safetensors")
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG,
                                                                 "preprocess_cfg": {"size": 32}}))
    return root


@pytest.fixture()
def unreachable(monkeypatch):
    """huggingface.co does not answer (whatever this machine's network)."""
    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("cliplab.models.loader.socket.create_connection", refuse)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def fake_tag(monkeypatch):
    """An open_clip architecture (the tiny config) with one pretrained tag hosted at ``acme/tiny-clip``."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, FAKE_ARCH, json.loads(json.dumps(TINY_CONFIG)))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, FAKE_ARCH, {
        "acme": {"url": "", "hf_hub": "acme/tiny-clip/", "mean": HALF, "std": HALF, "interpolation": "bilinear",
                 "resize_mode": "squash"},
    })
    return FAKE_ARCH


@pytest.fixture()
def settings_log(monkeypatch):
    """Records os.environ and huggingface_hub's HF_HUB_OFFLINE at every open_clip create/load/tokenizer call."""
    seen = []

    def recording(fn):
        def wrapper(*args, **kwargs):
            seen.append((fn.__name__, dict(os.environ), constants.HF_HUB_OFFLINE))
            return fn(*args, **kwargs)
        return wrapper

    for name in ("create_model", "load_checkpoint", "get_tokenizer"):
        monkeypatch.setattr(open_clip, name, recording(getattr(open_clip, name)))
    return seen


def _same_outputs(a, b):
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.encode_images(images), b.encode_images(images), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.encode_texts(["a red car"]), b.encode_texts(["a red car"]), atol=1e-6, rtol=0)


def test_hf_hub_model_from_cache_equals_the_saved_model(tmp_path, unreachable):
    cache = _hub_cache(tmp_path, "acme/tiny-clip", seed=3)
    hub = load_model("hf-hub:acme/tiny-clip", cache_dir=str(cache), device="cpu")
    _same_outputs(hub, load_model("tiny", seed=3, device="cpu"))
    assert hub.model_id.startswith("hf-hub:acme/tiny-clip:")
    assert hub.benchmark_names() == ("hf-hub:acme/tiny-clip", "")


def test_hf_hub_model_missing_from_cache_offline(tmp_path, unreachable):
    with pytest.raises(WeightsUnavailableError, match="--model tiny"):
        load_model("hf-hub:acme/not-cached", cache_dir=str(tmp_path), device="cpu")


def test_offline_loads_change_no_process_settings(tmp_path, unreachable, fake_tag, settings_log):
    environ, offline = dict(os.environ), constants.HF_HUB_OFFLINE
    cache = _hub_cache(tmp_path, "acme/tiny-clip", seed=3)
    load_model("hf-hub:acme/tiny-clip", cache_dir=str(cache), device="cpu")
    load_model(f"{fake_tag}:acme", cache_dir=str(cache), device="cpu")
    with pytest.raises(WeightsUnavailableError):
        load_model("hf-hub:acme/not-cached", cache_dir=str(cache), device="cpu")
    called = {name for name, _, _ in settings_log}
    assert {"create_model", "load_checkpoint", "get_tokenizer"} <= called
    for name, env_then, offline_then in settings_log:
        assert offline_then == offline, name
        assert env_then == environ, name
    assert dict(os.environ) == environ
    assert constants.HF_HUB_OFFLINE is offline


def test_pretrained_tag_from_cache_offline_keeps_the_tag_preprocessing(tmp_path, unreachable, fake_tag):
    cache = _hub_cache(tmp_path, "acme/tiny-clip", seed=3)
    backbone = load_model(f"{fake_tag}:acme", cache_dir=str(cache), device="cpu")
    _same_outputs(backbone, load_model("tiny", seed=3, device="cpu"))
    assert backbone.model_id == f"open_clip:{fake_tag}:acme:qgelu0"
    assert backbone.benchmark_names() == (fake_tag, "acme")
    config = backbone.preprocess_config
    assert config["mean"] == list(HALF) and config["std"] == list(HALF)
    assert config["interpolation"] == "bilinear" and config["resize_mode"] == "squash" and config["size"] == [32, 32]


def test_pretrained_tag_missing_from_cache_offline(tmp_path, unreachable, fake_tag):
    with pytest.raises(WeightsUnavailableError, match=f"{fake_tag} \\(acme\\).*--model tiny"):
        load_model(f"{fake_tag}:acme", cache_dir=str(tmp_path), device="cpu")
