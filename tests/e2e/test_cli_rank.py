"""``cliplab rank`` and ``cliplab rank-train`` end to end on the tiny model, and their one-line refusals."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.eval.ranking import kendall_tau, pairwise_accuracy

runner = CliRunner()


@pytest.fixture()
def levels(tmp_path):
    """A folder with class folders 0/ .. 3/: four random pictures, each blurred more at each level."""
    rng = np.random.default_rng(0)
    root = tmp_path / "levels"
    for k in range(4):
        (root / str(k)).mkdir(parents=True)
    for i in range(4):
        image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        for k in range(4):
            image.filter(ImageFilter.GaussianBlur(k)).save(root / str(k) / f"img{i}.png")
    return root


def _read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_rank_orders_a_folder_and_scores_it_against_numeric_levels(tmp_path, levels):
    out = tmp_path / "ranking.csv"
    result = runner.invoke(app, ["rank", str(levels), "--by", "how blurry is the image", "--model", "tiny",
                                 "--cache-dir", str(tmp_path / "cache"), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rows = _read(out)
    assert [int(r["rank"]) for r in rows] == list(range(1, 17))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert {r["name"] for r in rows} == {f"{k}/img{i}.png" for k in range(4) for i in range(4)}  # relative names
    first = rows[0]
    assert f"    1  {float(first['score']):+.4f}  {first['name']}" in result.output
    truth = [int(r["name"].split("/")[0]) for r in rows]
    assert f"Kendall tau {kendall_tau(truth, scores):+.4f}" in result.output
    assert f"pairwise accuracy {pairwise_accuracy(truth, scores):.4f}" in result.output
    ascending = runner.invoke(app, ["rank", str(levels), "--by", "how blurry is the image", "--model", "tiny",
                                    "--cache-dir", str(tmp_path / "cache"), "--ascending", "-q"])
    assert ascending.exit_code == 0, ascending.output
    assert f"    1  {scores[-1]:+.4f}  {rows[-1]['name']}" in ascending.output


def test_rank_train_then_rank_with_the_adapter(tmp_path, levels):
    from cliplab.models import load_model
    from cliplab.train.rank_adapter import image_tokens, load_ranker, text_tokens

    cache = str(tmp_path / "cache")
    result = runner.invoke(app, ["rank-train", str(levels), "--by", "how blurry", "-o", str(tmp_path / "ad"),
                                 "--model", "tiny", "--cache-dir", cache, "--epochs", "2", "--train-batch", "8", "-q"])
    assert result.exit_code == 0, result.output
    assert "train (all), adapter: Kendall tau" in result.output
    ranker = load_ranker(tmp_path / "ad")
    assert ranker.text == "how blurry" and ranker.tokens == "patches 4x4"
    assert set(ranker.metrics) == {"train_adapter"}
    out = tmp_path / "ranked.csv"
    used = runner.invoke(app, ["rank", str(levels), "--model-dir", str(tmp_path / "ad"), "--model", "tiny",
                               "--cache-dir", cache, "-o", str(out), "-q"])
    assert used.exit_code == 0, used.output
    assert "ranked by 'how blurry' (rank adapter" in used.output
    tiny = load_model("tiny")
    from cliplab.data import load_dataset

    dataset = load_dataset(levels)
    tokens, indices, _, _ = image_tokens(tiny, dataset, cache)
    expected = dict(zip([dataset.item_id(i) for i in indices], ranker.scores(tokens, text_tokens(tiny, "how blurry"))))
    for row in _read(out):
        assert float(row["score"]) == pytest.approx(expected[row["name"]], abs=1e-6)
    again = runner.invoke(app, ["rank-train", str(levels), "--by", "how blurry", "-o", str(tmp_path / "ad"),
                                "--model", "tiny", "--cache-dir", cache, "-q"])
    assert again.exit_code != 0 and "holds a trained rank adapter already" in again.output
    other = runner.invoke(app, ["rank", str(levels), "--model-dir", str(tmp_path / "ad"), "--model", "tiny",
                                "--seed", "3", "--cache-dir", cache, "-q"])
    assert other.exit_code != 0 and "the adapter was trained on tiny-seed0, not tiny-seed3" in other.output


@pytest.mark.parametrize(("args", "message"), [
    (["rank", "{levels}"], "say what to rank by"),
    (["rank", "{levels}", "--by", "x", "-o", "{tmp}/r.txt"], "give a .csv file"),
    (["rank", "{tmp}/missing", "--by", "x"], "missing"),
    (["rank", "{levels}", "--model-dir", "{tmp}"], "not a rank adapter folder"),
    (["rank-train", "{flat}", "--by", "x", "-o", "{tmp}/o"], "is not a number"),
    (["rank-train", "ordinal:noise", "-o", "{tmp}/o"], "choose ordinal:blur or ordinal:brightness"),
    (["rank-train", "{levels}", "-o", "{tmp}/o"], "say what to rank by"),
    (["rank-train", "{levels}", "--by", "x", "-o", "{tmp}/o", "--pair", "hinge"], "choose from logistic, margin"),
])
def test_bad_input_is_one_line_before_a_model_loads(tmp_path, levels, args, message, monkeypatch):
    flat = tmp_path / "flat"
    (flat / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(flat / "a" / "x.png")

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("cliplab.models.load_model", refuse)
    filled = [a.format(levels=levels, tmp=tmp_path, flat=flat) for a in args]
    result = runner.invoke(app, [*filled, "--model", "tiny", "-q"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


def test_rank_train_on_an_ordinal_set_scores_its_held_out_half(tmp_path, data_root):
    from cliplab.train.rank_adapter import load_ranker

    result = runner.invoke(app, ["rank-train", "ordinal:brightness", "--sources", "4", "--epochs", "1",
                                 "--data-root", str(data_root), "-o", str(tmp_path / "ad"), "--model", "tiny",
                                 "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert result.exit_code == 0, result.output
    assert "trained: rank adapter on 12 images of ordinal-brightness-cifar10" in result.output
    for line in ("train (train), adapter", "test (test), adapter", "test (test), zero-shot cosine"):
        assert line in result.output
    ranker = load_ranker(tmp_path / "ad")
    assert ranker.text == "how bright is the image" and (ranker.low, ranker.high) == (0.0, 5.0)
    assert set(ranker.metrics) == {"train_adapter", "test_adapter", "test_zero_shot"}
    assert ranker.metrics["test_adapter"]["items"] == 12 and ranker.metrics["test_adapter"]["groups"] == 2
    assert f"Kendall tau {ranker.metrics['test_zero_shot']['kendall_tau']:+.4f}" in result.output
