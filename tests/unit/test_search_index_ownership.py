"""Only folders cliplab published are replaced (issue 21 item 7); after a kill between the two publish renames,
the index is recovered before its manifest is read (item 9)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.errors import SearchIndexError
from cliplab.search import SearchIndex, build_index
from cliplab.search import index as index_module


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def _build(tiny, folder, out, tmp_path):
    return build_index(tiny, folder, out, progress=False, workers=0, cache_dir=tmp_path / "c", model_spec="tiny")


def test_a_users_own_files_with_index_names_are_never_replaced(tiny, folder, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text(json.dumps({"experiment": 3, "files": {}}))
    np.save(mine / "vectors.npy", np.arange(6.0))
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    with pytest.raises(SearchIndexError) as caught:
        _build(tiny, folder, mine, tmp_path)
    assert "did not write them" in str(caught.value) and "\n" not in str(caught.value)
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before


def test_cliplab_replaces_what_it_published(tiny, folder, tmp_path):
    out = tmp_path / "index"
    _build(tiny, folder, out, tmp_path)
    marker = json.loads((out / index_module.MARKER).read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert marker["format"] == index_module.MARKER_FORMAT and marker["version"] == index_module.MARKER_VERSION
    assert manifest["index_id"] == marker["id"]
    (out / "vectors.npy").write_bytes(b"damaged")  # a damaged index of cliplab's own is still replaced
    _build(tiny, folder, out, tmp_path)
    assert json.loads((out / index_module.MARKER).read_text())["id"] != marker["id"]  # a fresh id per publish
    with SearchIndex.open(out, verify=True) as index:
        assert index.count == 5
    (out / index_module.MARKER).write_text(json.dumps({"format": "something-else", "version": 1, "id": "x"}))
    with pytest.raises(SearchIndexError):
        _build(tiny, folder, out, tmp_path)


def test_an_index_from_before_markers_is_still_replaced(tiny, folder, tmp_path):
    out = tmp_path / "index"
    _build(tiny, folder, out, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / index_module.MARKER).unlink()
    del manifest["files"][index_module.MARKER], manifest["index_id"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert _build(tiny, folder, out, tmp_path).count == 5


def test_update_after_a_kill_between_the_renames_reads_the_recovered_manifest(tiny, folder, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "index"
    _build(tiny, folder, out, tmp_path)
    os.rename(out, tmp_path / f".index.old-{os.getpid()}-deadbeef")  # what a kill between the renames leaves
    assert not out.exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the wrong default model (ViT-B-32) could not even load
    result = CliRunner().invoke(app, ["index", "update", "-i", str(out), "-q", "-j", "0",
                                      "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert out.is_dir() and not list(tmp_path.glob(".index.old-*"))
    with SearchIndex.open(out) as index:
        assert index.count == 5 and index.model_id == tiny.model_id
    assert index_module.index_manifest(out)["model_spec"] == "tiny"
    assert index_module.index_manifest(tmp_path / "nothing-here") is None
