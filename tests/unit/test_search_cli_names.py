"""``cliplab search`` names hits relative to the indexed folder; ``--output`` keeps full paths (issue 21, item 16)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.cli.search import display_name, indexed_root


def test_the_table_shows_names_inside_the_indexed_folder(tmp_path):
    root = tmp_path / ("a-rather-long-folder-name-" * 3) / "images"  # absolute paths far wider than 80 columns
    rng = np.random.default_rng(0)
    files = []
    for i in range(4):
        (root / f"v{i % 2}").mkdir(parents=True, exist_ok=True)
        files.append(root / f"v{i % 2}" / f"photo{i}.png")
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(files[-1])
    runner = CliRunner()
    common = ["--cache-dir", str(tmp_path / "c"), "-q"]
    built = runner.invoke(app, ["index", "build", str(root), "-i", str(tmp_path / "idx"), "--model", "tiny",
                                "-j", "0", *common])
    assert built.exit_code == 0, built.output
    out = tmp_path / "hits.json"
    result = runner.invoke(app, ["search", "a photo", "-i", str(tmp_path / "idx"), "-k", "4", "-o", str(out),
                                 *common])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "\u2502" in line]  # the table's body
    for i in range(len(files)):
        assert any(f"v{i % 2}/photo{i}.png" in row for row in rows)  # each hit by its name inside the folder
    assert not any(root.name in row or "a-rather-long" in row for row in rows)
    records = json.loads(out.read_text())
    assert sorted(r["path"] for r in records) == sorted(str(f.resolve()) for f in files)  # full paths kept


def test_names_outside_the_folder_stay_whole():
    manifest = {"source": {"kind": "folder", "location": "/data/photos"}}
    root = indexed_root(manifest, [])
    assert root == "/data/photos"
    assert display_name("/data/photos/a/b.png", root) == "a/b.png"
    assert display_name("/data/other/b.png", root) == "/data/other/b.png"
    assert display_name("/data/photos-2/b.png", root) == "/data/photos-2/b.png"
    assert indexed_root({"source": {"kind": "dataset", "location": "/d/m.csv"}}, []) == "/d"
    assert indexed_root({"source": {"kind": "named", "location": "cifar10"}}, ["/x/a/1.png", "/x/b/2.png"]) == "/x"
    assert indexed_root({}, []) is None and display_name("", "/x") == ""
