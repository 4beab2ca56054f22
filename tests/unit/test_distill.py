"""The cross-modal distillation objective (paper 8): lam * InfoNCE + (1 - lam) * (1 - cos(student, teacher))."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliplab.errors import CliplabError
from cliplab.train.engine import TrainSettings, get_objective, list_objectives, run_training


@pytest.fixture(scope="module")
def student(tiny):
    return tiny.derive("distill-test", trainable=True)


def _batch(model, seed=0):
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {"images": images, "tokens": model.tokenize(["a cat", "a dog", "a car", "a tree"])}


def _student_features(model, batch):
    with torch.no_grad():
        i = torch.nn.functional.normalize(model.model.encode_image(batch["images"]), dim=-1)
        t = torch.nn.functional.normalize(model.model.encode_text(batch["tokens"]), dim=-1)
    return i, t


def test_lambda_one_is_the_clip_loss(student):
    batch = _batch(student)
    rng = torch.Generator().manual_seed(1)
    batch["teacher_images"] = torch.randn(4, student.embed_dim, generator=rng)
    clip, _ = get_objective("clip")(student, batch)
    got, logs = get_objective("distill", lam=1.0)(student, batch)
    assert "distill" in list_objectives()
    assert got.item() == pytest.approx(clip.item(), abs=1e-6) and logs["cosine"] > 0


def test_student_equal_to_teacher_gives_a_zero_cosine_term(student):
    batch = _batch(student)
    i, t = _student_features(student, batch)
    batch.update(teacher_images=3 * i, teacher_texts=t)  # the cosine ignores scale
    loss, logs = get_objective("distill", lam=0.0)(student, batch)
    assert logs["cosine"] == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(0.0, abs=1e-6)


def test_the_mix_is_the_written_out_formula(student):
    batch = _batch(student, seed=2)
    i, t = _student_features(student, batch)
    rng = torch.Generator().manual_seed(3)
    ti, tt = torch.randn(4, i.shape[1], generator=rng), torch.randn(4, t.shape[1], generator=rng)
    batch.update(teacher_images=ti, teacher_texts=tt)
    scale = student.model.logit_scale.exp().detach()
    logits = scale * i @ t.T
    target = torch.arange(4)
    ce = torch.nn.functional.cross_entropy
    info = (ce(logits, target) + ce(logits.T, target)) / 2
    cos = torch.nn.functional.cosine_similarity
    cosine = ((1 - cos(i, ti, dim=-1)).mean() + (1 - cos(t, tt, dim=-1)).mean()) / 2
    got, logs = get_objective("distill", lam=0.3)(student, batch)
    assert got.item() == pytest.approx((0.3 * info + 0.7 * cosine).item(), rel=1e-5)
    assert logs["infonce"] == pytest.approx(info.item(), rel=1e-5)
    only_images = {k: v for k, v in batch.items() if k != "teacher_texts"}
    _, logs = get_objective("distill", lam=0.3)(student, only_images)
    assert logs["cosine"] == pytest.approx((1 - cos(i, ti, dim=-1)).mean().item(), rel=1e-5)


def test_bad_teachers_and_lambdas_are_one_line_errors(student):
    batch = _batch(student)
    with pytest.raises(CliplabError, match="teacher"):
        get_objective("distill")(student, batch)
    with pytest.raises(CliplabError, match="match"):
        get_objective("distill")(student, {**batch, "teacher_images": torch.zeros(4, 3)})
    with pytest.raises(CliplabError, match="lam"):
        get_objective("distill", lam=1.5)


def test_training_pulls_the_student_towards_the_teacher(tiny):
    model = tiny.derive("distill-train", trainable=True)
    batch = _batch(model, seed=5)
    rng = torch.Generator().manual_seed(6)
    teacher = torch.nn.functional.normalize(torch.randn(4, model.embed_dim, generator=rng), dim=-1)
    batch["teacher_images"] = teacher
    objective = get_objective("distill", lam=0.0)
    before = objective(model, batch)[1]["cosine"]
    run_training(model, objective, lambda epoch: iter([batch]), TrainSettings(steps=8, lr=5e-2, progress=False,
                                                                               device="cpu"))
    after = objective(model, batch)[1]["cosine"]
    assert after < 0.5 * before and np.isfinite(after)
