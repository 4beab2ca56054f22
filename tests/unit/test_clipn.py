"""CLIPN (paper 18): losses against the authors' formulas written out, CTW/ATD by hand, training, save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cliplab.errors import ModelLoadError
from cliplab.ood.clipn import atd, ctw
from cliplab.train.clipn import (
    ClipnModel,
    clipn_loss,
    clipn_probabilities,
    evaluate_loss,
    itbo_loss,
    train_clipn,
    tso_loss,
)


def _unit(rows, dim, seed):
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def test_losses_match_scalar_reference():
    img, txt, no = _unit(3, 4, 0), _unit(3, 4, 1), _unit(3, 4, 2)
    s = 7.0
    yes_terms, no_terms = [], []
    for i in range(3):
        for j in range(3):
            ly, ln = s * float(img[i] @ txt[j]), s * float(img[i] @ no[j])
            p_yes = math.exp(ly) / (math.exp(ly) + math.exp(ln))
            (yes_terms if i == j else no_terms).append(-math.log(p_yes if i == j else 1 - p_yes))
    ref_yes, ref_no = sum(yes_terms) / 3, sum(no_terms) / 6
    ref_tso = sum(2 - math.sqrt(2 - 2 * float(txt[k] @ no[k]) + 1e-4) for k in range(3)) / 3
    got_yes, got_no = itbo_loss(img, txt, no, s)
    assert float(got_yes) == pytest.approx(ref_yes, rel=1e-10)
    assert float(got_no) == pytest.approx(ref_no, rel=1e-10)
    assert float(tso_loss(txt, no)) == pytest.approx(ref_tso, rel=1e-10)
    assert float(clipn_loss(img, txt, no, s)) == pytest.approx(0.5 * (ref_yes + ref_no + ref_tso), rel=1e-10)
    # opposite texts: TSO at its minimum 2 - sqrt(4 + eps)
    assert float(tso_loss(txt, -txt)) == pytest.approx(2 - math.sqrt(4 + 1e-4), rel=1e-10)


def test_ctw_and_atd_hand_cases():
    p_yes = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    p_no = np.array([[0.1, 0.9, 0.9], [0.8, 0.1, 0.1]])
    score, is_ood = ctw(p_yes, p_no)
    np.testing.assert_allclose(score, [0.9, 0.2])
    assert is_ood.tolist() == [False, True]
    score, is_ood = atd(p_yes, p_no)
    # row 0: 0.63 + 0.02 + 0.01 = 0.66, p_ood 0.34 < max 0.63 -> ID
    # row 1: 0.10 + 0.27 + 0.18 = 0.55, p_ood 0.45 > max 0.27 -> OOD
    np.testing.assert_allclose(score, [0.66, 0.55])
    assert is_ood.tolist() == [False, True]
    with pytest.raises(ValueError):
        ctw(p_yes, p_no[:, :2])


class _Captioned:
    name = "synthetic"

    def __init__(self, captions):
        self.captions = captions


CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a yellow star",
            "a black cat", "a white dog", "a small car", "a tall tree"]


def _features(tiny):
    return _unit(len(CAPTIONS), tiny.embed_dim, 5).float().numpy()


def test_training_lowers_loss_and_touches_only_no_encoder(tiny):
    feats = _features(tiny)
    before_backbone = {n: p.clone() for n, p in tiny.model.named_parameters()}
    untrained = ClipnModel.init(tiny, n_prompts=4)
    loss0 = evaluate_loss(untrained, feats, CAPTIONS)
    model = train_clipn(tiny, _Captioned([[c] for c in CAPTIONS]), steps=15, batch_size=8, lr=3e-3, n_prompts=4,
                        seed=0, device="cpu", image_features=feats)
    assert evaluate_loss(model, feats, CAPTIONS) < loss0 - 0.05
    for name, param in tiny.model.named_parameters():  # the given backbone never changes
        assert torch.equal(param, before_backbone[name]), name
    text = set(model.text_names)
    assert any("visual" in n for n in before_backbone) and not any("visual" in n for n in text)
    changed = {n for n, p in model.no_encoder.model.named_parameters() if not torch.equal(p, before_backbone[n])}
    assert changed and changed <= text  # image tower, logit scale unchanged in the copy
    assert "logit_scale" not in changed
    assert model.prompts.abs().sum() > 0
    # seeded
    again = train_clipn(tiny, _Captioned([[c] for c in CAPTIONS]), steps=15, batch_size=8, lr=3e-3, n_prompts=4,
                        seed=0, device="cpu", image_features=feats)
    np.testing.assert_allclose(again.history, model.history, rtol=1e-5)


def test_save_load_round_trip_and_wrong_model(tiny, tmp_path):
    feats = _features(tiny)
    model = train_clipn(tiny, _Captioned([[c, c + " again"] for c in CAPTIONS]), steps=3, batch_size=4, lr=1e-3,
                        n_prompts=2, seed=1, device="cpu", image_features=feats)
    model.save(tmp_path / "clipn")
    loaded = ClipnModel.load(tmp_path / "clipn", tiny)
    templates = ["a photo of a {}.", "{}"]
    names = ["cat", "dog", "car"]
    p_yes, p_no = clipn_probabilities(model, feats, names, templates)
    q_yes, q_no = clipn_probabilities(loaded, feats, names, templates)
    np.testing.assert_array_equal(p_yes, q_yes)
    np.testing.assert_array_equal(p_no, q_no)
    assert p_yes.shape == (len(CAPTIONS), 3)
    np.testing.assert_allclose(p_yes.sum(1), 1.0, rtol=1e-6)
    # p_no by hand for one image and class
    yes = tiny.encode_texts([t.format("dog") for t in templates]).sum(0)
    no = model.encode_no_texts([t.format("dog") for t in templates]).sum(0)
    f = torch.as_tensor(feats[0])
    ly, ln = model.logit_scale * f @ (yes / yes.norm()), model.logit_scale * f @ (no / no.norm())
    assert p_no[0, 1] == pytest.approx(float(torch.softmax(torch.stack([ly, ln]), 0)[1]), rel=1e-5)
    other = tiny.derive("other", trainable=False)
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    with pytest.raises(ModelLoadError, match="model_id"):
        ClipnModel.load(tmp_path / "clipn", other)


def test_clipn_training_resumes_after_a_kill_bit_for_bit(tiny, tmp_path):
    feats = _features(tiny)
    pairs = _Captioned([[c, c + " again"] for c in CAPTIONS])
    options = dict(steps=5, batch_size=4, lr=3e-3, n_prompts=2, seed=2, device="cpu", image_features=feats,
                   checkpoint_every=2)
    whole = train_clipn(tiny, pairs, checkpoint_dir=tmp_path / "a", **options)

    def kill(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_clipn(tiny, pairs, checkpoint_dir=tmp_path / "b", callback=kill, **options)
    resumed = train_clipn(tiny, pairs, checkpoint_dir=tmp_path / "b", **options)
    assert len(resumed.history) == 3 and resumed.history == whole.history[2:]
    assert torch.equal(resumed.prompts, whole.prompts)
    params = dict(whole.no_encoder.model.named_parameters())
    for name, param in resumed.no_encoder.model.named_parameters():
        assert torch.equal(param, params[name]), name


def test_cli_train_clipn_writes_the_folder_ood_reads(tiny, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from cliplab.cli.app import app

    rows = []
    for k, caption in enumerate(CAPTIONS):
        Image.new("RGB", (32, 32), (30 * k, 255 - 30 * k, 60)).save(tmp_path / f"{k}.png")
        rows.append({"image": str(tmp_path / f"{k}.png"), "caption": caption})
    (tmp_path / "pairs.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in rows))
    args = ["train-clipn", str(tmp_path / "pairs.jsonl"), "--model", "tiny", "--output", str(tmp_path / "clipn"),
            "--steps", "3", "--train-batch-size", "4", "--lr", "1e-3", "--n-prompts", "2", "--cache-dir",
            str(tmp_path / "cache"), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    model = ClipnModel.load(tmp_path / "clipn", tiny)
    assert len(model.history) == 3 and model.prompts.shape[0] == 2
    again = CliRunner().invoke(app, args[:-1] + ["--lr", "2e-3", "--quiet"])  # a changed option is refused
    assert again.exit_code != 0 and "cannot resume with different options" in again.output
