"""Issue 22 item 5: a labelled folder without train/ and test/ gets a seeded, stratified, saved train/val/test
split on request (--holdout), so evaluate --shots and fewshot run on it; without it the error names what is
missing instead of telling the user to leave out a --split they never gave."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.data import load_dataset
from cliplab.data.splits import apply_holdout_record, holdout_record, holdout_splits
from cliplab.errors import DatasetError

SIZES = {"apple": 10, "pear": 7}


@pytest.fixture
def fruit(tmp_path):
    root = tmp_path / "fruit"
    for c, (name, n) in enumerate(SIZES.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (30 + 150 * c, 10 * i, 60)).save(root / name / f"{i}.png")
    return root


def test_holdout_is_stratified_disjoint_and_seeded(fruit):
    whole = load_dataset(fruit)
    parts = holdout_splits(whole, 0.2, seed=0)
    ids = {split: set(part.item_ids()) for split, part in parts.items()}
    assert set.union(*ids.values()) == set(whole.item_ids()) and sum(map(len, ids.values())) == len(whole)
    for c, n in enumerate(SIZES.values()):  # round(0.2 n) of each class to test, round(0.1 rest) to val (>= 1)
        n_test = round(0.2 * n)
        n_val = max(1, round(0.1 * (n - n_test)))
        assert int(np.sum(parts["test"].labels == c)) == n_test
        assert int(np.sum(parts["val"].labels == c)) == n_val
        assert int(np.sum(parts["train"].labels == c)) == n - n_test - n_val
    assert parts["test"].split == "test" and parts["test"].split_info["holdout"]["seed"] == 0
    again = holdout_splits(load_dataset(fruit), 0.2, seed=0)
    assert all(again[s].item_ids() == parts[s].item_ids() for s in parts)
    other = holdout_splits(whole, 0.2, seed=5)
    assert any(other[s].item_ids() != parts[s].item_ids() for s in parts)
    replayed = apply_holdout_record(whole, holdout_record(parts))
    assert all(replayed[s].item_ids() == parts[s].item_ids() for s in parts)
    with pytest.raises(DatasetError, match="strictly between 0 and 1"):
        holdout_splits(whole, 1.5)


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_without_holdout_the_error_names_the_missing_train_split(fruit):
    for args in (["evaluate", "--method", "ncm", "--dataset", fruit, "--shots", "1"],
                 ["fewshot", "--dataset", fruit, "--methods", "ncm"]):
        result = _run(*args, "--model", "tiny", "-q")
        text = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert "needs a train split" in text and "--holdout" in text and "leave out --split" not in text


def test_evaluate_and_fewshot_run_on_a_holdout_split_saved_and_recorded(fruit, tmp_path):
    out = tmp_path / "out"
    result = _run("evaluate", "--method", "ncm", "--dataset", fruit, "--holdout", "0.2", "--shots", "1",
                  "--model", "tiny", "-q", "-o", out, "--workers", "0")
    assert result.exit_code == 0, result.output
    [split_file] = (out / "splits").glob("holdout_*.json")
    saved = json.loads(split_file.read_text())
    assert saved["test_fraction"] == 0.2 and saved["seed"] == 0 and len(saved["splits"]["test"]) == 2 + 1
    [record] = [json.loads(p.read_text()) for p in out.glob("ncm_*.json")]
    block = record["cliplab"]
    assert block["split"] == "test" and block["split_info"]["holdout"]["file"] == str(split_file)
    assert block["split_info"]["holdout"]["test_fraction"] == 0.2
    # a rerun after an image was added repeats the saved parts (the new image is in none of them)
    Image.new("RGB", (16, 16)).save(fruit / "apple" / "new.png")
    test = load_dataset(fruit)
    parts = apply_holdout_record(test, saved)
    assert parts["test"].item_ids() == saved["splits"]["test"]
    few = _run("fewshot", "--dataset", fruit, "--holdout", "0.2", "--methods", "ncm", "--shots", "1", "--seeds", "1",
               "--model", "tiny", "-q", "-o", out, "--workers", "0")
    assert few.exit_code == 0, few.output
    assert json.loads(split_file.read_text()) == saved
