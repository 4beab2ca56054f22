"""Splits as data: the table of each named dataset, hold-out validation, unknown splits, split layouts."""

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.data import (
    HOLDOUT_FRACTION,
    builtin_class_names,
    dataset_splits,
    distinct_class_names,
    load_dataset,
    stratified_holdout,
)
from cliplab.data.prompts import check_class_names
from cliplab.errors import DatasetError, LabelError


def test_stratified_holdout_is_disjoint_seeded_and_per_class():
    labels = np.repeat(np.arange(4), [10, 20, 3, 1])
    kept, held = stratified_holdout(labels, 0.1, seed=0)
    assert not set(kept) & set(held) and len(kept) + len(held) == len(labels)
    assert np.bincount(labels[held], minlength=4).tolist() == [1, 2, 1, 0]  # >= 1 when a class has 2+
    again_kept, again_held = stratified_holdout(labels, 0.1, seed=0)
    assert np.array_equal(held, again_held)
    assert not np.array_equal(held, stratified_holdout(labels, 0.1, seed=1)[1])


def _folder(root, layout):
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")
    return root


def test_folder_with_train_val_test_is_read_as_splits_not_classes(tmp_path):
    root = _folder(tmp_path / "data", {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1},
                                       "test": {"dog": 2}})
    test = load_dataset(root)
    assert test.split == "test" and test.class_names == ["cat", "dog"] and test.labels.tolist() == [1, 1]
    train = load_dataset(root, split="train")
    assert len(train) == 5 and train.class_names == ["cat", "dog"] and train.split_info["source"] == "train/ folder"
    assert train.item_ids()[0] == "train/cat/0.png"
    with pytest.raises(DatasetError, match="no split 'bogus'; it has train, val, test"):
        load_dataset(root, split="bogus")


def test_split_folders_without_val_get_a_recorded_holdout(tmp_path):
    root = _folder(tmp_path / "data", {"train": {"cat": 10, "dog": 10}, "test": {"cat": 1}})
    train, val = load_dataset(root, split="train"), load_dataset(root, split="val")
    assert len(train) == 18 and len(val) == 2
    assert not set(train.item_ids()) & set(val.item_ids())
    assert val.split_info["holdout"] == {"from": "train", "fraction": HOLDOUT_FRACTION, "seed": 0, "stratified": True}


def test_a_plain_class_folder_refuses_a_split_instead_of_ignoring_it(tmp_path):
    root = _folder(tmp_path / "data", {"": {"cat": 1, "dog": 1}})
    assert load_dataset(root).split == "all"
    with pytest.raises(DatasetError, match="has no splits"):
        load_dataset(root, split="train")


def test_manifest_split_field_is_honoured(tmp_path):
    _folder(tmp_path, {"": {"img": 4}})
    rows = [{"image": f"img/{i}.png", "label": "a" if i % 2 else "b", "split": "train" if i < 3 else "test"}
            for i in range(4)]
    (tmp_path / "m.json").write_text(json.dumps({"classes": ["a", "b"], "images": rows}))
    test = load_dataset(tmp_path / "m.json")
    assert test.split == "test" and test.item_ids() == ["img/3.png"]
    train, val = (load_dataset(tmp_path / "m.json", split=s).item_ids() for s in ("train", "val"))
    assert sorted(train + val) == ["img/0.png", "img/1.png", "img/2.png"] and len(val) == 1  # no val rows: held out


def test_named_splits_table():
    assert list(dataset_splits("cifar10")) == ["train", "val", "test"]
    assert list(dataset_splits("dtd")) == ["test"]
    assert list(dataset_splits("imagenet")) == ["train", "val", "test"]


def test_imagenet_wnid_folders_get_index_order_and_names(tmp_path):
    # two synsets, in a folder named like ImageNet's val/: n01440764 = class 0 (tench), n01443537 = 1 (goldfish)
    _folder(tmp_path / "imagenet", {"val": {"n01443537": 1, "n01440764": 2}})
    data = load_dataset("imagenet", root=tmp_path)
    assert data.split == "test" and data.class_names == ["tench", "goldfish"] and data.labels.tolist() == [0, 0, 1]
    (tmp_path / "imagenet" / "val" / "n99999999").mkdir()
    with pytest.raises(DatasetError, match="n99999999"):
        load_dataset("imagenet", root=tmp_path)


def test_builtin_duplicates_are_made_distinct_user_duplicates_stay_errors():
    raw = builtin_class_names("imagenet")
    distinct = distinct_class_names(raw)
    assert len({n.casefold() for n in distinct}) == 1000
    assert (raw[744], distinct[744], raw[836], distinct[836]) == ("missile", "projectile", "sunglasses", "sunglass")
    assert sum(a != b for a, b in zip(raw, distinct)) == 2
    check_class_names(distinct, "imagenet")
    with pytest.raises(LabelError, match="duplicate"):
        check_class_names(["cat", "dog", "Cat"], "--labels")


@pytest.mark.integration
def test_real_dataset_splits(data_root):
    train, val, test = (load_dataset("cifar10", root=data_root, split=s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (9000, 1000, 10000)
    assert np.bincount(val.labels).tolist() == [100] * 10
    assert not set(train.identities()) & set(val.identities())
    assert (train.split, val.split, test.split) == ("train", "val", "test")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", root=data_root, split="val")  # val is made from train, which is not on disk here
    with pytest.raises(DatasetError, match="no split 'train'; it has test"):
        load_dataset("dtd", root=data_root, split="train")  # was: the test images returned as train
    nette_train, nette_test = (load_dataset("imagenette", root=data_root, split=s) for s in ("train", "test"))
    assert all(i.startswith("train/") for i in nette_train.item_ids())
    assert all(i.startswith("val/") for i in nette_test.item_ids()) and len(nette_test) == 1000
    coco = load_dataset("coco", root=data_root)
    assert len(coco) == 159 and all("val2017" in i for i in coco.item_ids())
