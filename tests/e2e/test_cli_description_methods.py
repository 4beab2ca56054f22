"""Every description method of issue 16 through the CLI on the tiny model and tiny PNG class folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from _llm_stub import Stub
from cliplab.cli.app import app
from cliplab.heads import create_head

runner = CliRunner()
CLASSES = ("apple", "pear")
PAIR_ANSWER = json.dumps({"differences": [
    {"attribute": "shape", "first": "a photo of a round fruit.", "second": "a photo of a bell-shaped fruit."},
    {"attribute": "colour", "first": "a photo of a red fruit.", "second": "a photo of a green fruit."},
]})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A class folder (``flat``), the same with train/ and test/ splits (``split``), and the method inputs."""
    root = tmp_path_factory.mktemp("descmethods")
    rng = np.random.default_rng(0)
    for folder, count in (("flat", 3), ("split/train", 4), ("split/test", 2)):
        for cls in CLASSES:
            (root / folder / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / folder / cls / f"{i}.png")
    (root / "dclip.json").write_text(json.dumps({"apple": ["red skin", "a stem", "can be sliced"],
                                                 "pear": ["a bell shape", "antennae"]}))
    (root / "cupl.json").write_text(json.dumps({"apple": ["A photo of an apple, a round red fruit."],
                                                "pear": ["A pear is a sweet fruit.", "A green pear on a table."]}))
    (root / "attributes.json").write_text(json.dumps({"background": ["", "on a table", "on a tree"]}))
    (root / "captions.txt").write_text("a red apple\nan apple pie\nsliced pears on a plate\nthe pear tree\n")
    (root / "syn.json").write_text(json.dumps({"apple": ["apple", "red apple"], "pear": ["pear", "pears"]}))
    return root


CASES = {
    "cupl": ["--descriptions", "{root}/cupl.json"],
    "dclip": ["--descriptions", "{root}/dclip.json"],
    "waffle": ["--param", "waffle_count=3"],
    "perceptionclip": ["--param", "attributes={root}/attributes.json"],
    "fudd": ["--llm", "{llm}"],
    "real": ["--param", "corpus={root}/captions.txt", "--param", "synonyms={root}/syn.json"],
}


def _record(out, method):
    files = list(out.glob(f"{method}_*.json"))
    assert len(files) == 1, sorted(p.name for p in out.iterdir())
    return json.loads(files[0].read_text())["cliplab"]


@pytest.mark.parametrize("method", list(CASES))
def test_zeroshot_description_method(data, tmp_path, tiny, monkeypatch, method):
    monkeypatch.setenv("CLIPLAB_LLM_MODEL", "stub-model")
    out = tmp_path / "out"
    with Stub(lambda body, n: (200, PAIR_ANSWER, 0)) as stub:
        extra = [a.format(root=data, llm=stub.url) for a in CASES[method]]
        result = runner.invoke(app, ["zeroshot", "--dataset", str(data / "flat"), "--method", method, *extra,
                                     "--model", "tiny", "-q", "-o", str(out), "--workers", "0",
                                     "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    record = _record(out, method)
    assert record["method"] == method and record["num_images"] == 6
    if method == "fudd":
        assert stub.count == 1  # two classes: one pair asked, answered by the stub
        assert "A photo of a" not in json.dumps(record["params"])  # fudd keeps its own "a photo of a {c}."
    if method in ("dclip", "waffle"):
        if method == "dclip":  # the description file is recorded by its path
            assert record["params"]["descriptions"] == str(data / "dclip.json")
        head = create_head(method, backbone=tiny, class_names=list(CLASSES), **record["params"])
        sentences = [s for row in head.sentences() for s in row]
        assert sentences and not any("., which" in s or "., " in s for s in sentences)
        if method == "waffle":  # WaffleCLIP's own template, not the dataset's template set
            assert all(s.startswith("A photo of a ") and s.endswith(".") for s in sentences)
        else:
            assert "apple, which has red skin" in " ".join(sentences)


def test_evaluate_desc_select_on_split_folders(data, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["evaluate", "--method", "desc-select", "--dataset", str(data / "split"),
                                 "--param", f"descriptions={data}/dclip.json", "--param", "k=2",
                                 "--model", "tiny", "-q", "-o", str(out), "--workers", "0",
                                 "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    record = _record(out, "desc-select")
    assert record["method"] == "desc-select" and record["split"] == "test" and record["num_images"] == 4
    selection = record["train_split"]["num_images"]
    assert record["train_split"]["split"] == "train" and 0 < selection <= 8
    assert record["fit"]["pool"] == 5 and record["fit"]["selection_images"] == selection
    assert record["params"]["templates"] == ["a photo of a {c}."]  # its own default, not the dataset's set
