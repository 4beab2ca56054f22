"""Objective parameters from text (``--loss-param KEY=VALUE``), checked against the objective's ``__init__``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.train import PretrainConfig, pretrain
from cliplab.train.engine import TrainOptionError
from cliplab.train.objective_params import objective_parameters, parse_objective_params

MODEL = {"embed_dim": 16,
         "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
         "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def test_values_take_the_type_of_the_default():
    params = parse_objective_params("mlcd", ["centres=64", "weight = 0.5", "seed=3"])
    assert params == {"centres": 64, "weight": 0.5, "seed": 3}
    assert type(params["centres"]) is int and type(params["weight"]) is float
    assert parse_objective_params("clip-moe", ["routers_only=yes"]) == {"routers_only": True}
    assert parse_objective_params("clip-moe", ["routers_only=Off"]) == {"routers_only": False}
    assert parse_objective_params("lightclip", ["ot_eps=1e-2"]) == {"ot_eps": 0.01}
    assert set(objective_parameters("mlcd")) >= {"weight", "centres", "positives"}


@pytest.mark.parametrize("items, words", [
    (["nope=1"], ("'mlcd' has no parameter 'nope'", "centres", "weight")),
    (["centres=many"], ("centres takes an int", "default 32")),
    (["weight"], ("write KEY=VALUE",)),
    (["weight=1", "weight=2"], ("given twice",)),
])
def test_bad_items_are_one_line(items, words):
    with pytest.raises(TrainOptionError) as caught:
        parse_objective_params("mlcd", items)
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words)


def test_config_checks_its_params_and_keeps_the_hash_of_runs_without():
    with pytest.raises(TrainOptionError, match="'clip' has no parameter 'weight'; its parameters: none"):
        PretrainConfig(source="x", loss="clip", loss_params={"weight": 1.0})
    plain, tuned = PretrainConfig(source="x", loss="mlcd"), PretrainConfig(source="x", loss="mlcd",
                                                                           loss_params={"centres": 8})
    assert "loss_params" not in plain.to_dict() and tuned.to_dict()["loss_params"] == {"centres": 8}
    assert plain.recipe_hash({}) != tuned.recipe_hash({})
    assert tuned.differences(plain) == ["loss_params"] and PretrainConfig.from_dict(tuned.to_dict()) == tuned


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 40, 220)}.items():
        (root / "train" / name).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.png")
    (root / "model.json").write_text(json.dumps(MODEL))
    return root


def test_pretrain_builds_the_objective_with_the_params(colours, tmp_path, monkeypatch):
    from cliplab.train import loop

    built = []
    real = loop.get_objective
    monkeypatch.setattr(loop, "get_objective", lambda name, **params: built.append((name, params)) or
                        real(name, **params))
    config = PretrainConfig(source=str(colours), model=str(colours / "model.json"), loss="mlcd", steps=1,
                            batch_size=4, warmup=0, eval_split=None, templates="generic",
                            loss_params={"centres": 3, "bank": 8})
    pretrain(config, tmp_path / "m", progress=False)
    assert built == [("mlcd", {"centres": 3, "bank": 8})]


def test_cli_refuses_an_unknown_key_and_a_recipe_in_one_line(colours, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["pretrain", str(colours), "--loss", "mlcd", "--loss-param", "nope=1",
                              "--output", str(tmp_path / "m")])
    assert bad.exit_code == 2 and "no parameter 'nope'" in " ".join(bad.output.split())
    assert len(bad.output.strip().splitlines()) == 1
    recipe = runner.invoke(app, ["pretrain", "--recipe", "cifar10-ci", "--loss-param", "weight=1"])
    assert recipe.exit_code == 2 and "--loss-param changes a recipe" in " ".join(recipe.output.split())
    assert len(recipe.output.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
