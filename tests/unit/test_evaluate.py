"""One evaluation for every head, shown with the nearest-class-mean head added as one file."""

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from cliplab.errors import CliplabError, DatasetError
from cliplab.eval import classification_metrics, evaluate
from cliplab.features import ImageFeatures
from cliplab.heads import NearestClassMean, create_head, head_entry

MODEL = {"model": "ViT-B-32", "pretrained": "/weights/ckpt.pt", "model_id": "m1", "weights": "local weights"}


def _features(n_per_class, seed, split, dim=16, offset=0, spread=0.6):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(len(n_per_class), dim))
    labels = np.repeat(np.arange(len(n_per_class)), n_per_class)
    X = centers[labels] + spread * rng.normal(size=(len(labels), dim))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"{split}/{i + offset}.png" for i in range(len(labels))]
    return ImageFeatures(X, labels, ids, np.arange(len(labels)), class_names=[f"c{i}" for i in range(len(n_per_class))],
                         dataset="toy", split=split, model_id="m1", model=MODEL, cache_key=f"space/{split}")


def test_ncm_weights_are_normalised_class_means():
    train = _features((6, 6, 6), seed=0, split="train")
    head = NearestClassMean().fit(train.features, train.labels)
    for c in range(3):
        mean = train.features[train.labels == c].mean(axis=0)
        np.testing.assert_allclose(head.weights_[:, c], mean / np.linalg.norm(mean), atol=1e-6)
    X = train.features[:4]
    np.testing.assert_allclose(head.logits(X), 100.0 * X @ head.weights_, rtol=1e-5)
    assert head_entry("ncm").needs_train and not head_entry("ncm").needs_backbone


def test_generic_evaluation_of_a_few_shot_head_writes_the_results_json(tmp_path):
    train = _features((20, 20, 20), seed=0, split="train")
    test = _features((30, 30, 30), seed=1, split="test")
    shots = train.few_shot(5, seed=3)
    head = create_head("ncm", logit_scale=50.0)
    report = evaluate(head, test, shots.train, output_dir=tmp_path, seed=3, shots=5, split_file="split.json")
    predicted = head.predict(test.features)
    assert report.metrics["acc1"] == pytest.approx(accuracy_score(test.labels, predicted))
    assert report.metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(test.labels, predicted))
    assert report.metrics["acc1"] > 0.8  # separable toy classes
    record = json.loads(report.files["json"].read_text())
    assert (record["model"], record["pretrained"], record["dataset"]) == ("ViT-B-32", "/weights/ckpt.pt", "toy")
    block = record["cliplab"]
    assert block["method"] == "ncm" and block["params"] == {"logit_scale": 50.0}
    assert (block["shots"], block["seed"], block["split"], block["split_file"]) == (5, 3, "test", "split.json")
    assert block["train_split"] == {"split": "train", "num_images": 15}
    assert report.files["confusion"].is_file() and report.files["reliability"].is_file()


def test_test_labels_never_reach_fit(tmp_path):
    train = _features((8, 8, 8), seed=0, split="train")
    test = _features((10, 10, 10), seed=1, split="test")
    poisoned = ImageFeatures(test.features, np.random.default_rng(5).permutation(test.labels), test.item_ids,
                             test.indices, class_names=test.class_names, dataset="toy", split="test", model=MODEL)
    clean_head, poisoned_head = NearestClassMean(), NearestClassMean()
    evaluate(clean_head, test, train)
    evaluate(poisoned_head, poisoned, train)
    np.testing.assert_array_equal(clean_head.weights_, poisoned_head.weights_)


def test_overlap_and_missing_training_data_are_refused():
    train = _features((4, 4), seed=0, split="train")
    with pytest.raises(DatasetError, match="also a training item"):
        evaluate(NearestClassMean(), train, train)
    with pytest.raises(CliplabError, match="needs training features"):
        evaluate(NearestClassMean(), train)


def test_classes_missing_from_training_score_minus_infinity():
    train = _features((5, 5, 5), seed=0, split="train")
    test = _features((5, 5, 5), seed=1, split="test")
    report = evaluate(NearestClassMean(), test, train.subset(train.labels != 2))
    assert report.scores.shape == (15, 3) and np.isinf(report.scores[:, 2]).all()


def test_acc5_is_nan_below_five_classes_as_in_clip_benchmark():
    y = np.array([0, 1, 2, 3])
    scores = np.eye(4)
    assert np.isnan(classification_metrics(y, scores, scores)["acc5"])  # was 1.0
    five = np.eye(5)
    assert classification_metrics(np.arange(5), five, five)["acc5"] == 1.0


def test_zeroshot_evaluation_is_the_same_path(tiny, tmp_path):
    from PIL import Image

    from cliplab.data import image_folder
    from cliplab.eval import evaluate_zeroshot

    for name, colour in (("red", (250, 0, 0)), ("blue", (0, 0, 250))):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), colour).save(tmp_path / "imgs" / name / "x.png")
    report = evaluate_zeroshot(tiny, image_folder(tmp_path / "imgs"), ["a {c} image"], tmp_path / "out",
                               tmp_path / "cache", num_workers=0, progress=False)
    block = report.record["cliplab"]
    assert block["method"] == "zeroshot" and block["params"]["templates"] == ["a {c} image"]
    assert block["split"] == "all" and report.record["model"] == "tiny" and "random" in block["weights"]
    assert report.files["json"].name.startswith("zeroshot_imgs_all_tiny_")
