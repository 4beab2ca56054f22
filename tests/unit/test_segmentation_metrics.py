"""Segmentation metrics against mmseg's definitions: a written-out copy of its functions and a hand-computed case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliplab.errors import CliplabError
from cliplab.eval.segmentation import intersect_and_union, segmentation_metrics, total_intersect_and_union


def mmseg_intersect_and_union(pred_label, label, num_classes, ignore_index):
    """open-mmlab/mmsegmentation mmseg/core/evaluation/metrics.py intersect_and_union (ndarray inputs, no label map,
    no zero-label reduction), written out."""
    pred_label = torch.from_numpy(pred_label)
    label = torch.from_numpy(label)
    mask = label != ignore_index
    pred_label = pred_label[mask]
    label = label[mask]
    intersect = pred_label[pred_label == label]
    area_intersect = torch.histc(intersect.float(), bins=num_classes, min=0, max=num_classes - 1)
    area_pred_label = torch.histc(pred_label.float(), bins=num_classes, min=0, max=num_classes - 1)
    area_label = torch.histc(label.float(), bins=num_classes, min=0, max=num_classes - 1)
    area_union = area_pred_label + area_label - area_intersect
    return area_intersect, area_union, area_pred_label, area_label


def mmseg_metrics(results, gt_seg_maps, num_classes, ignore_index):
    """total_intersect_and_union + total_area_to_metrics (mIoU) + the nanmean of mmseg's evaluate."""
    totals = [torch.zeros((num_classes,), dtype=torch.float64) for _ in range(4)]
    for result, gt in zip(results, gt_seg_maps):
        for total, part in zip(totals, mmseg_intersect_and_union(result, gt, num_classes, ignore_index)):
            total += part
    inter, union, _, label = totals
    iou, acc = (inter / union).numpy(), (inter / label).numpy()
    return {"aAcc": float(inter.sum() / label.sum()), "IoU": iou, "Acc": acc, "mIoU": np.nanmean(iou),
            "mAcc": np.nanmean(acc)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_mmseg_on_random_maps_with_ignore(seed):
    rng = np.random.default_rng(seed)
    classes = 7
    truths, preds = [], []
    for _ in range(4):
        shape = tuple(rng.integers(5, 40, 2))
        truth = rng.integers(0, classes - 1, shape).astype(np.uint8)  # class 6 never in the truth
        truth[rng.random(shape) < 0.2] = 255
        pred = rng.integers(0, classes, shape).astype(np.uint8)
        truths.append(truth)
        preds.append(pred)
    for pred, truth in zip(preds, truths):
        ours = intersect_and_union(pred, truth, classes, 255)
        theirs = mmseg_intersect_and_union(pred, truth, classes, 255)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b.numpy().astype(np.int64))
    ours = segmentation_metrics(preds, truths, classes, 255)
    theirs = mmseg_metrics(preds, truths, classes, 255)
    np.testing.assert_allclose(ours.iou, theirs["IoU"], equal_nan=True)
    np.testing.assert_allclose(ours.acc, theirs["Acc"], equal_nan=True)
    assert ours.miou == pytest.approx(theirs["mIoU"]) and ours.macc == pytest.approx(theirs["mAcc"])
    assert ours.aacc == pytest.approx(theirs["aAcc"])
    assert np.isnan(ours.acc[6]) and not np.isnan(ours.iou[6])  # predicted but absent: IoU 0, accuracy undefined


def test_hand_computed_case():
    truth = np.array([[0, 0, 1],
                      [1, 255, 2]], dtype=np.uint8)
    pred = np.array([[0, 1, 1],
                     [1, 2, 0]], dtype=np.uint8)
    inter, union, area_pred, area_label = intersect_and_union(pred, truth, 3, 255)
    # scored pixels (5): (0,0) 0/0 hit, (0,1) 0->1 miss, (0,2) 1/1 hit, (1,0) 1/1 hit, (1,2) 2->0 miss
    assert inter.tolist() == [1, 2, 0]
    assert area_pred.tolist() == [2, 3, 0] and area_label.tolist() == [2, 2, 1]
    assert union.tolist() == [3, 3, 1]
    m = segmentation_metrics([pred], [truth], 3, 255)
    np.testing.assert_allclose(m.iou, [1 / 3, 2 / 3, 0.0])
    assert m.miou == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert m.aacc == pytest.approx(3 / 5)
    np.testing.assert_allclose(m.acc, [0.5, 1.0, 0.0])


def test_all_one_class_image():
    truth = np.full((6, 9), 3, dtype=np.uint8)
    right = segmentation_metrics([truth.copy()], [truth], 5, 255)
    assert right.miou == 1.0 and right.aacc == 1.0
    assert np.isnan(right.iou[[0, 1, 2, 4]]).all()  # classes absent from both: left out of the mean
    wrong = segmentation_metrics([np.full_like(truth, 1)], [truth], 5, 255)
    assert wrong.miou == 0.0 and wrong.aacc == 0.0
    half = truth.copy()
    half[:, :3] = 0  # a third of the pixels wrong
    m = segmentation_metrics([half], [truth], 5, 255)
    assert m.iou[3] == pytest.approx(2 / 3) and m.iou[0] == 0.0 and m.miou == pytest.approx(1 / 3)


def test_totals_add_per_image_areas_and_shapes_must_match():
    a, b = np.zeros((2, 2), np.uint8), np.ones((3, 1), np.uint8)
    totals = total_intersect_and_union([a, b], [a, np.zeros((3, 1), np.uint8)], 2)
    assert [t.tolist() for t in totals] == [[4, 0], [7, 3], [4, 3], [7, 0]]
    with pytest.raises(CliplabError, match="differ in size"):
        intersect_and_union(a, b, 2)
