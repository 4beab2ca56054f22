"""``cliplab regions`` end to end on the tiny model, and its one-line answers to bad boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app

runner = CliRunner()


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def _boxes(tmp_path, data):
    path = tmp_path / "boxes.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_regions_scores_every_box(tmp_path, image, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    boxes = _boxes(tmp_path, {"img.png": [[0, 0, 60, 40], [10, 10, 20, 20]]})
    out = tmp_path / "scores.json"
    result = runner.invoke(app, ["regions", str(image), "--boxes", str(boxes), "--labels", "cat,dog,car",
                                 "--attributes", "red,furry", "--background-mix", "0.5", "--suppress", "0.9",
                                 "--model", "tiny", "--cache-dir", str(tmp_path / "cache"), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["weights"] == "random" and record["labels"] == ["cat", "dog", "car"]
    rows = record["images"][0]["boxes"]
    assert [r["box"] for r in rows] == [[0, 0, 60, 40], [10, 10, 20, 20]]
    for row in rows:
        assert set(row["attributes"]) == {"red", "furry"} and len(row["categories"]) == 3
        assert set(row["categories"]) <= {"cat", "dog", "car", "background"}
    assert "box 1 [10, 10, 20, 20]" in result.output


@pytest.mark.parametrize(("data", "message"), [
    ([[50, 0, 20, 10]], "lies outside"),
    ([], "has no boxes"),
    ("", "has no boxes"),
    ({"other.png": [[0, 0, 5, 5]]}, "img.png has no boxes in"),
])
def test_bad_boxes_are_one_line(tmp_path, image, data, message):
    boxes = _boxes(tmp_path, data)
    result = runner.invoke(app, ["regions", str(image), "--boxes", str(boxes), "--labels", "cat", "--model", "tiny"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in " ".join(result.output.split())
