"""NoLA (paper 2): the authors' top-k rule on a written-out case, at most k per class reach the alignment head, step 0
is the (description-averaged) zero-shot classifier, no label of the pool reaches fit, a short fit beats zero-shot on
an easy task, bad DINO files and towers are one line, save/load and resume."""

from __future__ import annotations

import types

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP
from PIL import Image
from scipy.special import softmax

import cliplab.heads.nola as nola_module
from cliplab.errors import CliplabError, ModelLoadError, UnsupportedOperationError
from cliplab.features.values import ImageFeatures
from cliplab.heads import create_head, head_entry
from cliplab.heads.nola import NoLA, NolaModule, authors_top_k, find_k
from cliplab.heads.saving import load_head, save_head
from cliplab.models import BackboneInfo, load_model
from cliplab.models.openclip import OpenClipBackbone, transform_for
from cliplab.train.pseudolabels import select_top_k

pytestmark = pytest.mark.filterwarnings("ignore:nola. no dino_checkpoint")

NAMES = ["red", "green", "blue"]
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=np.float64)
TEMPLATES = ["a photo of a {c}."]
FAST = dict(templates=TEMPLATES, k=5, align_epochs=10, n_prompts=2, max_epoch=2, lr=0.01, batch_size=16)


class Colours:
    """32 px images of one of three colours blended (up to half) with another, plus noise; ``labels`` is there to
    be ignored: reading it fails the test."""

    def __init__(self, per_class: int, seed: int):
        rng = np.random.default_rng(seed)
        self.truth = np.repeat(np.arange(3), per_class)
        other = (self.truth + rng.integers(1, 3, size=len(self.truth))) % 3
        w = rng.uniform(0, 0.5, size=(len(self.truth), 1))
        colour = (1 - w) * COLOURS[self.truth] + w * COLOURS[other]
        noise = rng.normal(0, 20, (len(self.truth), 32, 32, 3))
        self.pixels = np.clip(colour[:, None, None, :] + noise, 0, 255).astype(np.uint8)

    @property
    def labels(self):
        raise AssertionError("a label of the pool was read")

    def __len__(self) -> int:
        return len(self.pixels)

    def load_image(self, i: int):
        return Image.fromarray(self.pixels[i])


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


def _features(backbone, images) -> np.ndarray:
    with torch.no_grad():
        pixels = torch.stack([backbone.preprocess(images.load_image(i)) for i in range(len(images))])
        return backbone.encode_images(pixels).numpy()


@pytest.fixture(scope="module")
def task(tiny):
    """(pool images, pool features, test images, test features, W): W (d, C) a deliberately imperfect classifier,
    each class direction pulled halfway towards the next class's (built from separate reference images)."""
    pool, test, ref = Colours(20, 0), Colours(20, 1), Colours(10, 2)
    R = _features(tiny, ref)
    means = np.stack([R[ref.truth == c].mean(0) for c in range(3)])
    W = means + 0.5 * np.roll(means, -1, axis=0)
    W = np.ascontiguousarray((W / np.linalg.norm(W, axis=1, keepdims=True)).T, dtype=np.float32)
    return pool, _features(tiny, pool), test, _features(tiny, test), W


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    """A random tiny timm ViT saved as safetensors: the stand-in for DINO's weights (no DINO weights here)."""
    import timm
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("dino") / "dino.safetensors"
    save_file(model.state_dict(), str(path))
    return str(path)


def _controlled(W):
    class Controlled(NoLA):
        """NoLA whose stage-1 classifier is ``W`` (the test's imperfect zero-shot classifier)."""

        def text_weights(self):
            return W, {}

    return Controlled


def test_registered_as_an_encoder_head_reading_unlabelled_images():
    entry = head_entry("nola")
    assert entry.family == "encoder" and entry.paper == 2 and set(entry.gives) == {"backbone"}
    assert {"images", "unlabelled", "descriptions", "llm"} <= set(entry.needs)


