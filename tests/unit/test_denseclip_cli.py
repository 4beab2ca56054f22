"""``cliplab segment-train`` (DenseCLIP on mosaic train) and its weights used by ``segment-eval``, on the tiny model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cliplab.cli.app import app

runner = CliRunner()


def test_segment_train_then_eval_with_weights(tmp_path, data_root):
    weights = tmp_path / "dc"
    result = runner.invoke(app, ["segment-train", "--model", "tiny", "--data-root", str(data_root), "--mosaic-count",
                                 "2", "--epochs", "1", "--batch", "4", "-o", str(weights), "-q"])
    assert result.exit_code == 0, result.output
    meta = json.loads((weights / "denseclip.json").read_text())
    assert meta["train"]["windows"] == 8 and meta["train"]["dataset"]["split"] == "train"
    assert (weights / "denseclip.safetensors").is_file()
    out = tmp_path / "res"
    result = runner.invoke(app, ["segment-eval", "--dataset", "mosaic", "--mosaic-count", "2", "--model", "tiny",
                                 "--data-root", str(data_root), "--method", "denseclip", "--param",
                                 f"weights={weights}", "-o", str(out), "--grid", "0", "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "segment_denseclip_mosaic_test.json").read_text())
    assert record["params"]["weights"] == str(weights) and record["items"] == 2


def test_segment_train_refuses_a_method_that_does_not_train(tmp_path):
    result = runner.invoke(app, ["segment-train", "--method", "maskclip", "--model", "tiny", "-o", str(tmp_path)])
    assert result.exit_code != 0
    assert "'maskclip' does not train; methods that do: denseclip, ovseg" in " ".join(result.output.split())
