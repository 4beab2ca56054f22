"""Box accuracy on COCO annotations: boxes read, crowds skipped, clipped to the image, accuracy recomputed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.errors import DatasetError
from cliplab.features.text import class_weights
from cliplab.models import load_model
from cliplab.regions.coco import box_accuracy, coco_boxes
from cliplab.regions.scoring import embed_boxes


@pytest.fixture()
def coco(tmp_path):
    folder = tmp_path / "images" / "val2017"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / name)
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                       {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30},
                       {"id": 3, "file_name": "missing.jpg", "width": 40, "height": 30}],
            "categories": [{"id": 5, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 9, "name": "car"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 10, 10], "iscrowd": 0, "area": 100},
                {"id": 2, "image_id": 1, "category_id": 9, "bbox": [30, 20, 20, 20], "iscrowd": 0, "area": 400},
                {"id": 3, "image_id": 1, "category_id": 2, "bbox": [5, 5, 5, 5], "iscrowd": 1, "area": 25},
                {"id": 4, "image_id": 2, "category_id": 2, "bbox": [1, 2, 3, 4], "iscrowd": 0, "area": 12},
                {"id": 5, "image_id": 3, "category_id": 2, "bbox": [1, 2, 3, 4], "iscrowd": 0, "area": 12}]}
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_boxes(coco):
    names, items = coco_boxes(coco)
    assert names == ["cat", "dog", "car"]  # by category id
    assert [p.name for p, _, _ in items] == ["a.jpg", "b.jpg"]
    assert items[0][1].tolist() == [[0, 0, 10, 10], [30, 20, 10, 10]]  # the crowd skipped, the car clipped
    assert items[0][2].tolist() == [1, 2] and items[1][2].tolist() == [0]
    assert len(coco_boxes(coco, min_area=20)[1]) == 1 and len(coco_boxes(coco, max_images=1)[1]) == 1


def test_box_accuracy_recomputed(coco, tmp_path):
    tiny = load_model("tiny")
    result = box_accuracy(tiny, coco, templates=["a photo of a {}."], cache_dir=tmp_path / "cache")
    names, items = coco_boxes(coco)
    w = class_weights(tiny, names, ["a photo of a {}."], cache_dir=tmp_path / "cache")
    hits = [(embed_boxes(tiny, Image.open(p).convert("RGB"), b) @ w).argmax(axis=1) == y for p, b, y in items]
    assert result["boxes"] == 3 and result["images"] == 2 and result["top5"] == 1.0  # 3 classes: top-5 is all
    assert result["top1"] == pytest.approx(np.concatenate(hits).mean())


def test_category_subset_renames_and_drops_the_rest(coco, tmp_path):
    names, items = coco_boxes(coco, categories={"car": "automobile", "dog": "dog"})
    assert names == ["automobile", "dog"]  # the mapping's order and names
    assert [p.name for p, _, _ in items] == ["a.jpg"]  # b.jpg has only a cat
    assert items[0][1].tolist() == [[0, 0, 10, 10], [30, 20, 10, 10]] and items[0][2].tolist() == [1, 0]
    with pytest.raises(DatasetError, match="no category named 'deer'"):
        coco_boxes(coco, categories={"deer": "deer"})
    tiny = load_model("tiny")
    result = box_accuracy(tiny, coco, templates=["a photo of a {}."], cache_dir=tmp_path / "cache",
                          categories={"car": "automobile", "dog": "dog"})
    w = class_weights(tiny, ["automobile", "dog"], ["a photo of a {}."], cache_dir=tmp_path / "cache")
    feats = embed_boxes(tiny, Image.open(items[0][0]).convert("RGB"), items[0][1])
    assert result["boxes"] == 2 and result["class_names"] == ["automobile", "dog"]
    assert result["top1"] == pytest.approx(((feats @ w).argmax(axis=1) == [1, 0]).mean())
    assert result["s_per_box"] == pytest.approx(result["wall_s"] / 2)