def test_the_authors_top_k_rule_on_a_written_out_case():
    probs = np.array([[.80, .15, .05],   # top: 0, 1, 2
                      [.60, .10, .30],   # top: 0, 2, 1
                      [.50, .18, .32],   # top: 0, 2, 1
                      [.10, .70, .20],   # top: 1, 2, 0
                      [.30, .65, .05]])  # top: 1, 0, 2
    rows, labels = authors_top_k(probs, 2)
    # class 0: its top-1 rows 0 (.80), 1 (.60), 2 (.50) -> the best two; class 1: rows 3, 4; class 2 is nobody's
    # top-1, so its second-choice rows by p(2): row 2 (.32), row 1 (.30); row 1 already went to class 0: dropped
    np.testing.assert_array_equal(rows, [0, 1, 3, 4, 2])
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2])
    assert find_k(1000, 10) == 20 and find_k(100, 10) == 16  # floor(n / C * 0.2), at least 16


@pytest.mark.parametrize("rule", ["authors", "balanced"])
def test_at_most_k_per_class_and_each_row_once(rule):
    probs = np.random.default_rng(0).dirichlet(np.ones(4) * 0.3, size=200)
    rows, labels = authors_top_k(probs, 7) if rule == "authors" else select_top_k(probs, 7)
    assert np.bincount(labels, minlength=4).max() <= 7 and len(set(rows.tolist())) == len(rows)


def test_only_the_top_k_per_class_reach_the_alignment_head(tiny, task, dino, monkeypatch):
    pool, X, _, _, W = task
    seen = []
    original = nola_module.AlignObjective.__call__
    monkeypatch.setattr(nola_module.AlignObjective, "__call__",
                        lambda self, module, batch: seen.append(batch["labels"].clone()) or original(self, module,
                                                                                                      batch))
    head = _controlled(W)(tiny, NAMES, dino_checkpoint=dino, dino_arch="test_vit",
                          **{**FAST, "k": 3, "align_epochs": 1, "max_epoch": 0})
    head.fit(X, np.zeros(len(X), np.int64), images=pool)
    labels = torch.cat(seen).numpy()  # one epoch: every row the head learns from, once
    assert len(labels) == len(head.pseudo_rows_) <= 3 * len(NAMES)
    assert np.bincount(labels, minlength=3).max() <= 3
    np.testing.assert_array_equal(np.sort(labels), np.sort(head.pseudo_labels_))
    probs = softmax(tiny.logit_scale * (X @ W), axis=1)  # each class's rows: the most confident predicted as it
    for c in range(3):
        mine = head.pseudo_rows_[head.pseudo_labels_ == c]
        predicted = np.flatnonzero(probs.argmax(1) == c)
        if len(predicted) >= 3:
            assert set(mine) == set(predicted[np.argsort(-probs[predicted, c])][:3])


def test_step_zero_is_the_zero_shot_classifier(tiny, task):
    pool, X, test, Xt, _ = task
    for params, reference in (
            ({}, create_head("zeroshot", backbone=tiny, class_names=NAMES, templates=TEMPLATES)),
            ({"descriptions": {n: [f"a {n} square.", f"something coloured {n}."] for n in NAMES}},
             create_head("cupl", backbone=tiny, class_names=NAMES, templates=TEMPLATES,
                         descriptions={n: [f"a {n} square.", f"something coloured {n}."] for n in NAMES}))):
        head = create_head("nola", backbone=tiny, class_names=NAMES, **{**FAST, "max_epoch": 0, **params})
        head.fit(X, np.zeros(len(X), np.int64), images=pool)
        reference.fit()
        np.testing.assert_allclose(head.weights_, reference.weights_, atol=1e-6)
        np.testing.assert_allclose(head.logits(Xt), reference.logits(Xt), rtol=1e-5, atol=1e-5)
    # the student at step 0 (no prompts): its logits on images are the zero-shot head's on their features
    module = NolaModule(tiny, torch.from_numpy(reference.weights_.T.copy()), reference.logit_scale_)
    pixels = torch.stack([tiny.preprocess(test.load_image(i)) for i in range(6)])
    with torch.no_grad():
        np.testing.assert_allclose(module(pixels).numpy(), reference.logits(Xt[:6]), rtol=1e-5, atol=1e-4)


