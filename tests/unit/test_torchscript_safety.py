"""TorchScript files run no code: their tensors are read without ``torch.jit.load`` (issue 21, item 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from open_clip.model import CLIP

from cliplab.errors import ModelLoadError
from cliplab.models import load_model
from cliplab.models.torchscript import read_torchscript_state

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]


class _Writer(torch.nn.Module):
    """A scripted module whose ``__setstate__`` (run by ``torch.jit.load``) writes ``AAAA`` to ``target``."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.weight = torch.nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.target, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.target = state[0]
        self.weight = state[1]
        self.training = state[2]
        written = torch.from_file(self.target, shared=True, size=4, dtype=torch.uint8)
        written.fill_(65)
        print(written.sum())


def _malicious(path: Path, target: Path) -> Path:
    torch.jit.save(torch.jit.script(_Writer(str(target))), str(path))
    return path


def _one_line_refusal(path: Path) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(path), device="cpu")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def test_malicious_torchscript_writes_nothing(tmp_path):
    # the payload is real: torch.jit.load runs it and the file appears
    witness = tmp_path / "witness.bin"
    torch.jit.load(str(_malicious(tmp_path / "witness.pt", witness)))
    assert witness.read_bytes() == b"AAAA"
    target = tmp_path / "pwned.pth"
    archive = _malicious(tmp_path / "model.pt", target)
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(archive), device="cpu")
    assert not target.exists()
    assert "run on load" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ModelLoadError):
        load_model("ViT-B-32", pretrained=str(archive), device="cpu")  # the --arch path reads the same way
    assert not target.exists()


class _Plain(torch.nn.Module):
    """Parameters, a persistent and a non-persistent buffer, a plain tensor attribute and a nested list."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)
        self.blocks = torch.nn.ModuleList([torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False)])
        self.register_buffer("kept", torch.arange(5, dtype=torch.int64))
        self.register_buffer("dropped", torch.ones(2), persistent=False)
        self.scale = torch.full((2,), 0.5, dtype=torch.float16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(self.proj(x) if x.shape[-1] == 3 else x)
        return x * self.scale.float() + self.dropped


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_tensors_equal_jit_state_dict(tmp_path, how):
    torch.manual_seed(0)
    module = _Plain().eval()
    compiled = torch.jit.script(module) if how == "script" else torch.jit.trace(module, torch.ones(1, 3))
    path = tmp_path / f"{how}.pt"
    torch.jit.save(compiled, str(path))
    expected = torch.jit.load(str(path)).state_dict()  # our own file: safe to run here, as the reference
    got = read_torchscript_state(path)
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_other_torchscript_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(_Plain()), str(path))
    assert "not an OpenAI CLIP checkpoint" in _one_line_refusal(path)


def test_openai_style_archive_loads_without_jit_load(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = CLIP(embed_dim=64, quick_gelu=True,
                 vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 64},
                 text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}).eval()
    traced = torch.jit.trace_module(model, {"encode_image": (torch.ones(1, 3, 32, 32),),
                                            "encode_text": (torch.zeros(1, 77, dtype=torch.long),)}, check_trace=False)
    path = tmp_path / "openai-style.pt"
    torch.jit.save(traced, str(path))

    def refuse(*_args, **_kwargs):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    backbone = load_model(str(path), device="cpu")
    assert backbone.info.source == "openai-jit" and backbone.info.quick_gelu
    for key, value in model.state_dict().items():
        if key != "attn_mask":
            assert torch.equal(backbone.model.state_dict()[key], value), key


def test_classes_without_declarations_keep_every_tensor(tmp_path):
    """Archives whose code text lists no __buffers__ (older TorchScript) still give their buffers."""
    import re
    import zipfile

    module = _Plain().eval()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    expected = torch.jit.load(str(path)).state_dict()
    stripped = tmp_path / "stripped.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(stripped, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith(".py"):
                data = re.sub(rb"\n\s+__buffers__ = \[[^\]]*\]", b"", data)
            target.writestr(info, data)
    got = read_torchscript_state(stripped)
    assert "kept" in got and set(expected) <= set(got)
