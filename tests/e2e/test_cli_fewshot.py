"""cliplab fewshot end to end: the table, the files, a second run that recomputes nothing, clear errors."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app

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


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_fewshot_table_files_and_cached_second_run(fruit, tmp_path):
    args = ["fewshot", "--dataset", fruit, "--methods", "zeroshot,ncm,tip-adapter,gda", "--shots", "1,2",
            "--seeds", "1,2", "--views", "2", "--model", "tiny", "-q", "-o", tmp_path / "out", "--workers", "0",
            "--cache-dir", tmp_path / "cache", "--param", "tip-adapter.search_step=[20, 5]"]
    first = _run(*args)
    assert first.exit_code == 0, first.output
    assert "tip-adapter" in first.output and "±" in first.output and "random weights" in first.output
    summary = json.loads(next((tmp_path / "out").glob("fewshot_*.json")).read_text())
    assert len(summary["runs"]) == 16 and set(summary["table_acc1_mean_std"]) == {"zeroshot", "ncm", "tip-adapter",
                                                                                   "gda"}
    tip = [r for r in summary["runs"] if r["method"] == "tip-adapter"]
    assert all({"alpha", "beta"} <= set(r["chosen"]) for r in tip)
    assert len(list((tmp_path / "out" / "splits").glob("*.json"))) == 4
    assert next((tmp_path / "out").glob("*_curve.png")).read_bytes()[:4] == b"\x89PNG"
    spaces = list((tmp_path / "cache").glob("img-*/shards/*.npy"))
    again = _run(*args)
    assert again.exit_code == 0, again.output
    assert list((tmp_path / "cache").glob("img-*/shards/*.npy")) == spaces  # nothing new was embedded
    rerun = json.loads(next((tmp_path / "out").glob("fewshot_*.json")).read_text())
    assert [r["acc1"] for r in rerun["runs"]] == [r["acc1"] for r in summary["runs"]]  # same seeds, same numbers


@pytest.mark.parametrize("args, message", [
    (["--shots", "9"], "has 7 image(s)"),
    (["--methods", "zeroshot,nosuch"], "unknown method 'nosuch'"),
    (["--shots", "0"], "positive whole numbers"),
    (["--param", "ncm.x"], "METHOD.NAME=VALUE"),
])
def test_fewshot_errors_are_one_line(fruit, tmp_path, args, message):
    result = _run("fewshot", "--dataset", fruit, "--methods", "zeroshot,ncm", "--model", "tiny", "-q",
                  "-o", tmp_path / "out", "--workers", "0", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_dataset_without_a_train_split_is_refused(tmp_path):
    folder = tmp_path / "flat" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    result = _run("fewshot", "--dataset", tmp_path / "flat", "--methods", "ncm", "--model", "tiny", "-q")
    assert result.exit_code == 2 and "has no splits" in result.output
