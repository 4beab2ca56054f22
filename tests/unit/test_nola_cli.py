"""NoLA through ``cliplab train`` (issue 25 items 3 and 5): it trains, saves and evaluates; a run killed in its
student stage resumes from the checkpoint to the same arrays; a missing DINO checkpoint is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file
from typer.testing import CliRunner

import cliplab.heads.nola as nola
from cliplab.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder dataset of three colours (train 8 a class, test 2) and a random tiny timm ViT standing in for DINO."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("nola-cli")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 2)):
        for c, colour in enumerate(((220, 40, 40), (40, 220, 40), (40, 40, 220))):
            folder = root / "colours" / split / f"kind{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    save_file(model.state_dict(), str(root / "dino.safetensors"))
    return root


def _train(files, out, *extra, dino=None):
    params = ["max_epoch=2", "batch_size=8", "k=2", "align_epochs=5", "n_prompts=2",
              f"dino_checkpoint={dino or files / 'dino.safetensors'}", "dino_arch=test_vit"]
    args = ["train", "--method", "nola", "--dataset", files / "colours", "-o", out, "--model", "tiny",
            "--workers", "0", "--cache-dir", files / "cache", "-q", *[a for p in params for a in ("--param", p)],
            *extra]
    return runner.invoke(app, [str(a) for a in args])


def test_train_saves_evaluates_and_a_killed_run_resumes(files, tmp_path, monkeypatch):
    whole = _train(files, tmp_path / "whole", "--eval")
    assert whole.exit_code == 0, whole.output
    assert "top-1" in whole.output and (tmp_path / "whole" / "head.json").is_file()
    real, resumed, per_epoch = nola.run_training, [], []

    def killed(module, objective, data, settings, **kwargs):
        def kill(step, loss):
            if settings.desc == "nola student" and step == settings.checkpoint_every + 1:  # after epoch 1's checkpoint
                per_epoch.append(settings.checkpoint_every)
                raise KeyboardInterrupt

        return real(module, objective, data, settings, callback=kill, **kwargs)

    monkeypatch.setattr(nola, "run_training", killed)
    first = _train(files, tmp_path / "killed")
    assert first.exit_code == 130 and not (tmp_path / "killed" / "head.json").exists()

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        resumed.append(result.resumed_from)
        return result

    monkeypatch.setattr(nola, "run_training", spy)
    second = _train(files, tmp_path / "killed")
    assert second.exit_code == 0, second.output
    assert resumed == [5, per_epoch[0]]  # the alignment head's finished run (5 epochs of one batch), student epoch 1
    a, b = (load_file(str(tmp_path / d / "arrays.safetensors")) for d in ("whole", "killed"))
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_missing_dino_checkpoint_is_one_line(files, tmp_path):
    result = _train(files, tmp_path / "out", dino=tmp_path / "nowhere.safetensors")
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if "DINO checkpoint not found" in line]
    assert len(lines) == 1 and "Traceback" not in result.output
