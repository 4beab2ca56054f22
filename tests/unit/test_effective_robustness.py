"""Effective robustness (paper 22): the logit-linear trend of OOD vs ID accuracy and each run's residual."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit
from scipy.special import logit as scipy_logit

from cliplab.analysis.effective_robustness import (
    Run,
    effective_robustness,
    fit_trend,
    logit,
    plot_effective_robustness,
    read_robustness_json,
    read_runs,
)
from cliplab.errors import CliplabError


def test_runs_on_the_line_have_zero_effective_robustness():
    ids = np.array([0.3, 0.45, 0.6, 0.8, 0.92])
    oods = expit(0.7 * scipy_logit(ids) - 0.4)  # exactly on logit(ood) = 0.7 logit(id) - 0.4
    runs = [Run(f"r{i}", a, b) for i, (a, b) in enumerate(zip(ids, oods, strict=True))]
    result = effective_robustness(runs)
    assert result["fit"]["slope"] == pytest.approx(0.7) and result["fit"]["intercept"] == pytest.approx(-0.4)
    for row in result["runs"]:
        assert row["effective_robustness"] == pytest.approx(0.0, abs=1e-12)
        assert row["logit_residual"] == pytest.approx(0.0, abs=1e-12)


def test_fit_is_least_squares_on_the_logit_scale():
    rng = np.random.default_rng(0)
    ids, oods = rng.uniform(0.2, 0.9, 8), rng.uniform(0.1, 0.7, 8)
    runs = [Run(f"r{i}", a, b) for i, (a, b) in enumerate(zip(ids, oods, strict=True))]
    slope, intercept = np.polyfit(scipy_logit(ids), scipy_logit(oods), 1)
    fit = fit_trend(runs)
    assert fit.slope == pytest.approx(slope) and fit.intercept == pytest.approx(intercept)
    np.testing.assert_allclose(logit(ids), scipy_logit(ids))
    result = effective_robustness(runs)
    expected = oods - expit(slope * scipy_logit(ids) + intercept)
    np.testing.assert_allclose([r["effective_robustness"] for r in result["runs"]], expected, atol=1e-12)
    residual = scipy_logit(oods) - (slope * scipy_logit(ids) + intercept)
    np.testing.assert_allclose([r["logit_residual"] for r in result["runs"]], residual, atol=1e-10)
    assert abs(sum(r["logit_residual"] for r in result["runs"])) < 1e-10  # least squares with an intercept


def test_baseline_subset_fits_only_those_runs():
    runs = [Run("a", 0.4, expit(scipy_logit(0.4) - 1)), Run("b", 0.7, expit(scipy_logit(0.7) - 1)),
            Run("robust", 0.5, 0.5)]
    result = effective_robustness(runs, baseline=["a", "b"])
    assert result["fit"]["slope"] == pytest.approx(1.0) and result["fit"]["intercept"] == pytest.approx(-1.0)
    robust = result["runs"][2]
    assert not robust["baseline"] and robust["effective_robustness"] == pytest.approx(0.5 - expit(-1.0))
    with pytest.raises(CliplabError, match="names no run"):
        effective_robustness(runs, baseline=["a", "zzz"])
    with pytest.raises(CliplabError, match="at least 2 runs"):
        effective_robustness([Run("a", 0.5, 0.4), Run("b", 0.5, 0.3)])


def _robustness_json(path, clean, cells, model="m"):
    record = {"task": "robustness_corruptions", "model": model, "metrics": {},
              "cliplab": {"method": "zeroshot", "cells": [{"corruption": "clean", "severity": 0, "acc1": clean}]
                          + [{"corruption": c, "severity": s, "acc1": a} for c, s, a in cells]}}
    path.write_text(json.dumps(record))
    return path


def test_reads_robustness_json_and_csv(tmp_path):
    one = _robustness_json(tmp_path / "one.json", 0.8, [("blur", 1, 0.6), ("blur", 3, 0.4), ("noise", 1, 0.5)])
    run = read_robustness_json(one)
    assert run.name == "m" and run.id_acc == 0.8 and run.ood_acc == pytest.approx(0.5)
    assert read_robustness_json(one, "blur").ood_acc == pytest.approx(0.5)
    assert read_robustness_json(one, "blur:3").ood_acc == pytest.approx(0.4)
    with pytest.raises(CliplabError, match="no cell 'fog'"):
        read_robustness_json(one, "fog")
    (tmp_path / "runs.csv").write_text("name,id,ood\nx,75,50\ny,0.6,0.3\n")
    runs = read_runs([one, tmp_path / "runs.csv", one])
    assert [r.name for r in runs] == ["m", "x", "y", "m #2"]
    assert runs[1].id_acc == 0.75 and runs[1].ood_acc == 0.5
    (tmp_path / "bad.json").write_text(json.dumps({"task": "zeroshot"}))
    with pytest.raises(CliplabError, match="not a cliplab robustness result"):
        read_runs([tmp_path / "bad.json"])


def test_plot_is_written(tmp_path):
    runs = [Run("a", 0.4, 0.2), Run("b", 0.7, 0.45), Run("c", 0.55, 0.4)]
    path = plot_effective_robustness(effective_robustness(runs), tmp_path / "er.png", "title")
    assert path.stat().st_size > 1000


def test_registry_lists_each_analysis_with_its_paper_and_command():
    from cliplab.analysis.registry import analysis_entry, list_analyses, register_analysis

    found = {entry.name: (entry.paper, entry.command) for entry in list_analyses()}
    assert found["sce"] == (20, "cliplab analyse sce") and found["cab"] == (25, "cliplab analyse cab")
    assert found["effective-robustness"] == (22, "cliplab robustness-fit")
    assert analysis_entry("effective-robustness").function is effective_robustness
    assert analysis_entry("sce").summary.startswith("Schur complement entropy")
    with pytest.raises(CliplabError, match="registered twice"):
        register_analysis("sce", paper=20, command="x")(lambda: None)
    with pytest.raises(CliplabError, match="no analysis 'nosuch'"):
        analysis_entry("nosuch")
