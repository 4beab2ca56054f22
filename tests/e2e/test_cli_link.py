"""``cliplab link`` end to end (tiny model): clusters CSV, pairwise scores, one-line manifest errors."""

from __future__ import annotations

import csv

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, list(map(str, args)), catch_exceptions=False)


def test_link_writes_clusters_with_duplicates_together(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a_copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    manifest = tmp_path / "records.csv"
    manifest.write_text("path,caption,label\na.png,Mitsui Bussan,m\nb.png,Nippon Yusen,n\n"
                        "a_copy.png,Mitsui Bussan,m\nc.png,Kanebo Spinning,k\n")
    out = tmp_path / "out.csv"
    result = _invoke("link", manifest, "-t", "0.9999", "-k", "3", "-o", out, "--model", "tiny", "-q", "-j", "0")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["image"] for r in rows] == ["a.png", "b.png", "a_copy.png", "c.png"]
    assert rows[0]["cluster"] == rows[2]["cluster"] and rows[0]["cluster_size"] == "2"
    assert rows[2]["label"] == "m" and rows[1]["text"] == "Nippon Yusen"
    assert "recall 1.0000" in result.output

    result = _invoke("link", manifest, "-t", "1.5", "-o", out, "--model", "tiny", "-q", "-j", "0")
    assert result.exit_code == 0, result.output
    assert len({r["cluster"] for r in csv.DictReader(out.open())}) == 4 and "0 links" in result.output

    tuning = tmp_path / "tuning.csv"  # tuned on other records than the ones scored
    tuning.write_text("path,caption,label\nb.png,Nippon Yusen,n\nc.png,Nippon Yusen Kaisha,n\n"
                      "a.png,Kanebo,k\nb.png,Kanebo Spinning,k\n")
    result = _invoke("link", manifest, "-t", "0.9999", "-k", "3", "-o", out, "--tune", tuning, "--tune-epochs", "2",
                     "--model", "tiny", "-q", "-j", "0")
    assert result.exit_code == 0, result.output
    assert "tuned" in result.output and "recall 1.0000" in result.output  # exact copies still link


def test_link_bad_manifest_is_one_line_before_loading_a_model(tmp_path):
    manifest = tmp_path / "bad.csv"
    manifest.write_text("path,caption\na.png,x\nb.png,\n")
    result = _invoke("link", manifest, "--model", "no-such-model")
    assert result.exit_code != 0
    assert "bad.csv" in result.output and "row 3" in result.output and "no-such-model" not in result.output
    good = tmp_path / "good.csv"
    good.write_text("path,caption\na.png,x\n")
    result = _invoke("link", good, "--tune", manifest, "--model", "no-such-model")
    assert result.exit_code != 0 and "bad.csv" in result.output and "no-such-model" not in result.output
