"""Concept-association bias (paper 25): probes, composites, the CAB rate (hand-computed) and CAB = 0 without a
distractor, end to end on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cliplab.analysis.cab import (
    COLOURS,
    CompositeDataset,
    cab_summary,
    compose,
    draw_probes,
    measure_cab,
    recolour,
)
from cliplab.data.base import ArrayImageDataset
from cliplab.errors import CliplabError


def test_cab_summary_hand_computed():
    # probe 0: known, composite says the distractor's attribute (1); probe 1: known, kept its own (1);
    # probe 2: known, distractor's (0); probe 3: not known (object alone said 0, truth 3), composite 1 = distractor
    summary = cab_summary(object_pred=[0, 1, 2, 0], composite_pred=[1, 1, 0, 1], object_attr=[0, 1, 2, 3],
                          distractor_attr=[1, 2, 0, 1])
    assert summary["known"] == 3 and summary["known_rate"] == 0.75
    assert summary["cab"] == pytest.approx(2 / 3) and summary["kept"] == pytest.approx(1 / 3)
    assert summary["distractor_rate"] == 0.75 and summary["solo_distractor_rate"] == 0.0
    assert cab_summary([1], [0], [0], [1])["cab"] is None  # no known probe


def test_probes_pair_different_classes_and_colours():
    labels = np.repeat(np.arange(4), 5)
    probes = draw_probes(labels, 40, seed=3)
    assert (labels[probes.objects] != labels[probes.distractors]).all()
    np.testing.assert_array_equal(probes.object_attr, labels[probes.objects])
    np.testing.assert_array_equal(probes.distractor_attr, labels[probes.distractors])
    colours = draw_probes(labels, 40, seed=3, attribute="colour")
    assert (colours.object_attr != colours.distractor_attr).all() and colours.object_attr.max() < len(COLOURS)
    again = draw_probes(labels, 40, seed=3)
    np.testing.assert_array_equal(again.distractors, probes.distractors)
    with pytest.raises(CliplabError):
        draw_probes(labels, 5, attribute="texture")


def test_compose_and_recolour():
    obj = Image.fromarray(np.full((8, 8, 3), 10, np.uint8))
    dis = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    out = np.asarray(compose(obj, dis, 0.5, corner=3))  # bottom-right 4 x 4
    assert (out[4:, 4:] == 200).all() and (out[:4] == 10).all() and (out[:, :4] == 10).all()
    assert (np.asarray(compose(obj, dis, 0.0, 0)) == 10).all()
    grey = Image.fromarray(np.full((2, 2, 3), 51, np.uint8))  # luminance 51/255 = 0.2
    np.testing.assert_array_equal(np.asarray(recolour(grey, (100, 200, 50)))[0, 0], [20, 40, 10])


def _dataset(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    return ArrayImageDataset(images, np.repeat(np.arange(3), 8), ["cat", "dog", "ship"], tmp_path / "a.npy", "toy")


def test_no_distractor_means_no_cab(tmp_path):
    from cliplab.models import load_model

    data = _dataset(tmp_path)
    probes = draw_probes(data.labels, 30, seed=1)
    solo = CompositeDataset(data, probes, 0.0, data.class_names)
    for i in range(3):  # the composites are the objects alone, pixel for pixel
        assert np.array_equal(np.asarray(solo.load_image(i)), np.asarray(data.load_image(int(probes.objects[i]))))
    backbone = load_model("tiny")
    result = measure_cab(backbone, data, size=0.0, probes=30, seed=1, templates=["a photo of a {c}."],
                         cache_dir=tmp_path / "cache", progress=False, num_workers=0)
    summary = result["summary"]
    assert summary["known"] > 0 and summary["cab"] == 0.0 and summary["kept"] == 1.0
    with_distractor = measure_cab(backbone, data, size=0.6, probes=30, seed=1, templates=["a photo of a {c}."],
                                  cache_dir=tmp_path / "cache", progress=False, num_workers=0)
    assert with_distractor["summary"]["known"] == summary["known"]  # the same objects alone
    colour = measure_cab(backbone, data, attribute="colour", size=0.5, probes=12, seed=0, name_object=True,
                         cache_dir=tmp_path / "cache", progress=False, num_workers=0)
    assert colour["attributes"] == list(COLOURS) and colour["summary"]["probes"] == 12
