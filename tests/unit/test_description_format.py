"""Issue 22 item 7 (part): a CuPL file of sentences given to --descriptions is scored by CuPL, descriptor phrases
by DCLIP, and the command says which ran; sentences sent to --method dclip get a warning."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.cli.common import description_kind

CUPL = {"cat": ["A cat is a small furry animal with whiskers.", "Cats have pointed ears and a long tail."],
        "dog": ["A dog is a loyal animal that barks.", "Most dogs have a wet nose and floppy ears."]}
DCLIP = {"cat": ["whiskers", "pointed ears", "a long tail"], "dog": ["a wet nose", "floppy ears", "a wagging tail"]}


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8), (90, 90, 90)).save(folder / "a.png")
    return folder


def test_description_kind_tells_sentences_from_descriptors():
    assert description_kind(CUPL) == ("sentences", 1.0)
    assert description_kind(DCLIP) == ("descriptors", 0.0)


@pytest.mark.parametrize("content, method", [(CUPL, "cupl"), (DCLIP, "dclip")])
def test_classify_scores_a_description_file_with_the_method_its_format_needs(images, tmp_path, content, method):
    path = tmp_path / "desc.json"
    path.write_text(json.dumps(content))
    result = CliRunner().invoke(app, ["classify", str(images), "--labels", "cat,dog", "--descriptions", str(path),
                                      "--model", "tiny", "-q", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert f"scored with --method {method}" in " ".join(result.output.split())


def test_sentences_sent_to_dclip_are_warned_about(images, tmp_path):
    path = tmp_path / "cupl.json"
    path.write_text(json.dumps(CUPL))
    result = CliRunner().invoke(app, ["classify", str(images), "--labels", "cat,dog", "--descriptions", str(path),
                                      "--method", "dclip", "--model", "tiny", "-q", "--workers", "0"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "reads as CuPL sentences" in text and "--method cupl" in text
