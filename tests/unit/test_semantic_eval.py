"""Semantic vs ensembling gain of a description set (eval/descriptions.py) on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cliplab.data.prompts import descriptor_sentence
from cliplab.errors import FeatureError
from cliplab.eval.descriptions import rows, semantic_vs_ensembling
from cliplab.features.text import class_weights, embed_prompts
from cliplab.heads.waffle import waffle_descriptors

CLASSES = ["cat", "dog", "bird"]
DESCRIPTIONS = {"cat": ["pointed ears", "whiskers", "a small nose"], "dog": ["a long tail", "floppy ears"],
                "bird": ["feathers", "a beak", "wings", "two legs"]}


@pytest.fixture()
def data(tiny):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, tiny.embed_dim))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), np.arange(60) % 3


def test_gains_add_up_and_rows_are_printable(tiny, data, tmp_path):
    out = tmp_path / "gains.json"
    result = semantic_vs_ensembling(tiny, data, CLASSES, DESCRIPTIONS, templates=["a photo of a {c}"], seeds=(0, 1),
                                    cache_dir=tmp_path, output=out)
    acc = result["accuracy"]
    assert result["n_random"] == 3 and result["n_images"] == 60 and result["seeds"] == [0, 1]  # ceil(9 / 3)
    assert len(acc["random"]["runs"]) == len(acc["reassigned"]["runs"]) == 2
    assert result["semantic_gain"] + result["ensembling_gain"] == pytest.approx(result["total_gain"], abs=1e-12)
    assert result["total_gain"] == pytest.approx(acc["descriptions"] - acc["templates"])
    assert result["semantic_gain"] == pytest.approx(acc["descriptions"] - np.mean(acc["random"]["runs"]))
    assert acc["random"]["std"] == pytest.approx(np.std(acc["random"]["runs"]))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    table = rows(result)
    assert table[0] == ["method", "top-1 %"] and len(table) == 8 and all(len(r) == 2 for r in table)


def test_each_accuracy_matches_a_hand_computation(tiny, data, tmp_path):
    X, y = data
    templates = ["a photo of a {c}"]
    result = semantic_vs_ensembling(tiny, data, CLASSES, DESCRIPTIONS, templates=templates, seeds=(3,), n_random=4,
                                    cache_dir=tmp_path)

    def accuracy(per_class):
        sentences = [[descriptor_sentence(templates[0], c, d) for d in ds] for c, ds in zip(CLASSES, per_class)]
        W = np.stack([e.mean(axis=0) for e in embed_prompts(tiny, sentences, tmp_path)], axis=1)
        return float(np.mean(np.argmax(X @ W, axis=1) == y))

    acc = result["accuracy"]
    assert acc["templates"] == float(np.mean(np.argmax(X @ class_weights(tiny, CLASSES, templates, cache_dir=tmp_path),
                                                       axis=1) == y))
    assert acc["descriptions"] == accuracy([DESCRIPTIONS[c] for c in CLASSES])
    chars = sorted(set("".join(d for v in DESCRIPTIONS.values() for d in v)) - set(" ,."))
    shared = waffle_descriptors(CLASSES, 2, seed=3, characters=chars)
    assert len(shared) == 4 and acc["random"]["runs"] == [accuracy([shared] * 3)]


def test_seeds_change_the_controls_and_repeat_exactly(tiny, data, tmp_path):
    kwargs = {"templates": ["{c}"], "cache_dir": tmp_path, "n_random": 6}
    a = semantic_vs_ensembling(tiny, data, CLASSES, DESCRIPTIONS, seeds=(0, 1, 2, 3), **kwargs)
    b = semantic_vs_ensembling(tiny, data, CLASSES, DESCRIPTIONS, seeds=(0, 1, 2, 3), **kwargs)
    assert a["accuracy"] == b["accuracy"]
    runs = a["accuracy"]["random"]["runs"] + a["accuracy"]["reassigned"]["runs"]
    assert len(set(runs)) > 1  # different seeds draw different controls


def test_unlabelled_rows_are_left_out_and_all_unlabelled_is_an_error(tiny, data, tmp_path):
    X, y = data
    y = y.copy()
    y[:30] = -1
    result = semantic_vs_ensembling(tiny, (X, y), CLASSES, DESCRIPTIONS, seeds=(0,), cache_dir=tmp_path)
    assert result["n_images"] == 30
    with pytest.raises(FeatureError):
        semantic_vs_ensembling(tiny, (X, np.full(60, -1)), CLASSES, DESCRIPTIONS, cache_dir=tmp_path)
