"""MLCD objective (paper 27): the loss by hand, weight 0 is the clip loss, k-means, sampling, training and resume."""

import math

import pytest
import torch
import torch.nn.functional as F

from cliplab.train.engine import TrainSettings, get_objective, list_objectives, run_training
from cliplab.train.objectives_mlcd import mlcd_loss, spherical_kmeans


def test_mlcd_loss_hand_computed():
    # image 0 along e0, image 1 along e1; prototypes e0, e1, -e0 (cosines 1, 0, -1 and 0, 1, 0)
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    positives = torch.tensor([[0], [1]])
    s, m = 2.0, 0.1
    img0 = math.log(1 + math.exp(s * 0) + math.exp(s * -1)) + math.log(1 + math.exp(-s * (1 - m)))
    img1 = math.log(1 + math.exp(s * 0) + math.exp(s * 0)) + math.log(1 + math.exp(-s * (1 - m)))
    got = mlcd_loss(feats, protos, positives, scale=s, margin=m)
    assert got.item() == pytest.approx((img0 + img1) / 2, rel=1e-6)


def test_mlcd_sampling_keeps_positives_and_drops_negatives():
    torch.manual_seed(0)
    feats, protos = torch.randn(4, 8), torch.randn(50, 8)
    positives = torch.tensor([[0, 1], [2, 3], [0, 4], [5, 1]])
    full = mlcd_loss(feats, protos, positives, sample_rate=1.0)
    few = mlcd_loss(feats, protos, positives, sample_rate=0.01)  # only the 6 batch positives stay
    cos = F.normalize(feats, dim=-1) @ F.normalize(protos, dim=-1).T
    kept = torch.tensor([0, 1, 2, 3, 4, 5])
    by_hand = []
    for i in range(4):
        pos = set(positives[i].tolist())
        neg = [j for j in kept.tolist() if j not in pos]
        by_hand.append(math.log(1 + sum(math.exp(32 * cos[i, j].item()) for j in neg))
                       + math.log(1 + sum(math.exp(-32 * cos[i, j].item()) for j in pos)))
    assert few.item() == pytest.approx(sum(by_hand) / 4, rel=1e-5)
    assert full.item() > few.item()


def test_spherical_kmeans_separates_two_blobs():
    gen = torch.Generator().manual_seed(1)
    a = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(30, 3, generator=gen)
    b = torch.tensor([0.0, 0.0, 1.0]) + 0.05 * torch.randn(30, 3, generator=gen)
    centres = spherical_kmeans(torch.cat([a, b]), 2, iters=5, seed=3)
    assert torch.allclose(centres.norm(dim=1), torch.ones(2))
    assert sorted(centres.argmax(1).tolist()) == [0, 2]


@pytest.fixture(scope="module")
def tiny_batch():
    from cliplab.models import load_model

    model = load_model("tiny")
    gen = torch.Generator().manual_seed(0)
    size = model.preprocess_config.get("size", 224)
    size = size[0] if isinstance(size, list | tuple) else size
    images = torch.randn(6, 3, size, size, generator=gen)
    tokens = model.tokenize([f"a photo of thing {i}" for i in range(6)])
    return model, {"images": images, "tokens": tokens}


def test_weight_zero_is_the_clip_loss(tiny_batch):
    model, batch = tiny_batch
    work = model.derive("mlcd", trainable=True)
    clip, _ = get_objective("clip")(work, batch)
    mlcd = get_objective("mlcd", weight=0.0, centres=4, positives=1, bank=4, recluster_every=1)
    mlcd.param_groups(work.model, 0.0)
    got, logs = mlcd(work, batch)
    assert got.item() == pytest.approx(clip.item(), abs=1e-6)
    assert "mlcd" in list_objectives()
    # with weight 1 and clusters made (bank of 4 filled by the 6 images), the total is clip + the term
    mlcd1 = get_objective("mlcd", weight=1.0, centres=4, positives=1, bank=4, recluster_every=1)
    mlcd1.param_groups(work.model, 0.0)
    total, logs1 = mlcd1(work, batch)
    assert logs1["mlcd"] > 0
    assert total.item() == pytest.approx(clip.item() + logs1["mlcd"], rel=1e-5)


def test_trains_and_resumes_bit_for_bit(tiny_batch, tmp_path):
    model, batch = tiny_batch

    def data(epoch, start=0):
        for _ in range(start, 3):
            yield batch

    def run(folder, stop=None):
        work = model.derive("mlcd", trainable=True)
        objective = get_objective("mlcd", centres=3, positives=1, bank=6, recluster_every=2)
        settings = TrainSettings(steps=5, lr=1e-3, seed=0, device="cpu", progress=False, checkpoint_dir=folder,
                                 checkpoint_every=1)

        def callback(step, loss):
            if stop is not None and step == stop:
                raise KeyboardInterrupt

        try:
            run_training(work, objective, data, settings, callback=callback)
        except KeyboardInterrupt:
            return None, None
        return work, objective

    whole, obj_whole = run(tmp_path / "a")
    assert obj_whole.last_cluster >= 0
    run(tmp_path / "b", stop=3)
    resumed, obj_resumed = run(tmp_path / "b")
    for (name, p), (_, q) in zip(whole.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(obj_whole.prototypes, obj_resumed.prototypes)
