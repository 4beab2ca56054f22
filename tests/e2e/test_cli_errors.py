"""Uncommon paths end in one red line naming the file, option or value (exit 2), never a traceback."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app

runner = CliRunner()


@pytest.fixture()
def photos(tmp_path):
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "photos" / "a.png")
    return tmp_path / "photos"


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output


@pytest.mark.parametrize("device, fragment", [("banana", "not a device name"), ("cuda", "no CUDA GPU"),
                                              ("cuda:7", "CUDA")])
def test_unusable_devices(photos, device, fragment):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the GPU")
    result = runner.invoke(app, ["classify", str(photos), "--labels", "a,b", "--model", "tiny", "--device", device])
    _one_line_error(result, f"--device {device}" if device != "banana" else "'banana'", fragment)


@pytest.mark.parametrize("content", [b"\x80\x02garbage" * 50, b"PK\x03\x04" + b"\x00" * 100, b""])
def test_a_garbage_weights_file_is_one_line_without_unsafe_advice(photos, tmp_path, content):
    weights = tmp_path / "model.pt"
    weights.write_bytes(content)
    result = runner.invoke(app, ["classify", str(photos), "--labels", "a,b", "--model", str(weights)])
    _one_line_error(result, "model.pt", "not a readable weights file")
    assert "weights_only=False" not in result.output and "pickle.load" not in result.output


def test_default_top_k_says_nothing_when_fewer_labels(photos):
    result = runner.invoke(app, ["classify", str(photos), "--labels", "a,b", "--model", "tiny", "-q"])
    assert result.exit_code == 0 and "capped" not in result.output


def test_a_dataset_without_labels_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import json

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "imgs" / "x.png")
    (tmp_path / "m.json").write_text(json.dumps([{"path": "imgs/x.png"}]))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("cliplab.models.load_model", no_model)
    result = runner.invoke(app, ["zeroshot", "--dataset", str(tmp_path / "m.json"), "--model", "tiny"])
    _one_line_error(result, "has no labels")


def test_embed_accepts_a_flat_folder_and_exports_ids(tmp_path):
    (tmp_path / "flat").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / "flat" / f"p{i}.png")
    (tmp_path / "flat" / "notes.txt").write_text("x")
    out = tmp_path / "f.npz"
    result = runner.invoke(app, ["embed", str(tmp_path / "flat"), "--model", "tiny", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "notes.txt: no image extension" in result.output
    saved = np.load(out)
    assert list(saved["item_ids"]) == ["p0.png", "p1.png", "p2.png"] and saved["features"].shape == (3, 64)
    assert (saved["labels"] == -1).all()
