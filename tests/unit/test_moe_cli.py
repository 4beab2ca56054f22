"""CLIP-MoE from the CLI: ``cliplab moe-upcycle`` writes a folder load_model reads (equal to the in-memory model), a
killed run resumes at the next copy, and ``cliplab pretrain --loss clip-moe --init-model FOLDER`` trains it on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cliplab.models import load_model
from cliplab.models.moe import MOE_KEY, MoeMlp, add_moe_layers, moe_spec
from cliplab.train import moe_upcycle
from cliplab.train.moe_upcycle import UpcycleConfig, upcycle_folder

SMALL = dict(experts=3, top_k=2, steps=2, routing_steps=2, pool=12, batch_size=4, lr=1e-2, clusters=2)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """16 noisy single-colour 32 px images with captions naming their colour."""
    folder = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40), "grey": (128, 128, 128)}
    rows = []
    for i in range(16):
        name, rgb = list(colours.items())[i % 4]
        pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"image": str(folder / f"{i}.png"), "caption": f"a {name} square number {i}"})
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return str(folder / "pairs.jsonl")


@pytest.fixture(scope="module")
def upcycled(manifest, tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe") / "model"
    return upcycle_folder(UpcycleConfig(source=manifest, init_model="tiny", **SMALL), folder, progress=False)


def _inputs(backbone):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return images, backbone.tokenize(["a red square", "a blue square", "a green square"])


def test_saved_model_loads_and_equals_the_in_memory_one(upcycled, caplog):
    config = json.loads((upcycled.folder / "open_clip_config.json").read_text())
    assert config[MOE_KEY] == {"experts": 3, "top_k": 2}
    loaded = load_model(str(upcycled.folder))
    assert "initialized randomly" not in caplog.text  # the weights are loaded right after building the layers
    assert moe_spec(loaded.model) == {"experts": 3, "top_k": 2}
    memory = upcycled.model.eval()
    saved, mine = loaded.model.state_dict(), memory.state_dict()
    assert saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k]) for k in mine)
    images, tokens = _inputs(loaded)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), memory.encode_image(images))
        assert torch.equal(loaded.model.encode_text(tokens), memory.encode_text(tokens))
    # the routers trained (routing stage), and copies 1, 2 differ from the dense MLPs (expert 0)
    layers = [m for m in loaded.model.modules() if isinstance(m, MoeMlp)]
    assert any(layer.router.weight.abs().sum() > 0 for layer in layers)
    assert all(not torch.equal(layer.experts[0].c_fc.weight, layer.experts[2].c_fc.weight) for layer in layers)
    assert [s.k for s in upcycled.stages] == [1, 2] and upcycled.resumed_copies == 0


def test_add_moe_layers_rebuilds_the_structure_and_one_expert_is_dense():
    dense = load_model("tiny").model.eval()
    one = add_moe_layers(__import__("copy").deepcopy(dense), experts=1, top_k=2)
    images, tokens = _inputs(load_model("tiny"))
    with torch.no_grad():
        assert torch.allclose(one.encode_image(images), dense.encode_image(images), atol=1e-6)
        assert torch.allclose(one.encode_text(tokens), dense.encode_text(tokens), atol=1e-6)
    assert moe_spec(one) == {"experts": 1, "top_k": 1} and moe_spec(dense) is None


def test_a_killed_run_resumes_at_the_next_copy_and_ends_equal(manifest, upcycled, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    config = UpcycleConfig(source=manifest, init_model="tiny", **SMALL)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(moe_upcycle, "upcycle", killed)  # both copies made, then killed before assembly
        with pytest.raises(KeyboardInterrupt):
            upcycle_folder(config, folder, progress=False)
    assert sorted(p.name for p in (folder / "train_state").glob("copy_*.safetensors")) == [
        "copy_1.safetensors", "copy_2.safetensors"]
    trained = []
    original = moe_upcycle.run_training
    monkeypatch.setattr(moe_upcycle, "run_training", lambda *a, **k: (trained.append(a[3].desc), original(*a, **k))[1])
    result = upcycle_folder(config, folder, progress=False)
    assert result.resumed_copies == 2 and trained == ["moe routing"]  # no copy trained again
    assert [s.hard for s in result.stages] == [s.hard for s in upcycled.stages]
    first, again = upcycled.model.state_dict(), result.model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(Exception, match="other options"):
        upcycle_folder(UpcycleConfig(source=manifest, init_model="tiny", **{**SMALL, "steps": 3}), folder,
                       progress=False)


def test_cli_upcycles_and_pretrain_trains_the_moe_model_on(manifest, upcycled, tmp_path):
    from cliplab.cli.app import app

    out = CliRunner().invoke(app, ["moe-upcycle", manifest, "--init-model", "tiny", "-o", str(tmp_path / "cli"),
                                   "--experts", "2", "--steps", "1", "--routing-steps", "0", "--pool", "8",
                                   "--batch-size", "4", "--quiet"])
    assert out.exit_code == 0, out.output
    assert moe_spec(load_model(str(tmp_path / "cli")).model) == {"experts": 2, "top_k": 2}
    args = ["pretrain", manifest, "--init-model", str(upcycled.folder), "--loss", "clip-moe", "--steps", "2",
            "--batch-size", "4", "--warmup", "0", "--lr", "1e-2", "--eval-split", "none", "--quiet"]
    out = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "on")])
    assert out.exit_code == 0, out.output
    trained = load_model(str(tmp_path / "on"))
    assert moe_spec(trained.model) == {"experts": 3, "top_k": 2}
    before, after = upcycled.model.state_dict(), trained.model.state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if "router" in k)
    # a dense start model is refused in one line that says how to upcycle it
    out = CliRunner().invoke(app, [*args[:3], "tiny", *args[4:], "-o", str(tmp_path / "dense")])
    assert out.exit_code != 0 and "moe-upcycle" in out.output


def test_pretrain_clip_moe_resumes_to_the_uninterrupted_weights(manifest, upcycled, tmp_path):
    from cliplab.train import PretrainConfig, pretrain

    config = PretrainConfig(source=manifest, init_model=str(upcycled.folder), loss="clip-moe", steps=3,
                            batch_size=4, warmup=0, lr=1e-2, eval_split=None, checkpoint_every=1,
                            loss_params={"routers_only": True})
    pretrain(config, tmp_path / "whole", progress=False)

    def stop(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(config, tmp_path / "parts", progress=False, callback=stop)
    result = pretrain(config, tmp_path / "parts", progress=False)
    assert result.resumed_from == 2
    whole = load_model(str(tmp_path / "whole")).model.state_dict()
    parts = load_model(str(tmp_path / "parts")).model.state_dict()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    # routers_only: only router weights moved from the upcycled start
    start = upcycled.model.state_dict()
    moved = {k for k in start if not torch.equal(start[k], whole[k])}
    assert moved and all("router" in k for k in moved)
