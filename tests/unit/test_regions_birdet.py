"""BIRDet (paper 19): overlap ratios by hand, partial-object suppression, the image-conditioned background."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.regions.birdet import (
    background_embedding,
    overlap_ratios,
    partial_object_suppression,
    scores_with_background,
)


def test_overlap_ratios_by_hand():
    # a: 10x10 at (0,0); b: 10x10 at (5,5) -> intersection 5x5 = 25; c: 4x2 inside a; d: far away
    boxes = np.array([[0, 0, 10, 10], [5, 5, 10, 10], [2, 2, 4, 2], [50, 50, 3, 3]])
    r = overlap_ratios(boxes)
    assert r[0, 1] == pytest.approx(25 / 100) and r[1, 0] == pytest.approx(25 / 100)
    assert r[2, 0] == pytest.approx(1.0) and r[0, 2] == pytest.approx(8 / 100)
    # c = [2,6]x[2,4] and b = [5,15]x[5,15] do not meet
    assert r[2, 1] == 0.0 and r[3, :3].sum() == 0.0
    assert np.diag(r) == pytest.approx(np.ones(4))


def test_contained_box_is_suppressed_and_threshold_one_is_a_no_op():
    boxes = np.array([[0, 0, 100, 100], [10, 10, 20, 20], [90, 90, 20, 20], [10, 10, 20, 20]])
    labels = np.array([1, 1, 1, 2])  # box 3 lies inside box 0 too, but has another label
    # box 2: 10x10 of its 400 px² inside box 0 -> ratio 0.25
    assert partial_object_suppression(boxes, labels, 0.9).tolist() == [0, 2, 3]
    assert partial_object_suppression(boxes, labels, 0.2).tolist() == [0, 3]
    assert partial_object_suppression(boxes, labels, 1.0).tolist() == [0, 1, 2, 3]


def test_equal_boxes_are_not_larger_than_each_other():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]])
    assert partial_object_suppression(boxes, np.array([0, 0]), 0.5).tolist() == [0, 1]


def test_background_embedding_mixes_text_and_image():
    t, v = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    assert background_embedding(t, v, 0.0) == pytest.approx(t)
    assert background_embedding(t, v, 1.0) == pytest.approx(v)
    assert background_embedding(t, v, 0.5) == pytest.approx(np.array([1, 1, 0]) / np.sqrt(2))
    with pytest.raises(ValueError):
        background_embedding(t, v, 1.5)


def test_scores_with_background_is_a_softmax_with_an_extra_column():
    rng = np.random.default_rng(0)
    x, w, bg = rng.normal(size=(3, 4)), rng.normal(size=(4, 2)), rng.normal(size=4)
    p = scores_with_background(x, w, bg, 10.0)
    z = 10.0 * np.concatenate([x @ w, (x @ bg)[:, None]], axis=1)
    assert p == pytest.approx(np.exp(z) / np.exp(z).sum(axis=1, keepdims=True))
