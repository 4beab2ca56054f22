"""Box files and box checks: the layouts read, and one clear line for each bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cliplab.regions.boxes import BoxError, boxes_for_image, check_boxes, read_box_file


def _write(tmp_path, data, name="boxes.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_layouts(tmp_path):
    assert read_box_file(_write(tmp_path, [[1, 2, 3, 4]]))[None].tolist() == [[1, 2, 3, 4]]
    mapping = read_box_file(_write(tmp_path, {"a.png": [{"bbox": [0, 0, 5, 5]}], "b.png": []}))
    assert boxes_for_image(mapping, tmp_path / "a.png", "f").tolist() == [[0, 0, 5, 5]]
    coco = {"images": [{"id": 7, "file_name": "x.jpg"}, {"id": 8, "file_name": "y.jpg"}],
            "annotations": [{"image_id": 7, "bbox": [1, 1, 2, 2]}, {"image_id": 7, "bbox": [3, 3, 1, 1]}]}
    found = read_box_file(_write(tmp_path, coco))
    assert found["x.jpg"].shape == (2, 4) and found["y.jpg"].shape == (0, 4)


@pytest.mark.parametrize("data", [[], {}, {"a.png": []}, "", {"images": [], "annotations": []}])
def test_empty_box_file(tmp_path, data):
    with pytest.raises(BoxError, match="has no boxes$"):
        read_box_file(_write(tmp_path, data))


def test_image_without_boxes(tmp_path):
    boxes = read_box_file(_write(tmp_path, {"a.png": [[0, 0, 1, 1]], "b.png": []}))
    with pytest.raises(BoxError, match=r"b\.png has no boxes in"):
        boxes_for_image(boxes, "b.png", "boxes.json")
    with pytest.raises(BoxError, match=r"c\.png has no boxes in"):
        boxes_for_image(boxes, "c.png", "boxes.json")


def test_bad_boxes(tmp_path):
    with pytest.raises(BoxError, match=r"\[x, y, w, h\]"):
        read_box_file(_write(tmp_path, [[1, 2, 3]]))
    with pytest.raises(BoxError, match="not JSON"):
        read_box_file(_write(tmp_path, "[[1, 2"))
    assert check_boxes(np.array([[0, 0, 10, 8]]), (10, 8)).shape == (1, 4)
    with pytest.raises(BoxError, match=r"box 1 \[5, 5, 10, 2\] lies outside im\.png \(10 x 8 px\)"):
        check_boxes(np.array([[0, 0, 2, 2], [5, 5, 10, 2]]), (10, 8), "im.png")
    with pytest.raises(BoxError, match="lies outside"):
        check_boxes(np.array([[-3, 0, 2, 2]]), (10, 8))
    with pytest.raises(BoxError, match="has no area"):
        check_boxes(np.array([[1, 1, 0, 2]]), (10, 8))
    for error in (BoxError("x"),):
        assert "\n" not in str(error)
