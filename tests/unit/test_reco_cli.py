"""``cliplab segment --method reco --collection DIR`` and ``--synonyms FILE`` (GKC) on the tiny model."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app

runner = CliRunner()


def _images(folder, count, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(count):
        Image.fromarray(rng.integers(0, 255, (24 + k, 30, 3), dtype=np.uint8)).save(folder / f"c{k}.png")
    return folder


def test_segment_with_reco_from_a_collection(tmp_path):
    collection = _images(tmp_path / "collection", 5, 0)
    image = _images(tmp_path / "in", 1, 1) / "c0.png"
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(image), "--labels", "cat,dog", "--method", "reco", "--collection",
                                 str(collection), "--param", "k=2", "--param", "context=sky", "--model", "tiny",
                                 "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "c0.json").read_text())
    assert record["method"] == "reco" and record["params"]["collection"] == str(collection)
    assert record["params"]["k"] == 2 and record["params"]["context"] == "sky"
    assert np.asarray(Image.open(out / "c0_labels.png")).shape == (24, 30)
    missing = runner.invoke(app, ["segment", str(image), "--labels", "cat", "--method", "reco", "--collection",
                                  str(tmp_path / "nowhere"), "--model", "tiny", "-o", str(out), "-q"])
    assert missing.exit_code != 0 and "collection not found" in missing.output


def test_segment_with_synonyms_file(tmp_path):
    image = _images(tmp_path / "in", 1, 2) / "c0.png"
    same = tmp_path / "same.json"
    same.write_text(json.dumps({"cat": ["Cat"], "dog": []}))
    diverse = tmp_path / "diverse.json"
    diverse.write_text(json.dumps({"cat": ["kitty", "feline"]}))
    runs = {}
    for tag, extra in (("plain", []), ("same", ["--synonyms", str(same)]), ("diverse", ["--synonyms", str(diverse)])):
        out = tmp_path / tag
        result = runner.invoke(app, ["segment", str(image), "--labels", "cat,dog", "--model", "tiny", "-o", str(out),
                                     "-q", *extra])
        assert result.exit_code == 0, result.output
        runs[tag] = (json.loads((out / "c0.json").read_text()), np.asarray(Image.open(out / "c0_labels.png")))
    np.testing.assert_array_equal(runs["same"][1], runs["plain"][1])
    assert runs["plain"][0]["synonyms"] is None and runs["diverse"][0]["synonyms"] == {"cat": ["kitty", "feline"]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"horse": ["pony"]}))
    refused = runner.invoke(app, ["segment", str(image), "--labels", "cat,dog", "--model", "tiny", "--synonyms",
                                  str(bad), "-o", str(tmp_path / "x"), "-q"])
    assert refused.exit_code != 0 and "'horse' is not among the labels" in refused.output


def test_segment_eval_with_synonyms_records_them_beside_the_plain_run(tmp_path, data_root):
    synonyms = tmp_path / "syn.json"
    synonyms.write_text(json.dumps({"airplane": ["aeroplane"], "cat": ["kitten", "kitty"]}))
    out = tmp_path / "res"
    base = ["segment-eval", "--dataset", "mosaic", "--mosaic-count", "2", "--model", "tiny", "--data-root",
            str(data_root), "-o", str(out), "--grid", "0", "-q"]
    for extra in ([], ["--synonyms", str(synonyms)]):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 0, result.output
    plain = json.loads((out / "segment_maskclip_mosaic_test.json").read_text())
    gkc = json.loads((out / "segment_maskclip_mosaic_test_synonyms.json").read_text())
    assert plain["synonyms"] is None
    assert gkc["synonyms"] == {"airplane": ["aeroplane"], "cat": ["kitten", "kitty"]}
    assert gkc["items"] == plain["items"] == 2
