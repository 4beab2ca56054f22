"""``cliplab segment`` and ``cliplab segment-eval`` end to end on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app

runner = CliRunner()


def test_segment_writes_labels_overlay_and_areas(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    rng = np.random.default_rng(0)
    paths = []
    for k, size in enumerate([(50, 70), (33, 33)]):
        path = tmp_path / f"img{k}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", *paths, "--labels", "cat,dog,grass", "--model", "tiny",
                                 "--background-threshold", "0.5", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    for k, size in enumerate([(50, 70), (33, 33)]):
        record = json.loads((out / f"img{k}.json").read_text())
        labels = np.asarray(Image.open(out / f"img{k}_labels.png"))
        assert labels.shape == size and record["size"] == [size[1], size[0]]
        assert record["class_names"] == ["cat", "dog", "grass", "background"]
        counts = np.bincount(labels.ravel(), minlength=4)
        assert [record["areas"][n]["pixels"] for n in record["class_names"]] == counts.tolist()
        overlay = Image.open(out / f"img{k}_overlay.png")
        assert overlay.size[1] >= size[0] and overlay.size[0] > size[1]  # the legend sits to the right
    assert f"json: {out / 'img0.json'}" in result.output


def test_segment_refuses_an_unknown_method_before_loading():
    result = runner.invoke(app, ["segment", "x.png", "--labels", "a", "--method", "maskclp", "--model", "tiny"])
    assert result.exit_code != 0 and "unknown segmentation method 'maskclp'" in result.output


def test_segment_eval_on_mosaic(tmp_path, data_root):
    out = tmp_path / "res"
    result = runner.invoke(app, ["segment-eval", "--dataset", "mosaic", "--mosaic-count", "3", "--model", "tiny",
                                 "--data-root", str(data_root), "-o", str(out), "--grid", "2", "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "segment_maskclip_mosaic_test.json").read_text())
    assert record["items"] == 3 and record["weights"] == "random" and record["settings"]["keep_size"]
    ious = [row["IoU"] for row in record["per_class"].values() if row["IoU"] is not None]
    assert record["mIoU"] == pytest.approx(sum(ious) / len(ious), abs=1e-12)
    assert sum(row["truth_pixels"] for row in record["per_class"].values()) == 3 * 64 * 64
    assert (out / "segment_maskclip_mosaic_test.png").is_file()
    assert "mIoU" in result.output


def test_segment_with_dinoiser_and_method_params(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(path), "--labels", "cat,dog", "--method", "dinoiser", "--param",
                                 "guidance_layer=0", "--param", "gamma=0.5", "--model", "tiny", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "a.json").read_text())
    assert record["method"] == "dinoiser" and record["params"]["gamma"] == 0.5
    assert record["params"]["guidance_layer"] == 0 and record["params"]["guidance"] == "clip"
    bad = runner.invoke(app, ["segment", str(path), "--labels", "cat", "--method", "dinoiser", "--param",
                              "gama=0.5", "--model", "tiny", "-o", str(out), "-q"])
    assert bad.exit_code != 0 and "takes no parameter 'gama'" in bad.output
