"""Anomaly metrics (eval/anomaly.py): AUPRO by hand and against a brute-force written-out definition; AUROCs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import label
from sklearn.metrics import roc_auc_score

from cliplab.errors import CliplabError
from cliplab.eval.anomaly import anomaly_metrics, aupro, image_auroc, pixel_auroc, pro_curve


def test_aupro_hand_case():
    # image 1: region A = 2 pixels; image 2: region B = 1 pixel; 5 defect-free pixels.
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 1]]], bool)
    maps = np.array([[[0.9, 0.4, 0.8, 0.1]], [[0.2, 0.3, 0.05, 0.7]]])
    # thresholds 0.9: A half found, FPR 0 -> PRO 0.25; 0.8: FPR 1/5; 0.7: B found -> 0.75; 0.4: A whole -> 1.0;
    # 0.3: FPR 2/5. Area to FPR 0.3: 0.2 x 0.25 + 0.1 x 1.0 = 0.15, / 0.3 = 0.5.
    fpr, pro = pro_curve(masks, maps)
    assert np.allclose(fpr[:6], [0, 0, 0.2, 0.2, 0.2, 0.4]) and np.allclose(pro[:6], [0, 0.25, 0.25, 0.75, 1, 1])
    assert aupro(masks, maps) == pytest.approx(0.5)
    assert aupro(masks, maps, fpr_limit=0.2) == pytest.approx(0.25)


def test_regions_are_8_connected():
    masks = np.array([[[1, 0, 0], [0, 1, 1]]], bool)  # one region with 8-connectivity, two with 4
    maps = np.array([[[0.9, 0.1, 0.2], [0.3, 0.5, 0.4]]])
    _, pro = pro_curve(masks, maps)
    assert pro[1] == pytest.approx(1 / 3)  # 4-connectivity would give (1 + 0) / 2


def brute_aupro(masks, maps, limit):
    regions = []
    for i, mask in enumerate(masks):
        comp, count = label(mask, structure=np.ones((3, 3)))
        regions += [(i, comp == k) for k in range(1, count + 1)]
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel()), reverse=True):
        fpr = ((maps >= t) & ~masks).sum() / (~masks).sum()
        pro = np.mean([(maps[i][r] >= t).mean() for i, r in regions])
        points.append((fpr, pro))
    x, y = np.array(points).T
    # PRO at the limit: linear between the last point at or below it and the first above it
    below, above = np.where(x <= limit)[0][-1], np.where(x > limit)[0][0]
    xs = np.r_[x[:below + 1], limit]
    ys = np.r_[y[:below + 1], y[below] + (y[above] - y[below]) * (limit - x[below]) / (x[above] - x[below])]
    return np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2) / limit


def test_aupro_equals_brute_force_definition():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 12, 12), bool)
    masks[0, 2:5, 3:7] = True
    masks[0, 8:10, 8:11] = True
    masks[2, 5:9, 1:3] = True
    maps = rng.random((4, 12, 12)).round(2) + masks * 0.3  # ties included
    for limit in (0.3, 0.05):
        assert aupro(masks, maps, limit) == pytest.approx(brute_aupro(masks, maps, limit), abs=1e-12)


def test_aurocs_are_sklearns():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 6, 6)) > 0.8
    maps = rng.random((3, 6, 6)) + masks
    labels, scores = np.array([0, 1, 1]), np.array([0.2, 0.5, 0.9])
    assert pixel_auroc(masks, maps) == roc_auc_score(masks.ravel(), maps.ravel())
    assert image_auroc(labels, scores) == 1.0
    perfect = anomaly_metrics(labels, scores, masks, masks.astype(float))
    assert perfect == {"image_auroc": 1.0, "pixel_auroc": 1.0, "aupro": pytest.approx(1.0)}


@pytest.mark.parametrize("call", [
    lambda: image_auroc([1, 1], [0.1, 0.2]),
    lambda: pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 2, 3))),
    lambda: aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 2))),
    lambda: pixel_auroc(np.eye(2)[None], np.full((1, 2, 2), np.nan)),
])
def test_bad_input_is_one_line(call):
    with pytest.raises(CliplabError) as info:
        call()
    assert "\n" not in str(info.value)


def test_evaluate_anomaly_scores_the_synthetic_split_through_the_api():
    from pathlib import Path

    from cliplab.data.anomaly import anomaly_set
    from cliplab.eval.anomaly import evaluate_anomaly
    from cliplab.models import load_model
    from cliplab.regions.anomaly import PromptBaseline, patch_features

    root = "/work/shared/datasets"
    if not (Path(root) / "dtd_sample" / "labels.json").is_file():
        pytest.skip("dtd_sample not available")
    backbone = load_model("tiny")
    test = anomaly_set("test", root=root, size=32, limit=5, per_source=2, anomaly_ratio=0.6)
    record = evaluate_anomaly(backbone, test, method="winclip", size=32)
    out = PromptBaseline(backbone).score(patch_features(backbone, test.images(), size=32), 32)
    expected = anomaly_metrics(test.labels, out.scores.numpy(), test.masks, out.maps.numpy())
    assert {k: record[k] for k in expected} == pytest.approx(expected)
    assert record["test_images"] == len(test) and record["patch_mode"] == "dense"
    with pytest.raises(CliplabError):
        evaluate_anomaly(backbone, test, method="bayes-pfl")  # neither a model nor the auxiliary split
