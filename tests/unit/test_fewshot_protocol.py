"""The few-shot protocol: splits from train only, views cached and aligned, mean/std table, files, repeatable."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplab.data import load_dataset
from cliplab.eval.fewshot import run_fewshot, shot_views
from cliplab.features import embed_images
from cliplab.features.views import Augmentation, AugmentedViews, stack_views


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
            path = tmp_path / "toy" / split / f"class{c}"
            path.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(path / f"{i}.png")
    return tmp_path / "toy"


def test_protocol_table_files_and_no_test_in_fitting(tiny, folder, tmp_path):
    train, test = load_dataset(folder, split="train"), load_dataset(folder, split="test")
    result = run_fewshot(tiny, train, test, ["zeroshot", "ncm"], [1, 2], [1, 2], templates=["a {c}"], views=2,
                         output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", workers=0, progress=False)
    assert len(result.runs) == 8
    ncm = [r for r in result.runs if r["method"] == "ncm" and r["shots"] == 2]
    accs = [r["acc1"] for r in ncm]
    assert result.table["ncm"][2] == pytest.approx((np.mean(accs), np.std(accs)))
    zs = {r["acc1"] for r in result.runs if r["method"] == "zeroshot"}
    assert len(zs) == 1 and result.table["zeroshot"][1][1] == 0.0  # zero-shot does not depend on the draw
    for run in ncm:
        split = json.loads(Path(run["split_file"]).read_text())
        assert all(i.startswith("train/") for i in split["train_ids"] + split["val_ids"])
        assert len(split["train_ids"]) == 6 and not set(split["train_ids"]) & set(split["val_ids"])
        record = json.loads(Path(run["json"]).read_text())
        assert record["cliplab"]["split"] == "test" and record["cliplab"]["shots"] == 2
    for kind in ("json", "markdown", "curve"):
        assert result.files[kind].is_file()
    assert "± " in result.files["markdown"].read_text()


def test_views_are_cached_aligned_and_reproducible(tiny, folder, tmp_path):
    train = load_dataset(folder, split="train")
    feats = embed_images(tiny, train, tmp_path / "c", num_workers=0, progress=False).labelled()
    split = feats.few_shot(2, seed=3)
    first = shot_views(tiny, train, split, 3, tmp_path / "c", 16, 0, False)
    assert first.shape == (3, 6, tiny.embed_dim)
    again = shot_views(tiny, train, split, 3, tmp_path / "c", 16, 0, False)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first[0], first[1])  # different crops per view
    # row i of every view is item i of the split (check against embedding the views of that one item)
    from cliplab.data import Subset

    one = AugmentedViews(Subset(train, split.train.indices[2:3]), 3, seed=0, augmentation=Augmentation(size=32))
    alone = stack_views(embed_images(tiny, one, tmp_path / "c2", num_workers=0, progress=False), 3)
    np.testing.assert_allclose(alone[:, 0], first[:, 2], atol=1e-6)


def test_auxiliary_model_features_are_appended_for_amu(tiny, folder, tmp_path):
    train, test = load_dataset(folder, split="train"), load_dataset(folder, split="test")
    result = run_fewshot(tiny, train, test, ["amu"], [2], [1], templates=["a {c}"], views=2,
                         params={"amu": {"aux_model": "tiny", "epochs": 3}}, output_dir=tmp_path / "out",
                         cache_dir=tmp_path / "cache", workers=0, progress=False)
    record = json.loads(Path(result.runs[0]["json"]).read_text())
    assert record["cliplab"]["params"]["aux_model"] == "tiny"
    assert result.runs[0]["chosen"]["epochs"] == 3 and 0.0 <= result.runs[0]["acc1"] <= 1.0
    from cliplab.eval.fewshot import with_aux

    feats = embed_images(tiny, test, tmp_path / "cache", num_workers=0, progress=False)
    joined = with_aux(feats, feats.subset([2, 0]))  # only items in both, aux rows matched by item id
    assert joined.item_ids == [feats.item_ids[0], feats.item_ids[2]] and joined.dim == 2 * feats.dim
    np.testing.assert_array_equal(joined.features[1, feats.dim:], feats.features[2])
