"""cliplab train end to end: train and save one method, load it with classify --head, resume a killed run to the
same numbers, refuse a folder of another run in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file
from typer.testing import CliRunner

import cliplab.heads.clip_svd as clip_svd
from cliplab.cli.app import app
from cliplab.train import engine

runner = CliRunner()


@pytest.fixture()
def fruit(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 3)):
        for c, colour in enumerate(((220, 40, 40), (40, 220, 40))):
            folder = tmp_path / "fruit" / split / f"kind{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path / "fruit"


def _train(fruit, tmp_path, out, *extra):
    # 2 shots x 2 classes in batches of 2: 2 steps a pass, 3 passes, a checkpoint every pass
    args = ["train", "--method", "clip-svd", "--dataset", fruit, "--shots", "2", "-o", out, "--model", "tiny",
            "--param", "max_epoch=3", "--param", "batch_size=2", "--param", "lr=0.01", "--workers", "0",
            "--cache-dir", tmp_path / "cache", "-q", *extra]
    return runner.invoke(app, [str(a) for a in args])


def test_train_saves_a_head_that_classify_loads_through_its_own_model(fruit, tmp_path):
    out = tmp_path / "svd"
    result = _train(fruit, tmp_path, out, "--eval")
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output and "(test, 6 images)" in result.output
    assert {p.name for p in out.iterdir()} >= {"head.json", "arrays.safetensors", "train.json", "split.json",
                                               "checkpoints"}
    assert json.loads((out / "head.json").read_text())["method"] == "clip-svd"
    shown = runner.invoke(app, ["classify", *map(str, sorted((fruit / "test" / "kind0").glob("*.png"))),
                                "--head", str(out), "--model", "tiny", "--workers", "0", "-q",
                                "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "c.json")])
    assert shown.exit_code == 0, shown.output
    rows = json.loads((tmp_path / "c.json").read_text())
    from cliplab.heads.saving import load_head
    from cliplab.models import load_model

    tiny = load_model("tiny", device="cpu")
    head = load_head(out, backbone=tiny)
    images = torch.stack([head.backbone_.preprocess(Image.open(p).convert("RGB"))
                          for p in sorted((fruit / "test" / "kind0").glob("*.png"))])
    expected = head.predict_proba(head.backbone_.encode_images(images).numpy())  # through the tuned image tower
    rows = rows["results"] if isinstance(rows, dict) else rows
    got = [max(p["probability"] for p in row["predictions"]) for row in rows]
    np.testing.assert_allclose(got, expected.max(axis=1), rtol=1e-4)
    scored = runner.invoke(app, ["evaluate", "--head", str(out), "--dataset", str(fruit), "--model", "tiny", "-q",
                                 "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "ev")])
    assert scored.exit_code == 0, scored.output
    acc1 = json.loads(next((tmp_path / "ev").glob("clip-svd_*.json")).read_text())["metrics"]["acc1"]
    assert f"top-1 {100 * acc1:.2f}%" in result.output  # the same number as train --eval
    again = _train(fruit, tmp_path, out, "--eval")  # a finished run: loaded, not trained again; same numbers
    assert again.exit_code == 0 and "already trained" in again.output
    assert again.output.splitlines()[-1] == result.output.splitlines()[-1]


def test_a_killed_run_resumes_to_the_same_numbers(fruit, tmp_path, monkeypatch):
    whole = _train(fruit, tmp_path, tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    real, resumed = engine.run_training, []

    def killed(*args, **kwargs):
        def kill(step, loss):
            if step == 3:  # after the checkpoint of the first pass (step 2)
                raise KeyboardInterrupt

        return real(*args, callback=kill, **kwargs)

    monkeypatch.setattr(clip_svd, "run_training", killed)
    first = _train(fruit, tmp_path, tmp_path / "killed")
    assert first.exit_code == 130 and not (tmp_path / "killed" / "head.json").exists()
    assert (tmp_path / "killed" / "checkpoints" / "checkpoint.pt").is_file()

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        resumed.append(result.resumed_from)
        return result

    monkeypatch.setattr(clip_svd, "run_training", spy)
    second = _train(fruit, tmp_path, tmp_path / "killed")
    assert second.exit_code == 0, second.output
    assert resumed == [2]
    a, b = (load_file(str(tmp_path / d / "arrays.safetensors")) for d in ("whole", "killed"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("extra, message", [
    (["--method", "ncm"], "holds a run with method 'clip-svd', not 'ncm'"),
    (["--shots", "1"], "holds a run with shots 2, not 1"),
    (["--param", "lr=0.02"], "holds a run with params"),
])
def test_a_folder_of_another_run_is_refused_in_one_line(fruit, tmp_path, extra, message):
    out = tmp_path / "svd"
    out.mkdir()
    record = {"method": "clip-svd", "dataset": str(fruit), "split": "train", "shots": 2, "seed": 0, "model": "tiny",
              "model_id": "tiny-seed0", "templates": ["a photo of a {c}."],
              "params": {"max_epoch": 3, "batch_size": 2, "lr": 0.01}, "views": 10}
    (out / "train.json").write_text(json.dumps(record))
    result = _train(fruit, tmp_path, out, *extra)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
    assert not (out / "head.json").exists() and not (out / "checkpoints").exists()
