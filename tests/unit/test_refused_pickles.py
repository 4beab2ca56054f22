"""A refused pickle is one cliplab line, never torch's advice to load with weights_only=False (issue 21, item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cliplab.errors import ModelLoadError
from cliplab.models import load_model
from cliplab.models.checkpoints import load_error_line, scrub_unsafe_advice

SMALL_CFG = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 64},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}


def _mark(path: str) -> None:
    Path(path).write_text("executed")


class _Payload:
    """Unpickling this would call ``_mark(path)``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return _mark, (self.path,)


def _open_clip_folder(root: Path, witness: Path) -> Path:
    folder = root / "open_clip_folder"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL_CFG, "preprocess_cfg": {}}))
    torch.save({"visual.proj": _Payload(str(witness))}, folder / "open_clip_pytorch_model.bin")
    return folder


def _hf_folder(root: Path, witness: Path) -> Path:
    from transformers import CLIPConfig

    folder = root / "hf_folder"
    layer = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 64}
    CLIPConfig(text_config=layer, vision_config={**layer, "image_size": 32, "patch_size": 8},
               projection_dim=16).save_pretrained(folder)
    torch.save({"logit_scale": _Payload(str(witness))}, folder / "pytorch_model.bin")
    return folder


def _file(root: Path, witness: Path) -> Path:
    path = root / "weights.pt"
    torch.save({"positional_embedding": _Payload(str(witness))}, path)
    return path


@pytest.mark.parametrize("make", [_open_clip_folder, _hf_folder, _file], ids=["open_clip", "hf", "file"])
def test_refused_pickle_is_one_cliplab_line(tmp_path, make):
    witness = tmp_path / "witness"
    target = make(tmp_path, witness)
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(target), device="cpu")
    message = str(caught.value)
    assert not witness.exists()
    assert "\n" not in message and "weights_only" not in message and "arbitrary code" not in message
    assert message.startswith(str(target)) and "_mark" in message  # says what was refused


def test_scrub_keeps_the_reason_and_drops_the_advice(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"a": _Payload(str(tmp_path / "w"))}, path)
    with pytest.raises(Exception) as caught:
        torch.load(path, weights_only=True)
    raw = str(caught.value)
    assert "weights_only" in raw and "\n" in raw  # torch's own text: many lines with the unsafe advice
    for line in (scrub_unsafe_advice(f"prefix: {raw}"), load_error_line(caught.value)):
        assert "\n" not in line and "weights_only" not in line and "_mark" in line
    assert scrub_unsafe_advice("plain error") == "plain error"
