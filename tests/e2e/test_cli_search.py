"""``cliplab index build|update`` and ``cliplab search`` end to end (tiny model, PNGs written here)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.search.sheet import sheet_size

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, list(map(str, args)), catch_exceptions=False)


@pytest.fixture()
def photos(tmp_path):
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(7):
        (root / f"set{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(root / f"set{i % 2}" / f"img{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG garbage")
    return root


def test_index_build_search_update(photos, tmp_path):
    out = tmp_path / "index"
    result = _invoke("index", "build", photos, "--index-dir", out, "--model", "tiny", "-q", "-j", "0")
    assert result.exit_code == 0, result.output
    assert "7 images, index flat" in result.output and "broken.png" in result.output

    hits_json = tmp_path / "hits.json"
    sheet = tmp_path / "hits.png"
    result = _invoke("search", "a red car", "--index-dir", out, "-k", "5", "-o", hits_json, "--sheet", sheet, "-q")
    assert result.exit_code == 0, result.output  # the model comes from the index's manifest
    records = json.loads(hits_json.read_text())
    assert [r["rank"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["score"] for r in records] == sorted((r["score"] for r in records), reverse=True)
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(sheet).size == sheet_size(5)

    query = photos / "set1" / "img3.png"
    hits_csv = tmp_path / "hits.csv"
    result = _invoke("search", "--image", query, "--index-dir", out, "-k", "7", "-o", hits_csv,
                     "--sheet", sheet, "-q")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(hits_csv.open()))
    assert len(rows) == 7 and rows[0]["path"] == str(query.resolve()) and float(rows[0]["score"]) > 0.999
    assert Image.open(sheet).size == sheet_size(7) != sheet_size(5)

    (photos / "set0" / "img0.png").unlink()
    result = _invoke("index", "update", "--index-dir", out, "-q", "-j", "0")
    assert result.exit_code == 0, result.output
    assert "6 images" in result.output and "1 removed" in result.output and "0 embedded now" in result.output


def test_search_errors_are_one_line(photos, tmp_path):
    out = tmp_path / "index"
    assert _invoke("index", "build", photos, "--index-dir", out, "--model", "tiny", "-q", "-j", "0").exit_code == 0
    result = _invoke("search", "cat", "--index-dir", out, "--model", "tiny", "--seed", "3")
    assert result.exit_code == 2 and "tiny-seed0" in result.output and "tiny-seed3" in result.output
    result = _invoke("search", "--index-dir", out)
    assert result.exit_code == 2 and "give a text QUERY or --image FILE" in result.output
    result = _invoke("search", "cat", "--index-dir", tmp_path / "missing")
    assert result.exit_code == 2 and "no search index" in result.output
    (out / "manifest.json").unlink()
    result = _invoke("search", "cat", "--index-dir", out, "--model", "tiny")
    assert result.exit_code == 2 and "cliplab index build again" in result.output


def test_search_captions(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    lines = ["path,caption"]
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(data / f"p{i}.png")
        lines.append(f"p{i}.png,picture number {i}")
    (data / "pairs.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "index"
    assert _invoke("index", "build", data / "pairs.csv", "--index-dir", out, "--model", "tiny", "-q",
                   "-j", "0").exit_code == 0
    hits = tmp_path / "captions.json"
    result = _invoke("search", "--image", data / "p1.png", "--captions", "--index-dir", out, "-k", "3", "-o", hits)
    assert result.exit_code == 0, result.output
    records = json.loads(hits.read_text())
    assert len(records) == 3 and all(r["text"].startswith("picture number") for r in records)


def test_short_flags_extra_columns_model_spec_and_damage(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(2)
    lines = ["path,label,photographer"]
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(data / f"p{i}.png")
        lines.append(f"p{i}.png,c{i % 2},ann{i}")
    (data / "m.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "index"
    result = _invoke("index", "build", data / "m.csv", "-i", out, "--model", "tiny", "--seed", "3", "-q", "-j", "0")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    spec = manifest["model_kwargs"]
    assert spec["name"] == "tiny" and spec["seed"] == 3  # every load_model keyword, not just the name
    assert manifest["model_spec"] == "tiny"  # what older readers (cliplab serve) take
    hits_csv = tmp_path / "hits.csv"
    result = _invoke("search", "--image", data / "p2.png", "-i", out, "-k", "2", "-o", hits_csv, "-q")
    assert result.exit_code == 0, result.output  # reloads tiny with seed 3 from the manifest
    rows = list(csv.DictReader(hits_csv.open()))
    assert rows[0]["extra.photographer"] == "ann2" and rows[0]["extra.label"] == "c0"
    result = _invoke("search", "cat", "-i", out, "--model", "tiny")
    assert result.exit_code == 2 and "--model tiny --seed 3" in result.output  # says which flags to pass
    result = _invoke("search", "   ", "-i", out, "-q")
    assert result.exit_code == 2 and "empty" in result.output
    (out / "manifest.json").write_text("{not json")
    for args in (("index", "update", "-i", out, "-q"), ("search", "cat", "-i", out, "-q")):
        result = _invoke(*args)
        assert result.exit_code == 2 and "damaged" in result.output and "build again" in result.output, result.output


def test_index_build_takes_one_split_of_a_manifest(tmp_path):
    rng = np.random.default_rng(4)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"photo {i}", "split": "val2017" if i < 4 else "train2017"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    base = ["index", "build", str(manifest), "-i", str(tmp_path / "idx"), "--model", "tiny", "-q",
            "--cache-dir", str(tmp_path / "c")]
    refused = runner.invoke(app, base)
    assert refused.exit_code == 2 and "--split NAME" in refused.output  # no test/val/train split: which one?
    result = runner.invoke(app, base + ["--split", "val2017"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output and "4 captions" in result.output
