"""``cliplab anomaly``: scores and map PNGs equal the API's, a saved Bayes-PFL reloads to the same scores, bad input
is one line before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app

DATA = "/work/shared/datasets"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from cliplab.data.anomaly import anomaly_set, write_anomaly_set

    if not (Path(DATA) / "dtd_sample" / "labels.json").is_file():
        pytest.skip("dtd_sample not available")
    folder = tmp_path_factory.mktemp("anomaly")
    write_anomaly_set(anomaly_set("test", root=DATA, size=48, limit=2, per_source=1), folder)
    return sorted((folder / "images").glob("*.png"))


def test_winclip_scores_and_maps_equal_the_api(images, tmp_path):
    from cliplab.models import load_model
    from cliplab.regions.anomaly import PromptBaseline, patch_features

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["anomaly", *map(str, images), "--model", "tiny", "--method", "winclip",
                                      "-o", str(out), "-q", "--data-root", DATA])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "scores.json").read_text())["images"]
    backbone = load_model("tiny")
    pics = [Image.open(p).convert("RGB") for p in images]
    expected = PromptBaseline(backbone).score(patch_features(backbone, pics), 224)
    assert [r["score"] for r in rows] == pytest.approx(expected.scores.tolist(), abs=1e-6)
    for row, pic, want in zip(rows, pics, expected.maps):
        heat = Image.open(row["map"])
        assert heat.size == pic.size
        assert row["map_max"] == pytest.approx(float(want.max()), abs=1e-6)
        assert abs(np.asarray(heat).max() / 255 - float(want.max())) < 0.02


def test_bayes_pfl_trains_saves_and_reloads(images, tmp_path):
    common = [*map(str, images), "--model", "tiny", "-q", "--data-root", DATA, "--aux-size", "32", "--samples", "2"]
    first = CliRunner().invoke(app, ["anomaly", *common, "--epochs", "1", "--save", str(tmp_path / "pfl"),
                                     "--evaluate", "-o", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    metrics = json.loads((tmp_path / "a" / "scores.json").read_text())["synthetic_test"]
    assert 0 <= metrics["aupro"] <= 1 and metrics["test_images"] == 100 and "pixel AUROC" in first.output
    again = CliRunner().invoke(app, ["anomaly", *common, "--weights", str(tmp_path / "pfl"), "-o", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    a = json.loads((tmp_path / "a" / "scores.json").read_text())["images"]
    b = json.loads((tmp_path / "b" / "scores.json").read_text())["images"]
    assert [r["score"] for r in a] == [r["score"] for r in b]
    assert all(0.0 <= r["score"] <= 1.0 for r in a)


@pytest.mark.parametrize("args, words", [
    ([], "give image files"),
    (["missing.png"], "image not found"),
    (["{img}", "--method", "magic"], "--method must be"),
    (["{img}", "--object", " "], "--object must name"),
    (["{img}", "--weights", "{tmp}"], "no saved Bayes-PFL"),
])
def test_bad_input_is_one_line(images, tmp_path, args, words):
    args = [a.format(img=images[0], tmp=tmp_path) for a in args]
    result = CliRunner().invoke(app, ["anomaly", *args, "--model", "no-such-model-is-loaded"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], result.output
