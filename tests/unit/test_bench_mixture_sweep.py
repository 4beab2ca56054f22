"""benchmarks/mixture_sweep.py: every run has the same budget, the mixtures are the weights the write-up names, and a
run name is what the robustness JSON and the fit call it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(BENCH))
    try:
        import mixture_sweep
    finally:
        sys.path.remove(str(BENCH))
    return mixture_sweep


def test_runs_share_one_budget_and_differ_only_in_their_source(sweep):
    from dataclasses import asdict

    from cliplab.train.mixture import is_mixture, read_mixture

    configs = {run: sweep.run_config(run, 100, 64) for run in sweep.RUNS}
    sources = {run: config.source for run, config in configs.items()}
    budgets = [{k: v for k, v in asdict(c).items() if k != "source"} for c in configs.values()]
    assert all(b == budgets[0] for b in budgets)
    assert budgets[0]["steps"] == 100 and budgets[0]["batch_size"] == 64 and budgets[0]["warmup"] == 10
    assert budgets[0]["model"] == "cliplab-rn-32px" and budgets[0]["init_model"] is None
    assert sources["cifar10"] == "cifar10" and sources["coco"] == "coco"
    assert is_mixture(sources["mix75"]) and read_mixture(sources["mix75"]) == [("cifar10", 0.75), ("coco", 0.25)]
    assert read_mixture(sources["mix25"]) == [("cifar10", 0.25), ("coco", 0.75)]


def test_run_folders_and_labels(sweep):
    assert sweep.run_folder("cifar10", 100, 64) != sweep.run_folder("cifar10", 50, 64)
    assert sweep.run_folder("coco", 100, 64).parent == sweep.run_folder("cifar10", 100, 64).parent
    assert sweep.run_label("mix75") == "sweep-mix75" and sweep.run_label(sweep.RECIPE) == "recipe:cifar10-signal"
