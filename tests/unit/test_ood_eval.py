"""cliplab.eval.ood and ``cliplab ood``: metrics recomputed independently on the tiny model, files, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.data import load_dataset
from cliplab.eval.ood import evaluate_ood
from cliplab.features import class_weights, embed_images
from cliplab.ood import energy, glmcm, mcm, msp, ood_metrics


def _folders(root):
    rng = np.random.default_rng(0)
    for cls, base in (("cat", 40), ("dog", 200)):
        (root / "id" / cls).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(base + rng.normal(0, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "id" / cls / f"{i}.png")
    (root / "ood").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "ood" / f"{i}.png")
    return root / "id", root / "ood"


def test_metrics_match_an_independent_computation(tiny, tmp_path):
    id_dir, ood_dir = _folders(tmp_path)
    id_data, ood_data = load_dataset(id_dir), load_dataset(ood_dir)
    templates = ["a photo of a {c}."]
    report = evaluate_ood(tiny, id_data, [ood_data], ["msp", "energy", "mcm", "glmcm"], templates, tmp_path / "out",
                          cache_dir=tmp_path / "cache", batch_size=4, params={"lambda_local": 0.5})
    w = class_weights(tiny, ["cat", "dog"], templates, cache_dir=tmp_path / "cache")
    expected = {}
    for name, data in (("id", id_data), ("ood", ood_data)):
        x = embed_images(tiny, data, tmp_path / "cache").features
        images = torch.stack([tiny.preprocess(data.load_image(i)) for i in range(len(data))])
        logits = tiny.logit_scale * x @ w
        expected[name] = {"msp": msp(logits), "energy": energy(logits), "mcm": mcm(x, w),
                          "glmcm": glmcm(x, tiny.dense_features(images).numpy(), w, lambda_local=0.5)}
        if name == "id":
            accuracy = np.mean(logits.argmax(1) == data.labels)
    record = json.loads(report.files["json"].read_text())
    assert record["metrics"]["id_accuracy"] == pytest.approx(accuracy)
    assert record["cliplab"]["fpr95_convention"] == "id-positive"
    for score in ("msp", "energy", "mcm", "glmcm"):
        np.testing.assert_allclose(report.scores[score]["id"], expected["id"][score], rtol=1e-5)
        np.testing.assert_allclose(report.scores[score]["ood"], expected["ood"][score], rtol=1e-5)
        got = record["metrics"]["ood"][score]["ood"]
        want = ood_metrics(report.scores[score]["id"], report.scores[score]["ood"])
        assert got == pytest.approx(want)
        assert got["fpr95_convention"] == "id-positive" and got["n_id"] == 12 and got["n_ood"] == 5
    stem = report.files["json"].stem
    assert stem.startswith("ood_zeroshot_id_") and "_tiny_" in stem  # what ran, on what, with which model
    assert report.files["roc"].name == f"{stem}_roc.png" and report.files["histogram"].name == f"{stem}_hist.png"
    for path in report.files.values():
        assert path.parent == tmp_path / "out" and path.stat().st_size > 0


def test_runs_with_other_settings_do_not_overwrite_each_other(tiny, tmp_path):
    id_data, ood_data = (load_dataset(p) for p in _folders(tmp_path))
    out = tmp_path / "out"

    def run(scores):
        return evaluate_ood(tiny, id_data, [ood_data], scores, ["a photo of a {c}."], out,
                            cache_dir=tmp_path / "cache", batch_size=4).files

    first = run(["msp"])
    kept = first["json"].read_bytes()
    second = run(["energy"])
    assert set(first.values()).isdisjoint(second.values())
    assert first["json"].read_bytes() == kept  # the first run's results are still there
    assert run(["msp"]) == first  # the same run again replaces its own files
    assert len(list(out.glob("*.json"))) == 2 and len(list(out.glob("*.png"))) == 4


def test_a_new_score_plugs_in_by_registering_it_here(tiny, tmp_path, monkeypatch):
    """A score defined in this test module, registered with the decorator, runs with no other change."""
    from cliplab.ood import registry
    from cliplab.ood.base import OODScore

    registry.load_all()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the registration ends with the test

    @registry.register_score("test-norm", paper="none", needs=("features", "logits"))
    class Norm(OODScore):
        """minus the row number, plus offset times the top logit (a throwaway)"""

        def __init__(self, offset: float = 0.0):
            self.offset = offset

        def score(self, inputs):
            return -np.arange(len(inputs.features), dtype=float) + self.offset * inputs.logits.max(axis=1)

    id_dir, ood_dir = _folders(tmp_path)
    report = evaluate_ood(tiny, load_dataset(id_dir), [load_dataset(ood_dir)], ["test-norm", "msp"], "generic",
                          cache_dir=tmp_path / "cache")
    assert report.files == {}
    m = report.record["metrics"]["ood"]["test-norm"]["ood"]
    assert m["auroc"] == pytest.approx(ood_metrics(-np.arange(12.0), -np.arange(5.0))["auroc"])
    assert report.record["cliplab"]["score_params"]["test-norm"] == {"offset": 0.0}
    shifted = evaluate_ood(tiny, load_dataset(id_dir), [load_dataset(ood_dir)], ["test-norm"], "generic",
                           cache_dir=tmp_path / "cache", params={"test-norm.offset": 2.0})
    x = embed_images(tiny, load_dataset(id_dir), tmp_path / "cache").features
    logits = tiny.logit_scale * x @ class_weights(tiny, ["cat", "dog"], "generic", cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(shifted.scores["test-norm"]["id"], -np.arange(12.0) + 2 * logits.max(axis=1),
                               rtol=1e-5)


def test_cli_end_to_end_labels_the_fpr_convention(tmp_path):
    from typer.testing import CliRunner

    from cliplab.cli.app import app

    id_dir, ood_dir = _folders(tmp_path)
    out = tmp_path / "out"
    args = ["ood", "--model", "tiny", "--id", str(id_dir), "--ood", f"{ood_dir},{ood_dir}", "--scores", "msp,mcm",
            "--fpr-convention", "ood-positive", "--output-dir", str(out), "--cache-dir", str(tmp_path / "c"), "-q",
            "--workers", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "FPR@95 (ood-positive)" in result.output and "AUROC" in result.output
    (path,) = out.glob("ood_*.json")
    assert str(path) in result.output  # the command names the file it wrote
    record = json.loads(path.read_text())
    assert record["cliplab"]["fpr95_convention"] == "ood-positive"
    assert set(record["metrics"]["ood"]["mcm"]) == {"ood", "ood'"}
    assert all(m["fpr95_convention"] == "ood-positive" for s in record["metrics"]["ood"].values() for m in s.values())
    bad = CliRunner().invoke(app, args[:6] + ["--scores", "mcm,bogus", "--output-dir", str(out)])
    assert bad.exit_code != 0 and "bogus" in bad.output


def _split_folders(root):
    """ID train/ val/ test/ class folders (cat dark, dog bright) and an OOD folder of noise."""
    rng = np.random.default_rng(1)
    for split, count in (("train", 6), ("val", 3), ("test", 4)):
        for cls, base in (("cat", 40), ("dog", 200)):
            (root / "id" / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(base + rng.normal(0, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / "id" / split / cls / f"{i}.png")
    (root / "ood").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "ood" / f"{i}.png")
    return root / "id", root / "ood"


def test_cooked_fits_on_train_and_val_only(tiny, tmp_path):
    from cliplab.heads import create_head
    from cliplab.heads.cooked import cooked_scores

    id_dir, ood_dir = _split_folders(tmp_path)
    test, train, val = (load_dataset(id_dir, split=s) for s in ("test", "train", "val"))
    ood = load_dataset(ood_dir)
    cache = tmp_path / "cache"
    report = evaluate_ood(tiny, test, [ood], ["cooked"], "generic", cache_dir=cache, fit_datasets=(train, val))
    x = {name: embed_images(tiny, d, cache) for name, d in (("train", train), ("val", val), ("test", test),
                                                            ("ood", ood))}
    head = create_head("cooked", backbone=tiny, class_names=test.class_names).fit(
        x["train"].features, x["train"].labels, X_val=x["val"].features, y_val=x["val"].labels)
    for name in ("test", "ood"):
        part = "id" if name == "test" else "ood"
        np.testing.assert_allclose(report.scores["cooked"][part], cooked_scores(head, x[name].features)["entropy"],
                                   rtol=1e-6)
    with pytest.raises(Exception, match="shares 8 images with the ID test set"):
        evaluate_ood(tiny, test, [ood], ["cooked"], "generic", cache_dir=cache, fit_datasets=(test, val))
    with pytest.raises(Exception, match="needs the ID dataset's train and val splits"):
        evaluate_ood(tiny, test, [ood], ["cooked"], "generic", cache_dir=cache)


def test_clipn_scores_come_from_the_trained_model(tiny, tmp_path):
    from cliplab.ood import atd_score, ctw_score
    from cliplab.train.clipn import ClipnModel, clipn_probabilities

    id_dir, ood_dir = _folders(tmp_path)
    id_data, ood_data = load_dataset(id_dir), load_dataset(ood_dir)
    clipn = ClipnModel.init(tiny, n_prompts=2)
    with torch.no_grad():  # a "no" encoder that differs from CLIP's text tower, as after training
        clipn.prompts.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    templates = ["a photo of a {c}."]
    report = evaluate_ood(tiny, id_data, [ood_data], ["clipn-ctw", "clipn-atd"], templates,
                          cache_dir=tmp_path / "cache", artefact=clipn)
    x = embed_images(tiny, ood_data, tmp_path / "cache").features
    p_yes, p_no = clipn_probabilities(clipn, x, ["cat", "dog"], templates)
    np.testing.assert_allclose(report.scores["clipn-ctw"]["ood"], ctw_score(p_yes, p_no), rtol=1e-6)
    np.testing.assert_allclose(report.scores["clipn-atd"]["ood"], atd_score(p_yes, p_no), rtol=1e-6)
    with pytest.raises(Exception, match="--artefact FOLDER"):
        evaluate_ood(tiny, id_data, [ood_data], ["clipn-ctw"], templates, cache_dir=tmp_path / "cache")
