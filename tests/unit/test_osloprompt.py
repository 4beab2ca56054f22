"""OSLoPrompt (heads/osloprompt.py) and its OOD score (ood/osloprompt.py) on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from cliplab.data import load_dataset
from cliplab.errors import CliplabError
from cliplab.eval.ood import evaluate_ood
from cliplab.features import embed_images
from cliplab.heads import create_head
from cliplab.heads.osloprompt import OSLoPromptObjective
from cliplab.heads.saving import load_head, save_head
from cliplab.ood.metrics import open_set_metrics

NAMES = ["cat", "dog", "bird"]


def _features(tiny, seed: int = 0):
    """Class-structured unit features: 4 training items per known class, 2 validation, 6 pseudo-open (a 4th
    direction)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, tiny.embed_dim))

    def draw(y):
        x = centres[y] + 0.5 * rng.normal(size=(len(y), tiny.embed_dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    y, y_val = np.repeat(np.arange(3), 4), np.repeat(np.arange(3), 2)
    return draw(y), y, draw(y_val), y_val, draw(np.full(6, 3))


def test_attention_off_without_pseudo_open_samples_is_coop(tiny):
    X, y, X_val, y_val, _ = _features(tiny)
    shifted = X + 0.1 * np.random.default_rng(1).normal(size=X.shape).astype(np.float32)
    views = np.stack([X, shifted / np.linalg.norm(shifted, axis=1, keepdims=True)])  # two views per item
    common = dict(backbone=tiny, class_names=NAMES, max_epoch=2, batch_size=4)
    coop = create_head("coop", **common).fit(X, y, X_val=X_val, y_val=y_val, views=views)
    oslo = create_head("osloprompt", attention=False, **common).fit(X, y, X_val=X_val, y_val=y_val, views=views)
    np.testing.assert_array_equal(oslo.ctx_, coop.ctx_)
    np.testing.assert_array_equal(oslo.weights_, coop.weights_)
    assert oslo.training_loss_ == coop.training_loss_ and oslo.val_accuracy_ == coop.val_accuracy_
    assert oslo.unknown_weights_ is None and oslo.n_open_ == 0 and oslo.n_attributes_ == 0
    with pytest.raises(CliplabError, match="fitted without pseudo-open samples"):
        oslo.open_logits(X)


def test_attention_changes_the_context_and_uses_the_attributes(tiny):
    X, y, _, _, _ = _features(tiny)
    off = create_head("osloprompt", backbone=tiny, class_names=NAMES, max_epoch=2, attention=False).fit(X, y)
    on = create_head("osloprompt", backbone=tiny, class_names=NAMES, max_epoch=2,
                     descriptions={"cat": ["whiskers", "fur"], "dog": ["a tail"], "bird": ["wings", "a beak", ""]}
                     ).fit(X, y)
    assert on.n_attributes_ == 5  # 2 + 1 + 2 phrases (the blank one dropped), padded to 2 per class with a mask
    assert on.attribute_sentences()[0] == ["cat, which has whiskers", "cat, which has fur"]
    assert not np.allclose(on.ctx_, off.ctx_)  # the consistency term pulls the learned prompts
    default = create_head("osloprompt", backbone=tiny, class_names=NAMES)
    assert default.attribute_sentences()[1] == ["the shape of a dog", "the colour of a dog", "the texture of a dog",
                                                 "the parts of a dog"]


def test_the_objective_is_its_written_out_formula(tiny):
    X, y, _, _, X_open = _features(tiny)
    head = create_head("osloprompt", backbone=tiny, class_names=NAMES, attention_dropout=0.0)
    learner = head.build_learner(with_unknown=True).eval()
    batch = {"features": torch.from_numpy(X[:5]), "labels": torch.from_numpy(y[:5]), "open": torch.from_numpy(X_open)}
    loss, _ = OSLoPromptObjective(style_weight=0.33, consistency_weight=1.0)(learner, batch)
    with torch.no_grad():
        text = learner.text_features()  # (4, d): cat, dog, bird, unknown
        s = learner.logit_scale
        x = torch.cat([batch["features"], batch["open"]])
        target = torch.tensor([*y[:5], 3, 3, 3, 3, 3, 3])
        ce = F.cross_entropy(s * x @ text.T, target)
        e = learner.attribute_text(batch["features"])  # (5, 3, d)
        style = F.cross_entropy(s * torch.einsum("bd,bkd->bk", batch["features"], e), batch["labels"])
        consistency = np.mean([1 - float(text[k] @ e[b, k] / (text[k].norm() * e[b, k].norm()))
                               for b in range(5) for k in range(3)])
    assert float(loss.detach()) == pytest.approx(float(ce) + 0.33 * float(style) + consistency, rel=1e-5)
    # per image and class, the cross-attention output shifts each token of the attribute prompt "a photo of a"
    assert e.shape == (5, 3, tiny.embed_dim) and torch.allclose(e.norm(dim=-1), torch.ones(5, 3), atol=1e-5)


def test_a_sample_whose_unknown_logit_wins_is_rejected(tiny):
    X, y, _, _, X_open = _features(tiny)
    head = create_head("osloprompt", backbone=tiny, class_names=NAMES, max_epoch=2).fit(X, y, X_open=X_open)
    assert head.n_open_ == 6 and head.unknown_weights_.shape == (tiny.embed_dim,)
    u = head.unknown_weights_ / np.linalg.norm(head.unknown_weights_)
    w0 = head.weights_[:, 0] / np.linalg.norm(head.weights_[:, 0])
    probe = np.stack([u, w0]).astype(np.float32)  # the unknown prompt's own direction, then class 0's
    logits = head.open_logits(probe)
    np.testing.assert_allclose(logits, head.logit_scale_ * np.hstack([probe @ head.weights_,
                                                                      (probe @ head.unknown_weights_)[:, None]]),
                               rtol=1e-6)
    assert logits[0, 3] > logits[0, :3].max() and logits[1, 0] > logits[1, 3]
    np.testing.assert_array_equal(head.predict_open(probe), [-1, 0])
    margin = head.unknown_margin(probe)
    assert margin[0] < 0 < margin[1]
    np.testing.assert_allclose(margin, logits[:, :3].max(axis=1) - logits[:, 3], rtol=1e-6)
    np.testing.assert_allclose(head.logits(probe), logits[:, :3], rtol=1e-6)  # the contract's logits: known only


def test_save_and_load_keep_the_unknown_prompt(tiny, tmp_path):
    X, y, _, _, X_open = _features(tiny)
    head = create_head("osloprompt", backbone=tiny, class_names=NAMES, max_epoch=1).fit(X, y, X_open=X_open)
    loaded = load_head(save_head(head, tmp_path / "oslo"), tiny)
    np.testing.assert_array_equal(loaded.open_logits(X), head.open_logits(X))
    np.testing.assert_array_equal(loaded.predict_open(X_open), head.predict_open(X_open))
    closed = create_head("osloprompt", backbone=tiny, class_names=NAMES, max_epoch=1, attention=False).fit(X, y)
    again = load_head(save_head(closed, tmp_path / "closed"), tiny)
    assert again.unknown_weights_ is None
    np.testing.assert_array_equal(again.logits(X), closed.logits(X))
    renamed = head.with_classes(["cow", "horse"])  # the learned context, the unknown prompt kept
    assert renamed.weights_.shape == (tiny.embed_dim, 2)
    np.testing.assert_allclose(renamed.unknown_weights_, head.unknown_weights_, atol=1e-6)


def test_a_finished_checkpoint_gives_its_result_and_other_pseudo_open_data_is_refused(tiny, tmp_path):
    X, y, _, _, X_open = _features(tiny)
    params = dict(backbone=tiny, class_names=NAMES, max_epoch=2, checkpoint_dir=str(tmp_path / "ckpt"))
    first = create_head("osloprompt", **params).fit(X, y, X_open=X_open)
    again = create_head("osloprompt", **params).fit(X, y, X_open=X_open)
    np.testing.assert_array_equal(again.ctx_, first.ctx_)
    assert again.training_loss_ == first.training_loss_
    with pytest.raises(CliplabError) as refused:
        create_head("osloprompt", **params).fit(X, y, X_open=X_open[:3])
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("params, fit, message", [
    (dict(open_classes="cat", open_data="x"), {}, None),  # resolved below with a real folder
    (dict(unknown_name="Dog"), {}, "unknown_name 'Dog' is one of the known classes"),
    (dict(attention_heads=5), {}, "attention_heads must be a positive divisor"),
    (dict(attention_dropout=1.0), {}, "attention_dropout must be in"),
    (dict(optimizer="adam"), {}, "optimizer must be 'sgd' (CoOp's) or 'adamw'"),
    (dict(open_classes="fox"), {}, "open_classes names classes of open_data; give open_data too"),
    (dict(), {"X_open": np.ones((2, 7), np.float32)}, "OSLoPrompt"),
    (dict(open_data="somewhere"), {"X_open": "open"}, "as X_open or as open_data, not both"),
])
def test_bad_input_is_one_line(tiny, tmp_path, params, fit, message):
    X, y, _, _, X_open = _features(tiny)
    if message is None:  # a held-out class that is a known class
        root = _class_folders(tmp_path / "open", ("cat", "fox"), 2)
        params = dict(params, open_data=str(root))
        message = "open class 'cat' is a known class"
    fit = {k: (X_open if isinstance(v, str) and v == "open" else v) for k, v in fit.items()}
    head = create_head("osloprompt", backbone=tiny, class_names=NAMES, max_epoch=1, **params)
    with pytest.raises((CliplabError, ValueError)) as error:
        head.fit(X, y, **fit)
    assert message in str(error.value) and "\n" not in str(error.value)


def _class_folders(root, names, count, seed=0):
    rng = np.random.default_rng(seed)
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.clip(30 + 70 * k + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _split_folders(root):
    for split, count in (("train", 3), ("val", 1), ("test", 3)):
        _class_folders(root / "id" / split, ("cat", "dog"), count, seed=len(split))
    _class_folders(root / "ood", ("car", "ship"), 2, seed=9)
    _class_folders(root / "held", ("cat", "fox", "owl"), 2, seed=5)  # pseudo-open: fox and owl, never the OOD set
    return root / "id", root / "ood", root / "held"


def test_the_ood_door_reports_known_accuracy_and_h_score(tiny, tmp_path):
    id_dir, ood_dir, held = _split_folders(tmp_path)
    test, train, val = (load_dataset(id_dir, split=s) for s in ("test", "train", "val"))
    ood, cache = load_dataset(ood_dir), tmp_path / "cache"
    report = evaluate_ood(tiny, test, [ood], ["osloprompt", "msp"], "generic", head="osloprompt",
                          head_params={"max_epoch": 2, "open_data": str(held), "open_classes": "fox,owl"},
                          fit_datasets=(train, val), cache_dir=cache)
    metrics = report.record["metrics"]
    assert set(metrics["open_set"]) == {"osloprompt"}  # msp has no decision of its own
    assert report.record["cliplab"]["head_params"]["open_classes"] == "fox,owl"
    # the same head, refitted by hand on the same inputs, predicts the same open-set decisions
    t, v = embed_images(tiny, train, cache).labelled(), embed_images(tiny, val, cache).labelled()
    from cliplab.eval.inputs import prepare_fit

    views = prepare_fit(create_head("osloprompt", backbone=tiny, class_names=test.class_names), tiny, train,
                        cache_dir=cache, progress=False).fit_params.get("views")
    head = create_head("osloprompt", backbone=tiny, class_names=test.class_names, max_epoch=2, cache_dir=cache,
                       open_data=str(held), open_classes="fox,owl").fit(t.features, t.labels, X_val=v.features,
                                                                         y_val=v.labels, views=views)
    assert head.n_open_ == 4
    x_id, x_ood = embed_images(tiny, test, cache), embed_images(tiny, ood, cache)
    np.testing.assert_allclose(report.scores["osloprompt"][test.name], head.unknown_margin(x_id.features), rtol=1e-5)
    known = float(np.mean(head.predict_open(x_id.features) == x_id.labels))
    unknown = float(np.mean(head.predict_open(x_ood.features) == -1))
    got = metrics["open_set"]["osloprompt"][ood.name]
    assert got["acc_known"] == pytest.approx(known) and got["acc_unknown"] == pytest.approx(unknown)
    assert got == pytest.approx(open_set_metrics(head.predict(x_id.features), x_id.labels,
                                                 head.unknown_margin(x_id.features),
                                                 head.unknown_margin(x_ood.features)))


def test_the_score_refuses_another_head_before_embedding(tiny, tmp_path):
    id_dir, ood_dir, _ = _split_folders(tmp_path)
    test, ood = load_dataset(id_dir, split="test"), load_dataset(ood_dir)
    with pytest.raises(CliplabError, match="reads an OSLoPrompt head's unknown prompt, not a ZeroShot"):
        evaluate_ood(tiny, test, [ood], ["osloprompt"], "generic", cache_dir=tmp_path / "cache")
    with pytest.raises(CliplabError, match="has no unknown prompt without pseudo-open samples"):
        evaluate_ood(tiny, test, [ood], ["osloprompt"], "generic", head="osloprompt", cache_dir=tmp_path / "cache",
                     fit_datasets=(test, test))
    assert not (tmp_path / "cache").exists()


def test_command_line_ood_with_the_osloprompt_method(tiny, tmp_path):
    from cliplab.cli.app import app

    id_dir, ood_dir, held = _split_folders(tmp_path)
    args = ["ood", "--model", "tiny", "--device", "cpu", "--id", str(id_dir), "--split", "test", "--ood", str(ood_dir),
            "--cache-dir", str(tmp_path / "cache"), "-q", "--workers", "0", "--scores", "osloprompt,msp",
            "--method", "osloprompt", "--param", "max_epoch=1", "--param", f"open_data={held}",
            "--param", "open_classes=fox,owl", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "H-score" in result.output and "known acc" in result.output
    (path,) = (tmp_path / "out").glob("ood_osloprompt_*.json")
    record = json.loads(path.read_text())
    assert 0 <= record["metrics"]["open_set"]["osloprompt"]["ood"]["h_score"] <= 1
