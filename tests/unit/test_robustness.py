"""``cliplab robustness`` (paper 11): per-cell metrics against direct computation, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy.special import softmax
from sklearn.metrics import roc_auc_score

from cliplab.data import load_dataset
from cliplab.data.corruptions import CorruptedDataset
from cliplab.eval.metrics import expected_calibration_error
from cliplab.eval.robustness import evaluate_robustness, seeded_subset
from cliplab.features import embed_images
from cliplab.heads import create_head
from cliplab.ood.scores import mcm


def _folder(root, classes=("cat", "dog"), per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 120 * k, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_cells_match_direct_computation(tiny, tmp_path):
    test = load_dataset(_folder(tmp_path / "id"))
    ood = load_dataset(_folder(tmp_path / "ood", ("x",), per_class=5, seed=1))
    report = evaluate_robustness(tiny, test, "imagenet7", ood=ood, corruptions=["contrast", "gaussian_noise"],
                                 severities=[1, 5], limit=6, seed=2, cache_dir=tmp_path / "cache", progress=False,
                                 output_dir=tmp_path / "out", num_workers=0)
    assert [(r["corruption"], r["severity"]) for r in report.rows] == [
        ("clean", 0), ("contrast", 1), ("contrast", 5), ("gaussian_noise", 1), ("gaussian_noise", 5)]
    subset = seeded_subset(test, 6, 2)
    assert len(subset) == 6 and report.num_images == 6 and report.num_ood == 5
    head = create_head("zeroshot", backbone=tiny, class_names=test.class_names, templates="imagenet7").fit()
    for row in report.rows[::2]:  # clean, contrast 5, noise 5
        view = subset if row["corruption"] == "clean" else CorruptedDataset(subset, row["corruption"],
                                                                            row["severity"], 2)
        ood_view = ood if row["corruption"] == "clean" else CorruptedDataset(ood, row["corruption"],
                                                                            row["severity"], 2)
        x = np.asarray(embed_images(tiny, view, tmp_path / "other", progress=False, num_workers=0).features)
        o = np.asarray(embed_images(tiny, ood_view, tmp_path / "other", progress=False, num_workers=0).features)
        logits = head.logits(x)
        assert row["acc1"] == pytest.approx(np.mean(logits.argmax(1) == subset.labels))
        assert row["ece"] == pytest.approx(expected_calibration_error(subset.labels, softmax(logits, axis=1)))
        truth = np.r_[np.ones(len(x)), np.zeros(len(o))]
        auroc = roc_auc_score(truth, np.r_[mcm(x, head.weights_), mcm(o, head.weights_)])
        assert row["auroc"] == pytest.approx(auroc)
    assert report.rows[2]["acc1"] != report.rows[0]["acc1"] or report.rows[2]["ece"] != report.rows[0]["ece"]
    record = json.loads(report.files["json"].read_text())
    assert record["task"] == "robustness_corruptions" and record["cliplab"]["limit"] == 6
    assert record["cliplab"]["cells"][1]["parameter"] == 0.4
    assert report.files["plot"].stat().st_size > 0


def test_seeded_subset_is_repeatable(tmp_path):
    test = load_dataset(_folder(tmp_path / "id"))
    first, again, other = (seeded_subset(test, 5, s) for s in (0, 0, 1))
    assert first.item_ids() == again.item_ids() != other.item_ids()
    assert seeded_subset(test, 100, 0) is test


def test_command_end_to_end(tmp_path):
    import typer
    from typer.testing import CliRunner

    from cliplab.cli.robustness import robustness

    app = typer.Typer()  # this command alone: the test does not depend on the other commands importing
    app.callback()(lambda: None)
    app.command()(robustness)

    _folder(tmp_path / "id")
    _folder(tmp_path / "ood", ("x",), per_class=3, seed=1)
    out = tmp_path / "out"
    args = ["robustness", "--model", "tiny", "--device", "cpu", "--dataset", str(tmp_path / "id"), "--ood",
            str(tmp_path / "ood"), "--corruptions", "pixelate,brightness", "--severities", "2,4", "--limit", "5",
            "--output-dir", str(out), "--quiet", "--workers", "0", "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "seeded subset of 5" in result.output and "AUROC" in result.output
    (path,) = out.glob("robustness_*.json")
    assert path.name.startswith("robustness_zeroshot_id_") and "_tiny_" in path.name
    record = json.loads(path.read_text())
    cells = record["cliplab"]["cells"]
    assert [(c["corruption"], c["severity"]) for c in cells] == [
        ("clean", 0), ("pixelate", 2), ("pixelate", 4), ("brightness", 2), ("brightness", 4)]
    assert all(0 <= c["acc1"] <= 1 and 0 <= c["auroc"] <= 1 for c in cells)
    assert path.with_suffix(".png").is_file()
    bad = CliRunner().invoke(app, ["0" if a == "2,4" else a for a in args], terminal_width=200)
    assert bad.exit_code == 2 and "severity" in bad.output
    no_ood = CliRunner().invoke(app, [a for a in args if a not in ("--ood", str(tmp_path / "ood"))])
    assert no_ood.exit_code == 0 and "AUROC" not in no_ood.output
    runs = sorted(out.glob("robustness_*.json"))  # the run without --ood did not overwrite the one with it
    assert len(runs) == 2 and path in runs and json.loads(path.read_text()) == record
