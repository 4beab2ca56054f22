"""The CLI's method path: shared options declared once, `cliplab evaluate` for any registered head, splits."""

import json

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli import common
from cliplab.cli.app import app

runner = CliRunner()
MODEL_COMMANDS = ("classify", "zeroshot", "evaluate", "embed")


def _options(command_name):
    command = typer.main.get_command(app).commands[command_name]
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_every_model_command_takes_the_shared_options(name):
    declared = {opt.split("/")[0] for option in common.RUN_OPTIONS.values() for opt in option.param_decls
                if opt.startswith("--")}
    assert declared <= _options(name)
    if name != "classify":
        assert {"--data-root", "--split"} <= _options(name)


def test_defaults_agree_between_library_and_commands():
    from cliplab.models import DEFAULT_MODEL_SPEC, resolve_model_spec

    assert common.DEFAULT_MODEL_SPEC == DEFAULT_MODEL_SPEC
    assert resolve_model_spec(*common.DEFAULT_MODEL_SPEC.split(":")) == resolve_model_spec("ViT-B-32")


@pytest.fixture()
def split_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 3)):
        for cls in ("apple", "pear"):
            folder = tmp_path / "fruit" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return tmp_path / "fruit"


def _invoke(*args):
    return runner.invoke(app, list(map(str, args)))


def test_evaluate_a_few_shot_head_and_repeat_its_split(split_folder, tmp_path):
    out = tmp_path / "out"
    first = _invoke("evaluate", "--method", "ncm", "--dataset", split_folder, "--shots", "2", "--seed", "4",
                    "--model", "tiny", "-q", "-o", out, "--workers", "0")
    assert first.exit_code == 0, first.output
    record = json.loads(next(out.glob("ncm_*.json")).read_text())
    block = record["cliplab"]
    assert (block["method"], block["shots"], block["seed"], block["split"]) == ("ncm", 2, 4, "test")
    assert block["num_images"] == 6 and block["train_split"]["num_images"] == 4
    split_file = out / "split_fruit_2shot_seed4.json"
    saved = json.loads(split_file.read_text())
    assert len(saved["train_ids"]) == 4 and all(i.startswith("train/") for i in saved["train_ids"])
    again = _invoke("evaluate", "--method", "ncm", "--dataset", split_folder, "--split-file", split_file,
                    "--seed", "4", "--model", "tiny", "-q", "-o", tmp_path / "again", "--workers", "0")  # tiny-seed4
    assert again.exit_code == 0, again.output
    repeated = json.loads(next((tmp_path / "again").glob("ncm_*.json")).read_text())
    assert repeated["cliplab"]["split_file"] == str(split_file)
    assert repeated["cliplab"]["train_split"]["num_images"] == 4  # the saved 2 shots x 2 classes, not all of train
    for key in ("acc1", "mean_per_class_recall"):
        assert repeated["metrics"][key] == record["metrics"][key]


def test_evaluate_zero_shot_method_and_parameters(split_folder, tmp_path):
    result = _invoke("evaluate", "--method", "zeroshot", "--dataset", split_folder, "--param", "logit_scale=10",
                     "--model", "tiny", "-q", "-o", tmp_path, "--workers", "0")
    assert result.exit_code == 0, result.output
    record = json.loads(next(tmp_path.glob("zeroshot_*.json")).read_text())
    assert record["cliplab"]["params"]["logit_scale"] == 10 and record["cliplab"]["fit"]["logit_scale"] == 10.0


@pytest.mark.parametrize("args, message", [
    (["zeroshot", "--split", "bogus"], "no split 'bogus'; it has train, val, test"),
    (["evaluate", "--method", "nosuch"], "unknown method 'nosuch'"),
    (["evaluate", "--method", "ncm", "--param", "oops"], "NAME=VALUE"),
    (["evaluate", "--method", "ncm", "--param", "temperature=2"], "takes no parameter 'temperature'"),
    (["zeroshot", "--method", "ncm"], "needs training data"),
])
def test_method_path_errors_are_one_line(split_folder, args, message):
    result = _invoke(*args[:1], "--dataset", split_folder, "--model", "tiny", "-q", *args[1:])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_classify_caps_top_k_at_the_number_of_labels(split_folder, tmp_path):
    out = tmp_path / "p.csv"
    result = _invoke("classify", split_folder / "test", "--labels", "apple,pear", "-k", "5", "--model", "tiny", "-q",
                     "-o", out)
    assert result.exit_code == 0, result.output
    assert "capped at the 2 labels" in result.output
    assert out.read_text().splitlines()[0] == "path,label_1,probability_1,label_2,probability_2,error"


def test_datasets_lists_splits(tmp_path):
    (tmp_path / "imagenet").mkdir()  # its own data root: the test does not depend on where datasets lie here
    result = _invoke("datasets", "--data-root", tmp_path)
    assert result.exit_code == 0 and "hold-out" in result.output and "imagenet/" in result.output


def test_save_a_fitted_head_and_classify_with_it(split_folder, tmp_path):
    head = tmp_path / "ncm-head"
    fitted = _invoke("evaluate", "--method", "ncm", "--dataset", split_folder, "--shots", "2", "--model", "tiny",
                     "-q", "-o", tmp_path / "out", "--workers", "0", "--save-head", head)
    assert fitted.exit_code == 0, fitted.output
    out = tmp_path / "p.json"
    result = _invoke("classify", split_folder / "test", "--head", head, "--model", "tiny", "-q", "-o", out)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert len(rows) == 6 and {r["predictions"][0]["label"] for r in rows} <= {"apple", "pear"}
    other = _invoke("classify", split_folder / "test", "--head", head, "--model", "tiny", "--seed", "1", "-q")
    assert other.exit_code == 2 and "fitted on features of model tiny-seed0" in other.output
    both = _invoke("classify", split_folder / "test", "--head", head, "--labels", "a,b", "--model", "tiny")
    assert both.exit_code == 2 and "brings its own classes" in both.output


def test_evaluate_a_head_that_tunes_on_validation_and_uses_views(split_folder, tmp_path):
    result = _invoke("evaluate", "--method", "tip-adapter", "--dataset", split_folder, "--shots", "2", "--model",
                     "tiny", "-q", "-o", tmp_path, "--workers", "0", "--param", "search_step=[10, 4]")
    assert result.exit_code == 0, result.output
    block = json.loads(next(tmp_path.glob("tip-adapter_*.json")).read_text())["cliplab"]
    assert block["fit"]["searched"] is True and block["val_split"]["num_images"] == 4
