"""cliplab incremental end to end: sessions of new classes with CPE-CLIP, per-session accuracy on the seen classes
recomputed from the saved heads, forgetting, plot, resume, and one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.eval.incremental import check_sessions, forgetting, session_accuracies, split_sessions

runner = CliRunner()
COLOURS = ((220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40))


@pytest.fixture()
def paints(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for c, colour in enumerate(COLOURS):
            folder = tmp_path / "paints" / split / f"kind{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path / "paints"


def _run(paints, out, *extra):
    args = ["incremental", "--dataset", paints, "--sessions", "2", "--shots", "2", "--model", "tiny", "-o", out,
            "--param", "base_epochs=1", "--param", "epochs=1", "--workers", "0", "-q", *extra]
    return runner.invoke(app, [str(a) for a in args])


def test_sessions_accuracy_forgetting_plot_and_resume(paints, tmp_path):
    out = tmp_path / "run"
    result = _run(paints, out)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "incremental.json").read_text())
    assert saved["sessions"] == [[0, 1], [2, 3]] and len(saved["accuracy"]) == 2
    assert (out / "incremental.png").stat().st_size > 0 and (out / "session-2" / "head.json").is_file()
    # the numbers again, from the saved head of session 2 and the test images
    from cliplab.data import load_dataset
    from cliplab.heads.saving import load_head
    from cliplab.models import load_model

    tiny = load_model("tiny", device="cpu")
    head = load_head(out / "session-2", tiny, method="cpe-clip")
    test = load_dataset(str(paints), split="test")
    import torch

    pixels = torch.stack([head.backbone_.preprocess(test.load_image(i).convert("RGB")) for i in range(len(test))])
    logits = head.logits(head.backbone_.encode_images(pixels).numpy())
    acc = session_accuracies(logits, np.asarray(test.labels), [[0, 1], [2, 3]])
    np.testing.assert_allclose(saved["acc"][1], acc, atol=1e-9)
    assert saved["forgetting"] == pytest.approx([0.0, saved["acc"][0][0] - saved["acc"][1][0]])
    assert "session 2/2" in result.output
    again = _run(paints, out)  # finished: loads, trains nothing, same numbers
    assert again.exit_code == 0, again.output
    assert json.loads((out / "incremental.json").read_text())["accuracy"] == saved["accuracy"]
    other = _run(paints, out, "--shots", "1")
    assert other.exit_code != 0 and "run with shots 2, not 1" in " ".join(other.output.split())
    assert "Traceback" not in other.output


def test_overlapping_sessions_are_refused_in_one_line(paints, tmp_path):
    result = _run(paints, tmp_path / "x", "--session-classes", "0,1;1,2")
    assert result.exit_code != 0
    assert "sessions 1 and 2 both hold class 1" in " ".join(result.output.split()) and "Traceback" not in result.output


def test_session_split_and_forgetting_by_hand():
    assert split_sessions(5, 2) == [[0, 1, 2], [3, 4]]
    with pytest.raises(Exception, match="overlap"):
        check_sessions([[0], [0, 1]], 3)
    acc = [[0.9], [0.6, 0.8], [0.7, 0.5, 1.0]]
    assert forgetting(acc) == pytest.approx([0.0, 0.3, ((0.9 - 0.7) + (0.8 - 0.5)) / 2])
    logits = np.array([[0.0, 2.0, 1.0, 9.0], [3.0, 1.0, 0.0, 9.0], [0.0, 0.0, 5.0, 9.0]])  # class 3 unseen
    assert session_accuracies(logits, np.array([1, 1, 2]), [[0, 1], [2]]) == [0.5, 1.0]
