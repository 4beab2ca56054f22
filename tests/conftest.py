"""Shared fixtures: the tiny backbone, real data locations, isolated caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATASETS = Path(os.environ.get("CLIPLAB_DATA", SHARED / "datasets"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own default cache folder."""
    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path / "cliplab-cache"))


@pytest.fixture(scope="session")
def tiny():
    from cliplab.models import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATASETS / "cifar10").is_dir():
        pytest.skip(f"real datasets not found at {DATASETS}")
    return DATASETS
