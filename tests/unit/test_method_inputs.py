"""One provider of method inputs (``cliplab.eval.inputs``): the declared template default everywhere, the fit
inputs a head declares built from a train split, auxiliary features (AMU) and derived Backbones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.data import load_dataset
from cliplab.errors import CliplabError
from cliplab.eval.inputs import (
    FitInputs,
    build_head,
    dataset_templates,
    prepare_fit,
    resolve_templates,
    run_method,
    test_features,
)
from cliplab.features import embed_images
from cliplab.heads import create_head, head_entry, list_heads
from cliplab.heads.base import ClipHead
from cliplab.heads.registry import _REGISTRY, DATASET_TEMPLATES, register

NAMES = ["apple", "pear", "plum"]
TEMPLATE_METHODS = [e.name for e in list_heads() if e.takes_templates]
ZEROSHOT_METHODS = [e.name for e in list_heads() if e.family == "zeroshot" and not e.needs_train]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A class folder with train/ and test/ splits (8 + 2 images per class), 20-pixel PNGs."""
    root = tmp_path_factory.mktemp("inputs") / "fruit"
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 2)):
        for c, name in enumerate(NAMES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 60 * c, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("method", TEMPLATE_METHODS)
def test_templates_none_is_the_declared_default_with_and_without_a_dataset(tiny, method):
    entry = head_entry(method)
    for dataset, expected_set in (("cifar10", "cifar10"), ("my_folder", "imagenet7"), (None, "imagenet7")):
        head = build_head(method, tiny, NAMES, dataset_name=dataset)
        if entry.default_templates == DATASET_TEMPLATES:
            assert head.templates == expected_set
        elif entry.default_templates == ():
            assert head.templates is None
        else:
            assert head.templates == entry.default_templates
    given = build_head(method, tiny, NAMES, dataset_name="cifar10", templates=["a {c} here"])
    assert given.templates == ["a {c} here"]
    via_params = build_head(method, tiny, NAMES, params={"templates": "imagenet80"})
    assert via_params.templates == "imagenet80"


def test_the_dataset_rule_and_methods_without_templates(tiny):
    assert dataset_templates("cifar100") == "cifar100" and dataset_templates("nosuch") == "imagenet7"
    assert dataset_templates(None) == "imagenet7"
    assert resolve_templates("ncm", "cifar10") is None
    ncm = build_head("ncm", tiny, NAMES, templates="cifar10", params={"logit_scale": 20.0})  # ignored: takes none
    assert ncm.get_params() == {"logit_scale": 20.0}
    assert build_head("zeroshot", tiny, NAMES, cache_dir="/x").cache_dir == "/x"


@pytest.mark.parametrize("method", ZEROSHOT_METHODS)
def test_classify_and_zeroshot_build_the_same_classifier(tiny, method, tmp_path):
    """`cliplab classify` builds for labels (no dataset), `cliplab zeroshot` for a class folder named after no
    template set: the provider gives both the same head (parameters, and weights where it needs no LLM)."""
    params = {"waffle_count": 2} if method == "waffle" else {}
    classify = build_head(method, tiny, NAMES, params=params, cache_dir=tmp_path)
    zeroshot = build_head(method, tiny, NAMES, dataset_name="my_photos", params=params, cache_dir=tmp_path)
    assert classify.get_params() == zeroshot.get_params()
    if method in ("fudd",):  # its fit asks a language model
        return
    X = np.random.default_rng(1).normal(size=(5, tiny.embed_dim)).astype(np.float32)
    np.testing.assert_array_equal(classify.fit().logits(X), zeroshot.fit().logits(X))


def test_prepare_fit_gives_exactly_the_declared_inputs(tiny, folders, tmp_path):
    train = load_dataset(str(folders), split="train")
    shared: dict = {}
    options = {"cache_dir": tmp_path / "cache", "workers": 0, "progress": False, "shared": shared, "views": 2}
    tip = build_head("tip-adapter", tiny, NAMES)
    inputs = prepare_fit(tip, tiny, train, shots=2, seed=3, output_dir=tmp_path / "out", **options)
    assert set(inputs.fit_params) == {"views"} and inputs.fit_params["views"].shape == (2, 6, tiny.embed_dim)
    assert len(inputs.train) == 6 and len(inputs.val) == 6 and inputs.aux_model is None
    assert not set(inputs.train.item_ids) & set(inputs.val.item_ids)
    record = json.loads(inputs.split_file.read_text())
    assert inputs.split_file.name == f"split_{train.name}_2shot_seed3.json" and record["seed"] == 3
    assert sorted(record["train_ids"]) == sorted(inputs.train.item_ids)
    ncm = prepare_fit(build_head("ncm", tiny, NAMES), tiny, train, shots=2, seed=3, **options)
    assert ncm.fit_params == {} and ncm.train.item_ids == inputs.train.item_ids  # the same draw, shared
    again = prepare_fit(build_head("ncm", tiny, NAMES), tiny, train, split_file=inputs.split_file,
                        **{**options, "shared": {}})
    assert again.train.item_ids == inputs.train.item_ids and again.val.item_ids == inputs.val.item_ids
    whole = prepare_fit(tip, tiny, train, **options)  # no draw: the whole split, no validation part, no views
    assert whole.val is None and whole.fit_params == {} and len(whole.train) == len(train)
    assert prepare_fit(build_head("zeroshot", tiny, NAMES), tiny, train) == FitInputs()
    with pytest.raises(CliplabError, match="needs training data"):
        prepare_fit(tip, tiny, None)
    with pytest.raises(CliplabError, match="not both"):
        prepare_fit(tip, tiny, train, shots=1, split_file=inputs.split_file)


def test_amu_gets_auxiliary_features_for_train_val_and_test(tiny, folders, tmp_path):
    """AMU's second model is embedded by the provider (before, only the few-shot protocol did it)."""
    train = load_dataset(str(folders), split="train")
    test = load_dataset(str(folders), split="test")
    cache = tmp_path / "cache"
    with pytest.raises(CliplabError, match="aux_model"):
        prepare_fit(build_head("amu", tiny, NAMES), tiny, train, shots=1)
    done = run_method("amu", tiny, test, train, params={"aux_model": "tiny", "epochs": 2}, shots=2, seed=1,
                      output_dir=tmp_path / "out", cache_dir=cache, workers=0, progress=False)
    d = tiny.embed_dim
    assert done.inputs.train.dim == done.test.dim == 2 * d and done.inputs.aux_model == "tiny"
    assert "views" not in done.inputs.fit_params  # views are of the CLIP model only
    plain = embed_images(tiny, test, cache, num_workers=0, progress=False)
    np.testing.assert_array_equal(done.test.features[:, :d], plain.features)
    np.testing.assert_array_equal(done.test.features[:, d:], plain.features)  # the aux model is tiny too
    assert done.report.record["cliplab"]["method"] == "amu" and 0 <= done.report.metrics["acc1"] <= 1


class _Derived(ClipHead):
    """A stub head that 'trains' a derived Backbone on its training images and scores through it."""

    def __init__(self, backbone=None, class_names=None, cache_dir=None):
        self.backbone = backbone
        self.class_names = class_names
        self.cache_dir = cache_dir

    def fit(self, X, y, images=None):
        X, y = self._validate(X, y, reset=True)
        self.images_seen_ = np.asarray(images.labels).tolist()  # labels of the images, row by row
        self.labels_seen_ = y.tolist()
        self.backbone_ = self.backbone.derive("stub", trainable=False)
        with __import__("torch").no_grad():
            for p in self.backbone_.model.visual.parameters():
                p.mul_(1.5)  # new weights: a new model id
        feats = embed_images(self.backbone_, images, self.cache_dir, num_workers=0, progress=False)
        means = np.stack([feats.features[np.asarray(y) == c].mean(0) for c in range(len(self.class_names))], 1)
        self.weights_ = means / np.linalg.norm(means, axis=0, keepdims=True)
        self.classes_ = np.arange(len(self.class_names))
        return self

    def logits(self, X):
        return self._checked(X) @ self.weights_


@pytest.fixture()
def derived_head():
    register("_stub-derived", family="encoder", needs=("images",), gives=("backbone",))(_Derived)
    yield "_stub-derived"
    _REGISTRY.pop("_stub-derived")


def test_a_head_that_gives_a_backbone_has_its_test_images_embedded_through_it(tiny, folders, tmp_path,
                                                                              derived_head):
    train = load_dataset(str(folders), split="train")
    test = load_dataset(str(folders), split="test")
    cache = tmp_path / "cache"
    head = build_head(derived_head, tiny, NAMES, cache_dir=cache)
    with pytest.raises(CliplabError, match="fit it before"):
        test_features(head, tiny, test, cache_dir=cache)
    done = run_method(derived_head, tiny, test, train, shots=2, seed=1, output_dir=tmp_path / "out",
                      cache_dir=cache, workers=0, progress=False)
    fitted = done.head
    assert fitted.images_seen_ == fitted.labels_seen_ and len(fitted.labels_seen_) == 6  # images aligned with rows
    derived = fitted.backbone_
    assert derived.model_id != tiny.model_id and done.test.model_id == derived.model_id
    through = embed_images(derived, test, cache, num_workers=0, progress=False)
    assert through.computed == 0  # already in the cache, under the derived model's id
    np.testing.assert_array_equal(done.test.features, through.features)
    assert not np.allclose(done.test.features, embed_images(tiny, test, cache, num_workers=0,
                                                            progress=False).features)
    expected = (through.labelled().labels == fitted.predict(through.labelled().features)).mean()
    assert done.report.metrics["acc1"] == pytest.approx(expected)


def test_create_head_still_builds_with_the_heads_own_defaults(tiny):
    assert create_head("tip-adapter", backbone=tiny, class_names=NAMES).templates == "generic"


def test_the_service_names_the_templates_its_classifier_gets():
    from cliplab.service.app import CLASSIFY_METHOD, CLASSIFY_TEMPLATES

    assert resolve_templates(CLASSIFY_METHOD) == CLASSIFY_TEMPLATES  # no dataset: the declared default's fallback
