"""``hf-hub:`` names load from a Hugging Face cache laid out as huggingface_hub writes it (no network)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from cliplab.errors import WeightsUnavailableError
from cliplab.models import load_model
from cliplab.models.tiny import TINY_CONFIG, build_tiny_model


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


def test_hf_hub_model_from_cache_equals_the_saved_model(tmp_path):
    cache = _hub_cache(tmp_path, "acme/tiny-clip", seed=3)
    hub = load_model("hf-hub:acme/tiny-clip", cache_dir=str(cache), device="cpu")
    reference = load_model("tiny", seed=3, device="cpu")
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(hub.encode_images(images), reference.encode_images(images), atol=1e-6, rtol=0)
    torch.testing.assert_close(hub.encode_texts(["a red car"]), reference.encode_texts(["a red car"]), atol=1e-6,
                               rtol=0)
    assert hub.model_id.startswith("hf-hub:acme/tiny-clip:")


def test_hf_hub_model_missing_from_cache_offline(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("cliplab.models.loader.socket.create_connection", unreachable)
    with pytest.raises(WeightsUnavailableError, match="--model tiny"):
        load_model("hf-hub:acme/not-cached", cache_dir=str(tmp_path), device="cpu")
