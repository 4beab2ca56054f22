"""Segmentation sets: COCO semantic maps against pycocotools' annToMask directly; mosaic tiles and masks exact."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.data.segmentation import IGNORE_INDEX, MosaicSpec, load_segmentation


@pytest.fixture(scope="module")
def coco(data_root):
    pytest.importorskip("pycocotools")
    if not (data_root / "coco_mini" / "instances_val2017.json").is_file():
        pytest.skip("coco_mini instance annotations not found")
    return load_segmentation("coco_mini_seg", data_root, "all")


def test_coco_masks_equal_a_direct_annToMask_construction(coco):
    assert len(coco) == 159 and coco.class_names[0] == "background" and len(coco.class_names) == 81
    assert coco.class_names[1] == "person" and coco.class_names[80] == "toothbrush"
    checked_crowd = checked_overlap = 0
    for index in [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144] + [i for i in range(len(coco))
                                                              if coco._items[i][0].getAnnIds(
                                                                  imgIds=[coco._items[i][1]], iscrowd=True)][:3]:
        api, image_id, _ = coco._items[index]
        anns = api.loadAnns(api.getAnnIds(imgIds=[image_id], iscrowd=None))
        info = api.imgs[image_id]
        cats = sorted(api.cats)  # category ids ascending -> index 1..80
        cover = np.zeros((len(cats), info["height"], info["width"]), dtype=bool)
        crowd = np.zeros((info["height"], info["width"]), dtype=bool)
        for ann in anns:
            m = api.annToMask(ann) > 0
            if ann["iscrowd"]:
                crowd |= m
            else:
                cover[cats.index(ann["category_id"])] |= m
        kinds = cover.sum(axis=0)
        expected = np.where(kinds == 0, 0, cover.argmax(axis=0) + 1)
        expected[(kinds > 1) | crowd] = IGNORE_INDEX
        mask = coco.load_mask(index)
        np.testing.assert_array_equal(mask, expected)
        assert mask.shape == coco.load_image(index).size[::-1]
        checked_crowd += int(crowd.any())
        checked_overlap += int((kinds > 1).any())
    assert checked_crowd and checked_overlap  # both ignore rules were exercised


@pytest.fixture(scope="module")
def mosaics(data_root):
    spec = MosaicSpec(count=6, k=3, seed=4)
    return load_segmentation("mosaic", data_root, "test", mosaic=spec), \
        load_segmentation("mosaic", data_root, "train", mosaic=spec)


def test_mosaic_tiles_and_masks_are_exact(mosaics):
    test, train = mosaics
    assert test.class_names[:3] == ["airplane", "automobile", "bird"] and len(test.class_names) == 10
    for index in range(len(test)):
        image, mask = np.asarray(test.load_image(index)), test.load_mask(index)
        assert image.shape == (96, 96, 3) and mask.shape == (96, 96)
        for r in range(3):
            for c in range(3):
                tile = test.tile_indices[index, r, c]
                region = (slice(32 * r, 32 * r + 32), slice(32 * c, 32 * c + 32))
                np.testing.assert_array_equal(image[region], np.asarray(test.tiles.load_image(int(tile))))
                assert (mask[region] == test.tiles.labels[tile]).all()


def test_mosaic_splits_never_share_an_image_and_the_draw_is_seeded(mosaics, data_root):
    test, train = mosaics
    assert test.tiles.split == "test" and train.tiles.split == "train"
    test_ids = {test.tiles.identity(int(i)) for i in test.tile_indices.ravel()}
    train_ids = {train.tiles.identity(int(i)) for i in train.tile_indices.ravel()}
    assert not test_ids & train_ids
    again = load_segmentation("mosaic", data_root, "test", mosaic=MosaicSpec(count=6, k=3, seed=4))
    np.testing.assert_array_equal(again.tile_indices, test.tile_indices)
    other = load_segmentation("mosaic", data_root, "test", mosaic=MosaicSpec(count=6, k=3, seed=5))
    assert not np.array_equal(other.tile_indices, test.tile_indices)
