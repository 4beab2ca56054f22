"""`cliplab analyse sce|cab`, `cliplab robustness-fit` and the analyses in `cliplab methods`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.analysis.effective_robustness import Run, effective_robustness
from cliplab.analysis.sce import sce_score
from cliplab.cli.app import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, list(map(str, args)))


def _only_json(folder):
    found = list(folder.glob("*.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


@pytest.fixture()
def fruit(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("apple", "pear", "plum"):
        folder = tmp_path / "fruit" / cls
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return tmp_path / "fruit"


def test_sce_from_an_npz_equals_the_library(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 5))
    y = x + rng.standard_normal((80, 5))
    np.savez(tmp_path / "pairs.npz", x=x, y=y)
    result = _invoke("analyse", "sce", "--pairs", tmp_path / "pairs.npz", "--kernel", "cosine", "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    record = _only_json(tmp_path / "o")
    expected = sce_score(x, y, kernel="cosine")
    assert record["task"] == "sce" and record["cliplab"]["paper"] == 20
    assert record["metrics"]["sce"] == pytest.approx(expected.sce)
    assert record["metrics"]["explained_share"] == pytest.approx(expected.explained_share)
    assert f"{expected.sce:.3f}" in result.output


def test_sce_and_cab_on_a_dataset_with_the_tiny_model(fruit, tmp_path):
    result = _invoke("analyse", "sce", "--pairs", fruit, "--model", "tiny", "--templates", "imagenet7",
                     "--rff-dim", "4", "--workers", "0", "-o", tmp_path / "sce")
    assert result.exit_code == 0, result.output
    record = _only_json(tmp_path / "sce")
    assert record["cliplab"]["pairs"] == 18 and record["cliplab"]["rff_dim"] == 4
    assert 0 <= record["metrics"]["complement_share"] <= 1
    result = _invoke("analyse", "cab", "--dataset", fruit, "--model", "tiny", "--probes", "12", "--size", "0",
                     "--templates", "imagenet7", "--workers", "0", "-o", tmp_path / "cab")
    assert result.exit_code == 0, result.output
    summary = _only_json(tmp_path / "cab")["metrics"]
    assert summary["probes"] == 12
    assert summary["cab"] == (0.0 if summary["known"] else None)  # no distractor: CAB is 0


def _robustness_json(path, model, clean, corrupted):
    record = {"task": "robustness_corruptions", "model": model, "metrics": {},
              "cliplab": {"method": "zeroshot", "cells": [{"corruption": "clean", "severity": 0, "acc1": clean},
                                                          {"corruption": "blur", "severity": 1, "acc1": corrupted}]}}
    path.write_text(json.dumps(record))
    return path


def test_robustness_fit_writes_json_and_plot(tmp_path):
    files = [_robustness_json(tmp_path / f"{m}.json", m, a, b)
             for m, a, b in (("m1", 0.5, 0.3), ("m2", 0.7, 0.45), ("m3", 0.6, 0.5))]
    (tmp_path / "more.csv").write_text("name,id,ood\nm4,80,55\n")
    result = _invoke("robustness-fit", *files, tmp_path / "more.csv", "--fit-on", "m1,m2,m4", "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "o" / "effective_robustness.json").read_text())
    assert (tmp_path / "o" / "effective_robustness.png").stat().st_size > 1000
    runs = [Run("m1", 0.5, 0.3), Run("m2", 0.7, 0.45), Run("m3", 0.6, 0.5), Run("m4", 0.8, 0.55)]
    expected = effective_robustness(runs, ["m1", "m2", "m4"])
    assert [r["name"] for r in record["runs"]] == ["m1", "m2", "m3", "m4"]
    np.testing.assert_allclose([r["effective_robustness"] for r in record["runs"]],
                               [r["effective_robustness"] for r in expected["runs"]])
    assert "m3" in result.output and record["fit"]["baseline"] == ["m1", "m2", "m4"]


def test_one_line_errors(tmp_path):
    for args in (("analyse", "sce", "--pairs", tmp_path / "none.npz"),
                 ("analyse", "cab", "--dataset", tmp_path, "--attribute", "texture"),
                 ("robustness-fit", _robustness_json(tmp_path / "a.json", "a", 0.5, 0.4))):
        result = _invoke(*args)
        assert result.exit_code == 2, result.output
        assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


def test_methods_lists_the_analyses():
    result = _invoke("methods", "--family", "analysis")
    assert result.exit_code == 0, result.output
    for name, command in (("sce", "analyse sce"), ("cab", "analyse cab"), ("effective-robustness", "robustness-fit")):
        assert name in result.output and command in result.output


def test_listing_the_analyses_imports_no_heavy_library():
    import subprocess
    import sys

    slow = ("torch", "open_clip", "torchvision", "transformers", "scipy", "sklearn", "faiss", "matplotlib")
    code = ("import sys\nfrom cliplab.analysis.registry import list_analyses\nlist_analyses()\n"
            f"print(' '.join(m for m in {slow!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
