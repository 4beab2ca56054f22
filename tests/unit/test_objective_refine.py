"""CLIP-Refine objective (paper 33): RaFA, HyCD and the gap by hand; extra terms at zero = clip; resume."""

import math

import pytest
import torch

from cliplab.train.engine import TrainSettings, get_objective, run_training
from cliplab.train.objectives_refine import hycd_loss, modality_gap, rafa_loss, soft_distill


def test_rafa_hand_computed():
    img = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    txt = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    ref = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    by_hand = (0 + 4 + 0 + 1) / 4 + (1 + 0 + 1 + 1) / 4
    assert rafa_loss(img, txt, ref).item() == pytest.approx(by_hand)


def test_soft_distill_hand_computed():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    alpha, temp = 0.5, 2.0

    def softmax(row):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    total = 0.0
    for i in range(2):
        t = softmax(teacher[i].tolist())
        target = [(1 - alpha) * t[j] + alpha * (i == j) for j in range(2)]
        s = softmax(student[i].tolist())
        total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(target, s, strict=True) if p > 0)
    assert soft_distill(student, teacher, temp, alpha).item() == pytest.approx(total / 2 * temp ** 2, rel=1e-5)
    # the student equal to the teacher (alpha 0) distils nothing; both directions averaged
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    assert hycd_loss(x, y, x, y, 1.0, 0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_modality_gap_hand_computed():
    img = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: e0, e1 -> mean (0.5, 0.5)
    txt = torch.tensor([[-1.0, 0.0], [-4.0, 0.0]])  # mean (-1, 0)
    gap = modality_gap(img, txt)
    assert gap["mean_distance"] == pytest.approx(math.sqrt(1.5 ** 2 + 0.5 ** 2))
    assert gap["mse_of_means"] == pytest.approx((1.5 ** 2 + 0.5 ** 2) / 2)


@pytest.fixture(scope="module")
def tiny_batch():
    from cliplab.models import load_model

    model = load_model("tiny")
    gen = torch.Generator().manual_seed(0)
    size = model.preprocess_config.get("size", 224)
    size = size[0] if isinstance(size, list | tuple) else size
    images = torch.randn(4, 3, size, size, generator=gen)
    tokens = model.tokenize([f"a photo of thing {i}" for i in range(4)])
    return model, {"images": images, "tokens": tokens}


def test_extra_terms_at_zero_is_the_clip_loss(tiny_batch):
    model, batch = tiny_batch
    work = model.derive("refine", trainable=True)
    clip, _ = get_objective("clip")(work, batch)
    only_clip = get_objective("clip-refine", contrastive=1.0, random_align=0.0, distill=0.0)
    got, _ = only_clip(work, batch)
    assert got.item() == pytest.approx(clip.item(), abs=1e-6)
    # defaults (RaFA + HyCD): at the first step the student is the original, so HyCD with alpha 0 is 0
    refine = get_objective("clip-refine", alpha=0.0)
    torch.manual_seed(3)
    total, logs = refine(work, batch)
    assert logs["hycd"] == pytest.approx(0.0, abs=1e-5)
    assert total.item() == pytest.approx(logs["rafa"], rel=1e-5)


def test_resume_distils_from_the_same_original(tiny_batch, tmp_path):
    model, batch = tiny_batch

    def data(epoch, start=0):
        for _ in range(start, 2):
            yield batch

    def run(folder, stop=None):
        work = model.derive("refine", trainable=True)
        objective = get_objective("clip-refine")
        settings = TrainSettings(steps=3, lr=1e-3, seed=0, device="cpu", progress=False, checkpoint_dir=folder,
                                 checkpoint_every=1)

        def callback(step, loss):
            if stop is not None and step == stop:
                raise KeyboardInterrupt

        try:
            run_training(work, objective, data, settings, callback=callback)
        except KeyboardInterrupt:
            return None
        return work

    whole = run(tmp_path / "a")
    run(tmp_path / "b", stop=2)
    resumed = run(tmp_path / "b")
    for (name, p), (_, q) in zip(whole.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(whole.model.logit_scale, model.model.logit_scale) or any(
        not torch.equal(p, q) for p, q in zip(whole.model.parameters(), model.model.parameters(), strict=True))
