"""Issue 22 item 2: an ordinary command never starts a recipe build unless asked, a build is announced with its
duration, Ctrl-C says what was kept, and recipes checkpoint by time."""

from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.train import recipes


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / "a.png")
    return folder


@pytest.fixture
def no_training(monkeypatch):
    """Any training run fails the test (it must not start)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a training run started")

    monkeypatch.setattr(recipes, "pretrain", forbidden)


def test_classify_with_an_unbuilt_recipe_does_not_train_and_says_how_to_build(image_dir, no_training):
    result = CliRunner().invoke(app, ["classify", str(image_dir), "--labels", "cat,dog", "--model",
                                      "recipe:cifar10-signal", "--quiet"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "recipe:cifar10-signal is not built yet" in text
    assert "cliplab pretrain --recipe cifar10-signal" in text and "--build-recipe" in text
    assert "min" in text  # the expected duration
    assert "decoding" not in text


def test_build_recipe_is_announced_and_ctrl_c_before_a_checkpoint_says_nothing_was_kept(image_dir, monkeypatch):
    started = []

    def interrupted(config, folder, progress=True):
        started.append(config)
        (folder / "train_state").mkdir(parents=True)  # what the engine leaves before its first checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(recipes, "pretrain", interrupted)
    result = CliRunner().invoke(app, ["classify", str(image_dir), "--labels", "cat,dog", "--model",
                                      "recipe:cifar10-ci", "--build-recipe", "--quiet"])
    text = " ".join(result.output.split())
    assert result.exit_code == 130, result.output
    assert len(started) == 1
    assert "building recipe:cifar10-ci" in text and "min" in text
    assert "nothing was kept" in text
    assert "finished work is cached" not in text


def test_pretrain_interrupted_after_a_checkpoint_names_it(tmp_path, monkeypatch):
    import cliplab.train

    def interrupted(config, folder, progress=True):
        (folder / "train_state").mkdir(parents=True)
        (folder / "train_state" / "checkpoint.pt").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(cliplab.train, "pretrain", interrupted)
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["pretrain", "--recipe", "cifar10-ci", "--output", str(out), "--device", "cpu"])
    text = " ".join(result.output.split())
    assert result.exit_code == 130, result.output
    assert "last checkpoint is kept" in text and "nothing was kept" not in text


def test_recipes_checkpoint_by_time_and_the_cli_keeps_it_unless_told():
    for name in recipes.RECIPES:
        assert recipes.recipe_config(name).checkpoint_seconds == 120.0
    assert recipes.recipe_config("cifar10-ci", checkpoint_seconds=0.0).checkpoint_seconds == 0.0


def test_the_offline_no_weights_error_names_the_recipe():
    from cliplab.models.loader import _unavailable

    text = str(_unavailable("ViT-B-32 (laion2b_s34b_b79k)"))
    assert "--model recipe:cifar10-signal" in text and "cliplab pretrain --recipe cifar10-signal" in text
