"""Issue 22 item 3: tables, results JSON and error hints name the model as the person gave it (recipe:NAME, the
folder, ARCH:TAG), never the internal id, which stays in the cache keys and the JSON's cliplab block."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.errors import CliplabError
from cliplab.heads import create_head
from cliplab.heads.saving import load_head, save_head
from cliplab.models import load_model
from cliplab.models.tiny import TINY_CONFIG, build_tiny_model


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "trained-here"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in build_tiny_model(1).state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG}))
    return folder


@pytest.fixture
def labelled(tmp_path):
    root = tmp_path / "pets"
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (40 + 100 * c, 20 * i, 90)).save(root / name / f"{i}.png")
    return root


def test_display_names_default_to_what_was_loaded(model_folder):
    assert load_model("tiny", device="cpu").display_name == "tiny"
    backbone = load_model(str(model_folder), device="cpu")
    assert backbone.model_id.startswith("dir:") and backbone.display_name == str(model_folder)


def test_zeroshot_with_a_recipe_names_the_recipe_in_the_table_and_the_json(model_folder, labelled, tmp_path,
                                                                          monkeypatch):
    from cliplab.train import recipes

    monkeypatch.setattr(recipes, "recipe_model", lambda name, **kwargs: model_folder)
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["zeroshot", "--dataset", str(labelled), "--model", "recipe:cifar10-signal",
                                      "-q", "-o", str(out), "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "recipe:cifar10-signal" in text and "dir:" not in text
    [path] = out.glob("*.json")
    record = json.loads(path.read_text())
    assert record["model"] == "recipe:cifar10-signal"
    assert record["cliplab"]["model_id"].startswith("dir:")  # the identity stays in the cliplab block
    assert "recipe-cifar10-signal" in path.name


def test_a_head_from_another_model_names_the_model_option_to_pass(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(8, 4)).astype(np.float32), np.array([0, 1] * 4)
    save_head(create_head("ncm").fit(X, y), tmp_path / "h", model_id="dir:09398c4a6106e1b5:qgelu0",
              model="recipe:cifar10-signal")
    with pytest.raises(CliplabError, match="load it with --model recipe:cifar10-signal"):
        load_head(tmp_path / "h", model_id="open_clip:ViT-B-32:openai:qgelu1")
