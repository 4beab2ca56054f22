"""``cliplab describe``: a replay file offline, the local chat-completions stub online, partial and failed runs."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from _llm_stub import Stub
from cliplab.cli.app import app
from cliplab.data.descriptions import load_descriptions

runner = CliRunner()
REPLAY = Path(__file__).parents[1] / "data" / "describe_replay_cifar10.json"
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_describe_cifar10_from_the_replay_file(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal width and a long path: output that is not a terminal
    out = tmp_path.joinpath(*["a_long_folder_name_as_in_a_deep_clone"] * 4) / "cupl.json"  # prints them whole
    out.parent.mkdir(parents=True)
    result = runner.invoke(app, ["describe", "--dataset", "cifar10", "--style", "cupl", "--llm", f"replay:{REPLAY}",
                                 "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    descriptions = load_descriptions(out, CIFAR10)
    assert descriptions["cat"][0] == "A cat has four legs, pointed ears and whiskers."
    assert "A cat has four legs, pointed ears and whiskers." in result.output  # the table's first description
    assert f"wrote {out}: 10 classes; " in result.output.splitlines()[-1]  # one line, the path whole


def test_labels_file_dclip_and_a_missing_class(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\nplatypus\ndog\n")
    out = tmp_path / "d.json.gz"
    result = runner.invoke(app, ["describe", "--labels-file", str(labels), "--llm", f"replay:{REPLAY}", "-o",
                                 str(out), "-q"])
    assert result.exit_code == 1, result.output
    assert "1 of 3 classes have no descriptions" in result.output
    assert "platypus: replay file" in result.output and "no answer for prompt" in result.output
    assert load_descriptions(out) == {"cat": ["has four legs", "pointed ears", "whiskers", "a long tail", "soft fur"],
                                      "dog": ["has four legs", "a wet nose", "floppy or upright ears",
                                              "a wagging tail"]}


def test_http_stub_malformed_class_then_a_rerun_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPLAB_LLM_MODEL", "stub-model")
    broken = {"on": True}

    def script(body, n):
        name = body["messages"][-1]["content"].split('"')[1]
        if name == "dog" and broken["on"]:
            return 200, "no JSON here, sorry", 0
        return 200, json.dumps({"features": [f"{name} shape", f"has {name} colours"]}), 0

    out = tmp_path / "d.json"
    record = tmp_path / "replay.json"
    with Stub(script) as stub:
        args = ["describe", "--labels", "cat,dog,owl", "--llm", stub.url, "-o", str(out), "-q", "--record",
                str(record)]
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        assert "dog: " in result.output and "malformed JSON" in result.output
        assert list(load_descriptions(out)) == ["cat", "owl"]
        first = stub.count
        assert first == 1 + 3 + 1  # the dog tried three times (the default attempts)

        broken["on"] = False
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert stub.count == first + 1  # the cache answered cat and owl
        assert load_descriptions(out)["dog"] == ["dog shape", "has dog colours"]
    offline = runner.invoke(app, ["describe", "--labels", "cat,dog,owl", "--llm", f"replay:{record}", "-o",
                                  str(tmp_path / "again.json"), "-q"])
    assert offline.exit_code == 0, offline.output
    assert load_descriptions(tmp_path / "again.json") == load_descriptions(out)


def test_endpoint_down_is_one_line_and_exit_2(tmp_path):
    with Stub(lambda body, n: (200, "{}", 0)) as stub:
        url = stub.url
    result = runner.invoke(app, ["describe", "--labels", "cat,dog,owl,fox", "--llm", url, "--llm-model", "m",
                                 "-o", str(tmp_path / "d.json"), "-q"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no class could be described (4 asked)" in result.output
    assert "cannot reach" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "d.json").exists()


def test_usage_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["describe", "--labels", "cat", "--dataset", "cifar10", "--llm", "replay:x",
                                 "-o", "d.json"])
    assert result.exit_code == 2 and "exactly one of --labels, --labels-file or --dataset" in result.output
    result = runner.invoke(app, ["describe", "--labels", "cat", "--llm", f"replay:{REPLAY}", "-o",
                                 str(tmp_path / "d.txt")])
    assert result.exit_code == 2 and "use a .json or .json.gz" in result.output
    result = runner.invoke(app, ["describe", "--labels", "cat", "--llm", "bogus", "-o", str(tmp_path / "d.json")])
    assert result.exit_code == 2 and "unknown LLM spec 'bogus'" in result.output
    result = runner.invoke(app, ["describe", "--labels", "cat", "--style", "waffle", "--llm", f"replay:{REPLAY}",
                                 "-o", str(tmp_path / "d.json")])
    assert result.exit_code == 2 and "unknown description style 'waffle'" in result.output


def test_show_prompts_asks_nothing():
    result = runner.invoke(app, ["describe", "--labels", "cat", "--style", "cupl", "--domain", "a photo of a pet",
                                 "--llm", "replay:/nonexistent.json", "--show-prompts"])
    assert result.exit_code == 0, result.output
    prompts = json.loads(result.output)
    assert len(prompts["cat"]) == 5 and "a cat (a photo of a pet)" in prompts["cat"][0]


def test_an_endpoint_without_a_model_name_names_the_option(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPLAB_LLM_MODEL", raising=False)
    result = runner.invoke(app, ["describe", "--labels", "cat,dog", "--llm", "http://127.0.0.1:9/v1", "-o",
                                 str(tmp_path / "d.json")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--llm-model NAME" in errors[0] and "CLIPLAB_LLM_MODEL" in errors[0]
    assert "model=" not in result.output  # the Python keyword is not an option a user can pass
    assert not (tmp_path / "d.json").exists()
