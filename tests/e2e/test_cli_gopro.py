"""GOPro and CPE-CLIP through cliplab train (issue 25 item 5): train, save, --eval, a killed GOPro run resumes to the
same arrays, a ResNet image tower is one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file
from typer.testing import CliRunner

import cliplab.heads.gopro as gopro
from cliplab.cli.app import app

runner = CliRunner()


@pytest.fixture()
def fruit(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 2)):
        for c, colour in enumerate(((220, 40, 40), (40, 220, 40))):
            folder = tmp_path / "fruit" / split / f"kind{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path / "fruit"


def _train(fruit, tmp_path, out, method="gopro", *extra):
    params = (["max_epoch=2", "batch_size=2", "augment=false"] if method == "gopro"
              else ["base_epochs=2", "batch_size=2"])
    args = ["train", "--method", method, "--dataset", fruit, "--shots", "2", "-o", out, "--model", "tiny",
            "--workers", "0", "--cache-dir", tmp_path / "cache", "-q", *[a for p in params for a in ("--param", p)],
            *extra]
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("method", ["gopro", "cpe-clip"])
def test_train_saves_and_evaluates(fruit, tmp_path, method):
    out = tmp_path / method
    result = _train(fruit, tmp_path, out, method, "--eval")
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output and (out / "head.json").is_file()


def test_a_killed_gopro_run_resumes_to_the_same_arrays(fruit, tmp_path, monkeypatch):
    whole = _train(fruit, tmp_path, tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    real, resumed = gopro.run_training, []

    def killed(*args, **kwargs):
        def kill(step, loss):
            if step == 3:  # after the checkpoint of the first epoch (2 steps)
                raise KeyboardInterrupt

        return real(*args, callback=kill, **kwargs)

    monkeypatch.setattr(gopro, "run_training", killed)
    first = _train(fruit, tmp_path, tmp_path / "killed")
    assert first.exit_code == 130 and not (tmp_path / "killed" / "head.json").exists()

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        resumed.append(result.resumed_from)
        return result

    monkeypatch.setattr(gopro, "run_training", spy)
    second = _train(fruit, tmp_path, tmp_path / "killed")
    assert second.exit_code == 0, second.output
    assert resumed == [2]
    a, b = (load_file(str(tmp_path / d / "arrays.safetensors")) for d in ("whole", "killed"))
    for key in a:
        if key != "training_loss_":  # a resumed fit records only its own epochs' losses
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