def test_no_label_of_the_pool_reaches_fit(tiny, task, dino):
    pool, X, _, _, W = task
    half = len(X) // 2
    rest = Colours(20, 0)
    rest.pixels = pool.pixels[half:]
    first = Colours(20, 0)
    first.pixels = pool.pixels[:half]
    heads = []
    for y, unlabelled_labels in ((np.zeros(half, np.int64), np.full(len(X) - half, -1)),
                                 (np.random.default_rng(5).integers(0, 3, half), np.zeros(len(X) - half, np.int64))):
        unlabelled = ImageFeatures(features=X[half:], labels=unlabelled_labels,
                                   item_ids=[str(i) for i in range(len(X) - half)],
                                   indices=np.arange(len(X) - half), class_names=NAMES)
        head = _controlled(W)(tiny, NAMES, dino_checkpoint=dino, dino_arch="test_vit", **{**FAST, "max_epoch": 1})
        heads.append(head.fit(X[:half], y, unlabelled=unlabelled, images=first, unlabelled_images=rest))
    a, b = heads
    assert a.pool_size_ == len(X)
    for key in ("weights_", "vis_ctx_", "pseudo_rows_", "student_labels_", "align_w2_"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


def test_a_short_fit_beats_zero_shot_on_an_easy_task(tiny, task, dino):
    pool, X, test, Xt, W = task
    zero_shot = float(((Xt @ W).argmax(1) == test.truth).mean())
    head = _controlled(W)(tiny, NAMES, dino_checkpoint=dino, dino_arch="test_vit", **FAST)
    head.fit(X, np.zeros(len(X), np.int64), images=pool)
    assert zero_shot < 0.9
    # the premise: CLIP's most confident rows are right more often than its average row
    assert (head.pseudo_labels_ == pool.truth[head.pseudo_rows_]).mean() > ((X @ W).argmax(1) == pool.truth).mean()
    tuned = float((head.predict(_features(head.backbone_, test)) == test.truth).mean())
    assert tuned > zero_shot, (tuned, zero_shot)
    assert head.ssl_encoder_ == "timm:test_vit" and head.vis_ctx_.shape == (2, tiny.image_tower().width)


def test_bad_dino_checkpoints_and_inputs_are_one_line_before_training(tiny, task, dino, tmp_path, monkeypatch):
    pool, X, _, _, _ = task
    monkeypatch.setattr(nola_module, "run_training", lambda *a, **k: pytest.fail("training started"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    y = np.zeros(len(X), np.int64)
    for params, error, words in (
            ({"dino_checkpoint": str(tmp_path / "missing.safetensors")}, ModelLoadError, "DINO checkpoint not found"),
            ({"dino_checkpoint": str(garbage)}, ModelLoadError, "garbage.pt"),
            ({"dino_checkpoint": dino, "dino_arch": "vit_tiny_patch16_224"}, ModelLoadError, "not a vit_tiny"),
            ({"dino_checkpoint": dino, "dino_arch": "no_such_vit"}, ModelLoadError, "cannot build"),
            ({"selection": "best"}, CliplabError, "selection must be one of")):
        head = create_head("nola", backbone=tiny, class_names=NAMES, **{**FAST, **params})
        with pytest.raises(error, match=words) as info:
            head.fit(X, y, images=pool)
        assert "\n" not in str(info.value)
    with pytest.raises(CliplabError, match="needs the images") as info:
        create_head("nola", backbone=tiny, class_names=NAMES, **FAST).fit(X, y)
    assert "\n" not in str(info.value)


def test_a_resnet_image_tower_takes_no_prompts_but_trains_the_head(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIP(embed_dim=32, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                     text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    info = BackboneInfo(name="tiny-resnet", pretrained=None, source="test", random_weights=True)
    backbone = OpenClipBackbone(model.eval(), transform_for(model), open_clip.SimpleTokenizer(context_length=16),
                                info, "test:tiny-resnet", "cpu")
    images = Colours(4, 0)
    X = _features(backbone, images)
    y = np.zeros(len(X), np.int64)
    head = create_head("nola", backbone=backbone, class_names=NAMES, **FAST)
    with pytest.raises(UnsupportedOperationError, match="n_prompts=0") as caught:
        head.fit(X, y, images=images)
    assert "\n" not in str(caught.value)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    head = create_head("nola", backbone=backbone, class_names=NAMES, **{**FAST, "n_prompts": 0, "max_epoch": 1})
    head.fit(X, y, images=images)
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())
    assert head.vis_ctx_.shape[0] == 0 and not np.allclose(head.weights_, head.text_weights_)
    save_head(head, tmp_path / "resnet")
    np.testing.assert_array_equal(load_head(tmp_path / "resnet", backbone).logits(X), head.logits(X))
    norms = create_head("nola", backbone=backbone, class_names=NAMES,
                        **{**FAST, "n_prompts": 0, "max_epoch": 1, "train_norms": True}).fit(X, y, images=images)
    changed = {k for k, v in norms.backbone_.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and changed <= set(norms.norm_names_)  # BatchNorm weights and biases only (running stats kept)


def test_save_load_and_a_refit_from_finished_checkpoints(tiny, task, dino, tmp_path, monkeypatch):
    pool, X, test, Xt, W = task
    folder = tmp_path / "checkpoints"
    params = dict(dino_checkpoint=dino, dino_arch="test_vit", checkpoint_dir=str(folder), **{**FAST, "max_epoch": 1})
    first = create_head("nola", backbone=tiny, class_names=NAMES, **params)
    first.fit(X, np.zeros(len(X), np.int64), images=pool)
    assert sorted(p.name for p in folder.iterdir()) == ["align", "student"]
    steps = []
    for objective in (nola_module.AlignObjective, nola_module.NolaObjective):
        original = objective.__call__
        monkeypatch.setattr(objective, "__call__",
                            lambda self, module, batch, original=original: steps.append(1) or original(self, module,
                                                                                                        batch))
    again = create_head("nola", backbone=tiny, class_names=NAMES, **params)
    again.fit(X, np.zeros(len(X), np.int64), images=pool)  # both stages resume from finished checkpoints
    assert steps == []
    np.testing.assert_array_equal(again.weights_, first.weights_)
    np.testing.assert_array_equal(again.vis_ctx_, first.vis_ctx_)
    save_head(first, tmp_path / "saved")
    loaded = load_head(tmp_path / "saved", tiny)
    assert loaded.backbone_.model_id == first.backbone_.model_id != tiny.model_id
    features = _features(first.backbone_, test)
    np.testing.assert_array_equal(_features(loaded.backbone_, test), features)
    np.testing.assert_array_equal(loaded.logits(features), first.logits(features))


def test_with_classes_keeps_the_prompts_and_scores_new_names(tiny, task):
    pool, X, _, Xt, _ = task
    head = create_head("nola", backbone=tiny, class_names=NAMES, **{**FAST, "max_epoch": 1})
    head.fit(X, np.zeros(len(X), np.int64), images=pool)
    new = head.with_classes(["cyan", "magenta"])
    zeroshot = create_head("zeroshot", backbone=tiny, class_names=["cyan", "magenta"], templates=TEMPLATES).fit()
    np.testing.assert_allclose(new.weights_, zeroshot.weights_, atol=1e-6)
    np.testing.assert_array_equal(new.vis_ctx_, head.vis_ctx_)
    assert new.logits(Xt).shape == (len(Xt), 2)


def test_an_unlabelled_set_given_as_plain_features_is_the_same_as_an_image_features(tiny, task):
    pool, X, _, _, _ = task
    plain = types.SimpleNamespace(features=X[30:])
    rest = Colours(20, 0)
    rest.pixels = pool.pixels[30:]
    first = Colours(20, 0)
    first.pixels = pool.pixels[:30]
    head = create_head("nola", backbone=tiny, class_names=NAMES, **{**FAST, "max_epoch": 0, "max_unlabelled": 40})
    head.fit(X[:30], np.zeros(30, np.int64), unlabelled=plain, images=first, unlabelled_images=rest)
    assert head.pool_size_ == 40 and head.pseudo_rows_.max() < len(X)


def test_train_norms_trains_only_the_norm_layers_of_a_copy_and_reloads(tiny, task, tmp_path):
    pool, X, test, _, _ = task
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    head = create_head("nola", backbone=tiny, class_names=NAMES, **{**FAST, "max_epoch": 1, "train_norms": True})
    head.fit(X, np.zeros(len(X), np.int64), images=pool)
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())  # the shared model
    changed = {k for k, v in head.backbone_.model.state_dict().items() if k in before and not torch.equal(before[k], v)}
    assert changed and changed <= set(head.norm_names_)
    assert all(".ln_" in n or n.startswith("visual.ln_") for n in head.norm_names_)
    assert head.norms_.size == sum(before[n].numel() for n in head.norm_names_)
    save_head(head, tmp_path / "norms")
    loaded = load_head(tmp_path / "norms", tiny)
    assert loaded.backbone_.model_id == head.backbone_.model_id
    np.testing.assert_array_equal(_features(loaded.backbone_, test), _features(head.backbone_, test))
