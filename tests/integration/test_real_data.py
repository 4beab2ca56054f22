"""Real datasets from ../shared/datasets through the whole pipeline (tiny model: random weights)."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score

from cliplab.data import load_dataset
from cliplab.eval import evaluate_zeroshot
from cliplab.features import embed_images
from cliplab.heads import ZeroShotClassifier

pytestmark = pytest.mark.integration

MNIST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_cifar10_test_split_matches_official_facts(data_root):
    data = load_dataset("cifar10", root=data_root)
    assert len(data) == 10000 and np.bincount(data.labels).tolist() == [1000] * 10
    assert data.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                "truck"]
    decoded = np.stack([np.asarray(data.load_image(i)) for i in range(len(data))]).reshape(-1, 3) / 255.0
    # the published per-channel (R, G, B) means of CIFAR-10's test set: wrong channel order or layout fails
    np.testing.assert_allclose(decoded.mean(axis=0), [0.4942, 0.4851, 0.4504], atol=2e-4)
    train, val = (load_dataset("cifar10", root=data_root, split=s) for s in ("train", "val"))
    assert len(train) + len(val) == 10000  # data_batch_1: 1,000 per class, 10% of it held out as val


def test_mnist_official_class_counts(data_root):
    for name in ("mnist", "fashion_mnist"):
        data = load_dataset(name, root=data_root)
        assert data.images.shape == (10000, 28, 28)
    assert np.bincount(load_dataset("mnist", root=data_root).labels).tolist() == MNIST_COUNTS


def test_zeroshot_cifar10_metrics_agree_with_sklearn(data_root, tiny, tmp_path):
    data = load_dataset("cifar10", root=data_root)
    report = evaluate_zeroshot(tiny, data, "cifar10", tmp_path / "out", tmp_path / "cache", progress=False)
    feats = report.features
    assert len(feats) == 10000 and not feats.failures
    head = ZeroShotClassifier(tiny, data.class_names, "cifar10", cache_dir=tmp_path / "cache").fit()
    scores = head.decision_function(feats.features)
    y = feats.labels
    assert report.metrics["acc1"] == pytest.approx(accuracy_score(y, scores.argmax(1)))
    assert report.metrics["acc5"] == pytest.approx(top_k_accuracy_score(y, scores, k=5))
    assert report.metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(y, scores.argmax(1)))
    assert report.record["cliplab"]["fit"]["prompts_per_class"] == [18]
    assert report.record["cliplab"]["split"] == "test"
    assert report.record["cliplab"]["weights"].startswith("random weights")


@pytest.mark.parametrize("name, size", [("imagenette", 1000), ("dtd", 100), ("coco", 159)])
def test_file_datasets_decode_completely(data_root, tiny, tmp_path, name, size):
    data = load_dataset(name, root=data_root)
    out = embed_images(tiny, data, tmp_path, progress=False)
    assert len(out) == size and not out.failures
    if name == "coco":
        assert all(len(c) == 5 for c in data.captions)
    else:
        assert len(data.class_names) == 10 and set(out.labels.tolist()) == set(range(10))
