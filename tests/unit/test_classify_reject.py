"""``cliplab classify --reject``: open-set labels from a threshold at a TPR on calibration images."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.cli.classify import _reject_scores
from cliplab.ood import threshold_at_tpr


class _Head:
    weights_ = np.eye(2)

    def logits(self, X):
        return np.asarray(X) * 10


def test_synthetic_threshold_is_the_hand_computed_one():
    # MCM of (cos 1, 0) rows is e/(e+1); of (0.6, 0.8) it is softmax((0.6, 0.8))[1]; 20 calibration images,
    # TPR 0.95 keeps 19: the threshold is the 19th highest score, the lowest of the 19 confident rows.
    X = np.array([[1.0, 0.0]] * 19 + [[0.6, 0.8]])
    scores = _reject_scores(_Head(), X, "mcm", weights=_Head.weights_)
    assert scores[0] == pytest.approx(np.e / (np.e + 1))
    assert scores[-1] == pytest.approx(1 / (1 + np.exp(-0.2)))
    assert threshold_at_tpr(scores, 0.95) == pytest.approx(np.e / (np.e + 1))
    assert np.mean(scores >= threshold_at_tpr(scores, 0.95)) == 0.95
    assert _reject_scores(_Head(), X, "energy")[0] == pytest.approx(np.log(np.exp(10) + 1))


def _folder(root, n=20):
    rng = np.random.default_rng(1)
    root.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


@pytest.mark.parametrize("score", ["mcm", "msp"])
def test_cli_rejects_exactly_the_expected_fraction_of_calibration_images(tmp_path, score):
    images = _folder(tmp_path / "cal")
    out = tmp_path / "pred.json"
    base = ["classify", str(images), "--labels", "cat,dog,car", "--model", "tiny", "-q", "--workers", "0",
            "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, base + ["--reject", "--reject-score", score, "--reject-calibration", str(images),
                                             "--reject-tpr", "0.95", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert len(rows) == 20
    assert sum(row["prediction"] == "unknown" for row in rows) == 1  # 95% of the calibration images are kept
    threshold = rows[0]["threshold"]
    assert threshold == pytest.approx(sorted(row["score"] for row in rows)[1])
    assert all((row["prediction"] == "unknown") == (row["score"] < threshold) for row in rows)
    assert all(row["tpr"] == 0.95 and row["reject_score"] == score for row in rows)
    assert "1 of 20 image(s) unknown" in result.output and "unknown (" in result.output
    csv_out = tmp_path / "pred.csv"
    result = CliRunner().invoke(app, base + ["--reject", "--reject-score", score, "--reject-calibration", str(images),
                                             "--reject-tpr", "0.9", "-o", str(csv_out)])
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(csv_out.open()))
    assert sum(r["prediction"] == "unknown" for r in table) == 2 and float(table[0]["tpr"]) == 0.9
    assert {"score", "threshold", "reject_score"} <= set(table[0])


def test_reject_without_calibration_is_one_clear_error(tmp_path):
    images = _folder(tmp_path / "x", 2)
    result = CliRunner().invoke(app, ["classify", str(images), "--labels", "a,b", "--model", "tiny", "--reject"])
    assert result.exit_code != 0
    assert "--reject-calibration" in result.output and "Traceback" not in result.output
