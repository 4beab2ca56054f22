"""ImageFeatures as a value: read-only, subsets, seeded stratified few-shot splits that repeat exactly."""

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.data import image_folder
from cliplab.errors import DatasetError, LabelError
from cliplab.features import ImageFeatures, embed_images, load_split


def _value(n_per_class=(10, 10, 10), dim=8, seed=0, split="train"):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(n_per_class)), n_per_class)
    X = rng.normal(size=(len(labels), dim)).astype(np.float32)
    ids = [f"img{i:03d}.png" for i in range(len(labels))]
    return ImageFeatures(X, labels, ids, np.arange(len(labels)), class_names=[f"c{i}" for i in range(len(n_per_class))],
                         dataset="toy", split=split, model_id="m")


def test_features_are_always_read_only():
    value = _value()
    with pytest.raises(ValueError, match="read-only"):
        value.features[0, 0] = 1.0
    assert not value.subset([0, 1]).features.flags.writeable


def test_features_read_only_even_after_a_transient_failure(tmp_path, tiny, monkeypatch):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 60, 10, 10)).save(root / "a" / f"{i}.png")
    data = image_folder(root)
    original = data.load_image

    def flaky(index):
        if index == 1:
            raise OSError("simulated transient read error")
        return original(index)

    monkeypatch.setattr(data, "load_image", flaky)
    out = embed_images(tiny, data, tmp_path / "cache", num_workers=0, progress=False)
    assert len(out) == 2 and out.failures and not out.features.flags.writeable  # was writable on this path


def test_subset_labelled_and_take_keep_rows_and_provenance():
    value = _value()
    sub = value.subset([5, 2])
    assert sub.item_ids == ["img005.png", "img002.png"] and np.array_equal(sub.features, value.features[[5, 2]])
    assert (sub.dataset, sub.split, sub.model_id) == ("toy", "train", "m")
    masked = value.subset(value.labels == 1)
    assert len(masked) == 10 and set(masked.labels.tolist()) == {1}
    unlabelled = ImageFeatures(value.features, np.r_[value.labels[:-1], -1], value.item_ids, value.indices)
    assert len(unlabelled.labelled()) == len(value) - 1
    assert value.take(["img003.png", "img001.png"]).item_ids == ["img003.png", "img001.png"]
    with pytest.raises(DatasetError, match="nosuch.png"):
        value.take(["nosuch.png"])


def test_few_shot_is_stratified_disjoint_and_seeded(tmp_path):
    value = _value()
    split = value.few_shot(4, seed=1)
    assert np.bincount(split.train.labels).tolist() == [4, 4, 4]
    assert np.bincount(split.val.labels).tolist() == [4, 4, 4]  # min(k, 4) per class
    assert not set(split.train.item_ids) & set(split.val.item_ids)
    assert value.few_shot(4, seed=1).record == split.record
    assert value.few_shot(4, seed=2).record["train_ids"] != split.record["train_ids"]
    assert np.bincount(value.few_shot(2, seed=1).val.labels).tolist() == [2, 2, 2]
    path = split.save(tmp_path / "split.json")
    assert json.loads(path.read_text())["train_ids"] == split.record["train_ids"]
    repeated = value.apply_split(path)
    assert repeated.train.item_ids == split.train.item_ids
    np.testing.assert_array_equal(repeated.val.features, split.val.features)
    assert load_split(path)["seed"] == 1


def test_few_shot_names_the_class_that_is_too_small():
    value = _value((10, 5, 10))
    with pytest.raises(LabelError, match=r"class 'c1' has 5 image\(s\).*use at most 1 shots"):
        value.few_shot(4, seed=0)
    with pytest.raises(LabelError, match="at least 1"):
        value.few_shot(0)
    with pytest.raises(DatasetError, match="dataset 'other'"):
        value.apply_split({"dataset": "other", "train_ids": [], "val_ids": []})
