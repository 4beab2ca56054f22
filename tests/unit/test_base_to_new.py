"""The base-to-new protocol (CoCoOp's, issue 24 item 1): the authors' class split, the harmonic mean, fits on base
training shots only, base accuracy among the base classes, new accuracy among the new classes through
``with_classes``, n/a for a head without it, and the `cliplab fewshot --base-to-new` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.data import load_dataset
from cliplab.eval.fewshot import base_new_classes, class_subset, harmonic_mean, run_fewshot
from cliplab.features import embed_images
from cliplab.heads.coop import CoOp

CLASSES = ("red", "green", "blue", "yellow", "cyan")
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("b2n") / "toy"
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 3)):
        for name, colour in zip(CLASSES, COLOURS):
            path = root / split / name
            path.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(path / f"{i}.png")
    return root


def test_the_authors_class_split_and_the_harmonic_mean():
    # subsample_classes: m = ceil(n / 2) base classes (the first, in label order), the rest new
    assert base_new_classes(5) == ([0, 1, 2], [3, 4])
    assert base_new_classes(4) == ([0, 1], [2, 3])
    assert base_new_classes(2) == ([0], [1])
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.48 / 1.4)
    assert harmonic_mean(0.5, 0.5) == 0.5 and harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(1.0, 0.0) == 0.0


def test_class_subset_relabels_in_the_given_order(folder):
    test = load_dataset(folder, split="test")
    sub = class_subset(test, [3, 4], "new")
    assert sub.class_names == [test.class_names[3], test.class_names[4]] and len(sub) == 6
    assert sorted(set(sub.labels.tolist())) == [0, 1]
    for i in range(len(sub)):
        original = int(test.labels[sub.indices[i]])
        assert sub.labels[i] == original - 3 and sub.item_id(i) == test.item_id(int(sub.indices[i]))
    assert sub.split_info["classes"] == "new" and sub.split_info["class_indices"] == [3, 4]


def test_base_to_new_fits_on_base_shots_only_and_scores_each_half_among_its_classes(tiny, folder, tmp_path,
                                                                                      monkeypatch):
    train, test = load_dataset(folder, split="train"), load_dataset(folder, split="test")
    fitted = []
    original = CoOp.fit

    def spy(self, X, y, X_val=None, y_val=None, views=None):
        fitted.append((self, np.array(X), np.array(y), np.array(X_val), np.array(views)))
        return original(self, X, y, X_val=X_val, y_val=y_val, views=views)

    monkeypatch.setattr(CoOp, "fit", spy)
    result = run_fewshot(tiny, train, test, ["zeroshot", "coop", "ncm"], [2], [1], views=2,
                         params={"coop": {"max_epoch": 2, "lr": 0.5}}, output_dir=tmp_path / "out",
                         cache_dir=tmp_path / "cache", workers=0, progress=False, base_to_new=True)
    base_names, new_names = train.class_names[:3], train.class_names[3:]
    head, X, y, X_val, views = fitted[0]
    assert len(fitted) == 1 and list(head.class_names) == base_names
    assert X.shape == (6, 64) and set(y.tolist()) == {0, 1, 2} and views.shape == (2, 6, 64)
    # no test image (base or new), plain or augmented, reaches fit; the training rows are base-class train images
    test_rows = np.asarray(embed_images(tiny, test, tmp_path / "cache", num_workers=0, progress=False).features)
    train_feats = embed_images(tiny, train, tmp_path / "cache", num_workers=0, progress=False)
    seen = np.concatenate([X, X_val, views.reshape(-1, 64)])
    assert not (np.abs(seen[:, None, :] - test_rows[None]).max(axis=2) < 1e-6).any()
    train_labels = np.asarray(train_feats.labels)
    for row in np.concatenate([X, X_val]):
        match = np.flatnonzero(np.abs(np.asarray(train_feats.features) - row).max(axis=1) < 1e-6)
        assert len(match) and train_labels[match[0]] < 3

    runs = {r["method"]: r for r in result.runs}
    test_labels = np.asarray(test.labels)
    base_rows, new_rows = test_rows[test_labels < 3], test_rows[test_labels >= 3]
    # base: the fitted head's logits over the 3 base classes; new: with_classes(new names) over the 2 new ones
    base_acc = float(np.mean(head.predict(base_rows) == test_labels[test_labels < 3]))
    new_head = head.with_classes(new_names)
    new_acc = float(np.mean(new_head.predict(new_rows) == test_labels[test_labels >= 3] - 3))
    assert runs["coop"]["base_acc1"] == pytest.approx(base_acc) and runs["coop"]["new_acc1"] == pytest.approx(new_acc)
    assert runs["coop"]["harmonic_mean"] == pytest.approx(harmonic_mean(base_acc, new_acc))
    assert runs["ncm"]["new_acc1"] is None and runs["ncm"]["harmonic_mean"] is None  # no with_classes: n/a
    assert runs["zeroshot"]["new_acc1"] is not None
    cell = result.base_to_new["coop"][2]
    assert cell["harmonic_mean"] == pytest.approx(harmonic_mean(cell["base"][0], cell["new"][0]))
    summary = json.loads(Path(result.files["json"]).read_text())
    assert summary["protocol"] == "base-to-new" and summary["new_classes"] == new_names
    assert "n/a" in Path(result.files["markdown"]).read_text()
    record = json.loads(Path(runs["coop"]["new_json"]).read_text())["cliplab"]
    assert record["split_info"]["classes"] == "new" and record["num_images"] == 6


def test_the_command_prints_base_new_and_h(folder, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["fewshot", "--dataset", str(folder), "--methods", "zeroshot,coop", "--shots",
                                      "1", "--seeds", "1", "--views", "1", "--param", "coop.max_epoch=1",
                                      "--base-to-new", "--model", "tiny", "-q", "-o", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "base / new / H" in " ".join(result.output.split())
    summary = json.loads(next(out.glob("base2new_*.json")).read_text())
    assert {r["method"] for r in summary["runs"]} == {"zeroshot", "coop"}
    assert all(r["new_acc1"] is not None for r in summary["runs"])
