"""``cliplab retrieval-tune`` on the tiny model: files, resume, before/after evaluation, bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app

runner = CliRunner()


def _split_folder(root, per_class=4):
    """root/{train,test}/{cat,truck}/k.png: random images, the trucks darker."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(("cat", "truck")):
            (root / split / name).mkdir(parents=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) // (2 if c else 1)
                Image.fromarray(pixels).save(root / split / name / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _split_folder(tmp_path_factory.mktemp("rt") / "imgs")


def _args(folder, out, *extra):
    return ["retrieval-tune", "-l", str(folder), "-o", str(out), "--model", "tiny", "--stage1-epochs", "2",
            "--stage2-epochs", "2", "--train-batch", "4", "--lr", "0.05", "--templates", "imagenet7",
            "--cache-dir", str(out.parent / "cache"), "--workers", "0", "-q", *extra]


def test_tunes_saves_and_evaluates_before_and_after(folder, tmp_path, tiny):
    from cliplab.train.retrieval_tune import load_tuned

    out = tmp_path / "out"
    result = runner.invoke(app, _args(folder, out, "--eval", str(folder)))
    assert result.exit_code == 0, result.output
    tuned = load_tuned(out)
    assert tuned.base_model_id == tiny.model_id and tuned.config["stage1_epochs"] == 2
    assert np.abs(tuned.image_adapter).max() > 0 and np.abs(tuned.text_adapter).max() > 0
    evaluation = json.loads((out / "evaluation.json").read_text())[str(folder)]
    assert set(evaluation) == {"zero-shot top-1", "image->image P@1", "image->image P@10"}
    assert all(0 <= v["before"] <= 1 and 0 <= v["after"] <= 1 for v in evaluation.values())
    assert "stage1: image adapter, ArcFace: 4 steps" in result.output
    assert "zero-shot top-1" in result.output and str(out) in result.output
    # a rerun resumes from train_state/ (both stages finished): the same adapters, nothing trained again
    again = runner.invoke(app, _args(folder, out))
    assert again.exit_code == 0, again.output
    assert np.array_equal(load_tuned(out).image_adapter, tuned.image_adapter)
    assert np.array_equal(load_tuned(out).text_adapter, tuned.text_adapter)


def test_evaluation_of_identity_adapters_is_unchanged(folder, tiny, tmp_path):
    from cliplab.cli.retrieval_tune import evaluate_pair
    from cliplab.data import load_dataset
    from cliplab.train.retrieval_tune import apply_adapters

    d = tiny.embed_dim
    same = apply_adapters(tiny, np.zeros((d, d), np.float32), np.zeros((d, d), np.float32))
    data = load_dataset(str(folder), split="test")
    scores = evaluate_pair(tiny, same, data, "imagenet7", tmp_path / "cache", workers=0)
    assert scores and all(before == after for before, after in scores.values())
    # and a real adapter changes the image side
    moved = apply_adapters(tiny, 0.5 * np.eye(d, dtype=np.float32)[::-1].copy(), None)
    assert not torch.equal(moved.encode_images(torch.zeros(1, 3, 32, 32)), tiny.encode_images(torch.zeros(1, 3, 32,
                                                                                                          32)))


def test_bad_input_is_one_line_before_the_model_loads(folder, tmp_path):
    unlabelled = tmp_path / "flat"
    unlabelled.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(unlabelled / "a.png")
    cases = [
        (["--margin", "3"], "margin"),
        (["--no-pseudo-captions"], "stage 2 needs texts"),
        (["--stage1-epochs", "0", "--stage2-epochs", "0"], "at least one stage"),
        (["--captions", str(folder)], "has no captions"),
        (["--templates", "no-such-set"], "unknown template set"),
    ]
    for extra, text in cases:
        result = runner.invoke(app, _args(folder, tmp_path / "o", *extra))
        assert result.exit_code != 0 and text in result.output, result.output
        assert "Traceback" not in result.output and "loading" not in result.output
    flat = runner.invoke(app, ["retrieval-tune", "-l", str(unlabelled), "--labelled-split", "", "-o",
                               str(tmp_path / "o"), "--model", "tiny", "-q"])
    assert flat.exit_code != 0 and "has no class labels" in flat.output and "Traceback" not in flat.output
