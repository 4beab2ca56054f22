"""Box scoring (OvarNet's inference side): crops, written-out softmax/sigmoid, the federated BCE's gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.features.text import class_weights
from cliplab.models import load_model
from cliplab.regions.boxes import BoxError
from cliplab.regions.scoring import (
    AttributeHead,
    attribute_frequency_weights,
    crop_boxes,
    embed_boxes,
    federated_bce,
    fit_attribute_head,
    score_regions,
)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))


def test_crops_follow_the_boxes(image):
    crops = crop_boxes(image, np.array([[0, 0, 60, 40], [10.5, 5, 4, 3]]))
    assert crops[0].size == (60, 40) and crops[1].size == (5, 3)  # x 10..15 rounded outwards
    assert np.array_equal(np.asarray(crops[1]), np.asarray(image)[5:8, 10:15])


def test_scores_are_the_written_out_softmax_and_sigmoid(tiny, image, tmp_path):
    boxes = np.array([[0, 0, 30, 40], [20, 10, 40, 30], [5, 5, 10, 10]])
    labels, attributes = ["cat", "dog", "car"], ["red", "furry"]
    scores = score_regions(tiny, image, boxes, labels, attributes, templates=["a photo of a {}."],
                           attribute_templates=["a photo of a {} object."], cache_dir=tmp_path)
    x = torch.stack([tiny.preprocess(c) for c in crop_boxes(image, boxes)])
    feats = tiny.encode_images(x).numpy().astype(np.float64)
    text = tiny.encode_texts([f"a photo of a {n}." for n in labels]).numpy().astype(np.float64).T
    z = tiny.logit_scale * feats @ text
    assert scores.categories == pytest.approx(np.exp(z) / np.exp(z).sum(axis=1, keepdims=True), abs=1e-5)
    a = feats @ tiny.encode_texts([f"a photo of a {n} object." for n in attributes]).numpy().astype(np.float64).T
    expected = 1 / (1 + np.exp(-tiny.logit_scale * (a - a.mean(axis=1, keepdims=True))))
    assert scores.attribute_probs == pytest.approx(expected, abs=1e-5)
    records = scores.records(top=2)
    assert len(records) == 3 and set(records[0]["attributes"]) == {"red", "furry"}
    assert records[1]["label"] == labels[int(z[1].argmax())] and len(records[1]["categories"]) == 2


def test_background_and_suppression_options(tiny, image, tmp_path):
    boxes = np.array([[0, 0, 60, 40], [10, 10, 20, 20], [12, 12, 5, 5]])
    scores = score_regions(tiny, image, boxes, ["cat", "dog"], background_mix=0.5, suppress=0.9,
                           templates=["a photo of a {}."], cache_dir=tmp_path)
    assert scores.labels == ["cat", "dog", "background"] and scores.categories.shape == (3, 3)
    assert scores.categories.sum(axis=1) == pytest.approx(np.ones(3))
    best = scores.categories.argmax(axis=1)
    # suppressed: a smaller box inside a larger one with the same (non-background) predicted label
    expected = [k for k in (1, 2) if best[k] < 2 and any(best[j] == best[k] for j in range(k))]
    assert scores.suppressed == expected
    none = score_regions(tiny, image, boxes, ["cat", "dog"], suppress=1.0, templates=["a photo of a {}."],
                         cache_dir=tmp_path)
    assert none.suppressed == []


def test_boxes_outside_the_image_are_refused(tiny, image):
    with pytest.raises(BoxError, match=r"box 0 \[50, 0, 20, 10\] lies outside im.png \(60 x 40 px\)"):
        score_regions(tiny, image, np.array([[50, 0, 20, 10]]), ["cat"], image_name="im.png")


def test_federated_bce_gives_unlabelled_attributes_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.float32)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    loss = federated_bce(logits, targets, mask)
    loss.backward()
    assert (logits.grad[mask == 0] == 0).all() and (logits.grad[mask == 1] != 0).all()
    # the written-out mean over the labelled pairs
    p = torch.sigmoid(logits.detach())
    terms = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p))
    assert loss.item() == pytest.approx((terms * mask).sum().item() / 5, rel=1e-6)  # 5 labelled pairs
    # the gradient of a labelled pair is (sigmoid - y) / count
    assert logits.grad[mask == 1] == pytest.approx(((p - targets) / 5)[mask == 1], abs=1e-7)
    empty = torch.zeros(2, 3, requires_grad=True)
    federated_bce(empty, torch.ones(2, 3), torch.zeros(2, 3)).backward()
    assert (empty.grad == 0).all()


def test_federated_bce_unknown_weight_and_reweighting_written_out():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 1.5, -2.0]], dtype=torch.float64)
    targets = torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.float64)  # unknown: (0, 2) and (1, 0)
    weights = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)

    def bce(z, y):
        return -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))

    known = [(0, 0), (0, 1), (1, 1), (1, 2)]
    plain = sum(bce(logits[i, j].item(), targets[i, j].item()) for i, j in known) / 4
    weighted = sum(weights[j].item() * bce(logits[i, j].item(), targets[i, j].item()) for i, j in known) / 4
    unknown = (bce(0.5, 0.0) + bce(-0.3, 0.0)) / 2  # unannotated pairs count as negatives, their own mean
    assert federated_bce(logits, targets, mask).item() == pytest.approx(plain, rel=1e-12)
    assert federated_bce(logits, targets, mask, attribute_weights=weights).item() == pytest.approx(weighted, rel=1e-12)
    assert federated_bce(logits, targets, mask, unknown_weight=0.15, attribute_weights=weights).item() == (
        pytest.approx(weighted + 0.15 * unknown, rel=1e-12))
    z = logits.clone().requires_grad_(True)
    federated_bce(z, targets, mask, unknown_weight=0.15).backward()
    assert z.grad[0, 2].item() == pytest.approx(0.15 * (1 / (1 + math.exp(-0.5))) / 2, rel=1e-12)


def test_attribute_frequency_weights_written_out():
    counts = np.array([1.0, 32.0, 1024.0])
    raw = counts ** -0.2  # 1, 1/2, 1/4
    assert attribute_frequency_weights(counts) == pytest.approx(3 * raw / raw.sum(), rel=1e-6)
    assert attribute_frequency_weights(counts) == pytest.approx([12 / 7, 6 / 7, 3 / 7], rel=1e-6)
    assert attribute_frequency_weights(np.array([5.0, 5.0])).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="positive"):
        attribute_frequency_weights(np.array([3.0, 0.0]))


def test_unlabelled_attribute_leaves_its_parameters_alone():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    w = rng.normal(size=(8, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -1, 0, 0, 0, 0, 0, 0]) > 0).astype(np.float32)
    targets = np.stack([y, 1 - y, np.ones(30, np.float32)], axis=1)
    mask = np.stack([np.ones(30), np.ones(30), np.zeros(30)], axis=1)
    head = fit_attribute_head(x, targets, mask, w, scale=5.0, epochs=200, lr=0.05)
    assert head.weight.detach()[:, 2].numpy() == pytest.approx(w[:, 2]) and float(head.bias.detach()[2]) == 0.0
    with torch.no_grad():
        pred = torch.sigmoid(head(torch.as_tensor(x))).numpy()
    assert ((pred[:, 0] > 0.5) == (y > 0.5)).mean() > 0.9 and ((pred[:, 1] > 0.5) == (y < 0.5)).mean() > 0.9


def test_attribute_head_starts_at_the_text_weights(tiny, tmp_path):
    w = class_weights(tiny, ["red", "blue"], ["a {} object."], cache_dir=tmp_path)
    head = AttributeHead(w, 10.0)
    feats = embed_boxes(tiny, Image.new("RGB", (20, 20), "red"), np.array([[0, 0, 20, 20]]))
    with torch.no_grad():
        assert head(torch.as_tensor(feats)).numpy() == pytest.approx(10.0 * feats @ w, abs=1e-5)
