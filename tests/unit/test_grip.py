"""GRIP (paper 23): unlabelled labels never reach fit, zero rounds is zero-shot, the three settings, bad input,
training beats zero-shot on an easy task, the visual prompts train only themselves."""

import dataclasses

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP
from PIL import Image
from sklearn.metrics import log_loss

import cliplab.heads.grip as grip_module
from cliplab.errors import CliplabError, UnsupportedOperationError
from cliplab.features.values import ImageFeatures
from cliplab.heads import create_head, head_entry
from cliplab.heads.saving import load_head, save_head
from cliplab.models import BackboneInfo, load_model
from cliplab.models.openclip import OpenClipBackbone, transform_for
from cliplab.train.prompts import PromptLearner, initial_context

NAMES = ["cat", "dog", "traffic light"]
FAST = dict(templates=["a photo of a {c}."], step_quantile=50, max_epoch=1, batch_size=64, warmup_epochs=0, lr=0.5)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def task(tiny):
    """Features near the class text directions of a random context (zero-shot with "a photo of a" is poor):
    2 labelled rows a class, 10 unlabelled, 10 test."""
    ctx, tokens, embedded, start = initial_context(tiny, NAMES, 4, None, 7, "test")
    target = PromptLearner(tiny, ctx * 50, embedded[:, :start], embedded[:, start + 4:], tokens, 100.0)
    with torch.no_grad():
        text = target.text_features().numpy()
    rng = np.random.default_rng(0)

    def draw(n):
        y = np.repeat(np.arange(len(NAMES)), n)
        X = text[y] + 0.05 * rng.normal(size=(len(y), tiny.embed_dim))
        return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), y

    return draw(2), draw(10), draw(10)


def _features(X, labels) -> ImageFeatures:
    return ImageFeatures(features=X, labels=labels, item_ids=[str(i) for i in range(len(X))],
                         indices=np.arange(len(X)), class_names=NAMES)


def test_registered_per_modality_as_encoder_heads():
    for name, gives in (("grip", ("class_weights",)), ("grip-visual", ("backbone",)),
                        ("grip-multimodal", ("backbone",))):
        entry = head_entry(name)
        assert entry.family == "encoder" and entry.paper == 23 and tuple(entry.gives) == gives


def test_the_unlabelled_labels_never_reach_fit(tiny, task):
    """True, shuffled and sentinel labels on the unlabelled ImageFeatures: the fitted heads are identical."""
    (X, y), (U, yu), _ = task
    heads = []
    for labels in (yu, np.random.default_rng(1).permutation(yu), np.full(len(yu), 2)):
        head = create_head("grip", backbone=tiny, class_names=NAMES, **FAST)
        heads.append(head.fit(X, y, unlabelled=_features(U, labels)))
    for other in heads[1:]:
        np.testing.assert_array_equal(other.round_weights_, heads[0].round_weights_)
        np.testing.assert_array_equal(other.pseudo_rows_, heads[0].pseudo_rows_)
        np.testing.assert_array_equal(other.pseudo_labels_, heads[0].pseudo_labels_)
    assert len(heads[0].rounds_) == 2 and heads[0].rounds_[1]["pseudolabels"] == 3 * 10


def test_unsupervised_reads_no_label_of_x(tiny, task):
    (X, y), (U, _), _ = task
    fits = [create_head("grip", backbone=tiny, class_names=NAMES, setting="unsupervised", **FAST).fit(X, labels,
                                                                                                       unlabelled=U)
            for labels in (y, y[::-1].copy())]
    np.testing.assert_array_equal(fits[0].round_weights_, fits[1].round_weights_)
    assert fits[0].pool_size_ == len(U) + len(X) and all(r["labelled"] == 0 for r in fits[0].rounds_)


def test_zero_rounds_is_zero_shot(tiny, task):
    (X, y), (U, _), (Xt, _) = task
    zeroshot = create_head("zeroshot", backbone=tiny, class_names=NAMES, templates=["a photo of a {c}."]).fit()
    head = create_head("grip", backbone=tiny, class_names=NAMES, **{**FAST, "rounds": 0}).fit(X, y, unlabelled=U)
    np.testing.assert_allclose(head.logits(Xt), zeroshot.logits(Xt), rtol=1e-5, atol=1e-5)
    assert head.rounds_ == [] and head.round_weights_.shape == (1, tiny.embed_dim, len(NAMES))


def test_fits_an_easy_task_better_than_zero_shot(tiny, task):
    """Round by round the balanced pseudolabels pull the context to the features' directions."""
    (X, y), (U, _), (Xt, yt) = task
    zeroshot = create_head("zeroshot", backbone=tiny, class_names=NAMES, templates=["a photo of a {c}."]).fit()
    head = create_head("grip", backbone=tiny, class_names=NAMES, **{**FAST, "max_epoch": 3, "batch_size": 16}
                       ).fit(X, y, unlabelled=U)
    assert head.score(Xt, yt) >= zeroshot.score(Xt, yt) + 0.2
    assert log_loss(yt, head.predict_proba(Xt), labels=[0, 1, 2]) < 0.8 * log_loss(
        yt, zeroshot.predict_proba(Xt), labels=[0, 1, 2])


def test_transductive_pseudolabels_only_the_unseen_classes(tiny, task):
    (X, y), (U, _), _ = task
    seen = y < 2  # class 2 has no labelled row
    head = create_head("grip", backbone=tiny, class_names=NAMES, setting="transductive", **FAST)
    head.fit(X[seen], y[seen], unlabelled=U)
    assert head.target_classes_.tolist() == [2]
    assert set(head.pseudo_labels_.tolist()) == {2} and len(head.pseudo_rows_) == 30  # K = 30 / 1 in round 2
    with pytest.raises(CliplabError, match="every class has labelled rows"):
        create_head("grip", backbone=tiny, class_names=NAMES, setting="transductive", **FAST).fit(X, y, unlabelled=U)


def test_bad_input_is_one_line_before_training(tiny, task, monkeypatch):
    (X, y), (U, _), _ = task

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(grip_module, "run_training", no_training)
    cases = [
        ({}, dict(unlabelled=U[:0]), "unlabelled set is empty"),
        ({}, dict(unlabelled=_features(U[:0], np.zeros(0, np.int64))), "unlabelled set is empty"),
        ({"setting": "transductive"}, {}, "needs the unlabelled test features"),
        ({}, dict(unlabelled=U[:5]), "0 pseudolabels per class"),
        ({"setting": "fully"}, dict(unlabelled=U), "setting must be one of"),
        ({"rounds": 3}, dict(unlabelled=U), "rounds=3 is more than"),
        ({"selection": "best"}, dict(unlabelled=U), "selection must be one of"),
    ]
    for params, extra, message in cases:
        head = create_head("grip", backbone=tiny, class_names=NAMES, **{**FAST, **params})
        with pytest.raises(CliplabError, match=message) as info:
            head.fit(X, y, **extra)
        assert "\n" not in str(info.value)


def test_without_unlabelled_data_one_warning_and_the_labelled_rows(tiny, task):
    (X, y), _, _ = task
    with pytest.warns(UserWarning, match="no unlabelled data"):
        head = create_head("grip", backbone=tiny, class_names=NAMES, **FAST).fit(X, y)
    assert head.schedule_ == [0] and head.rounds_[0]["labelled"] == len(X) and head.pool_size_ == 0


def test_with_classes_scores_new_names_with_the_learned_context(tiny, task):
    (X, y), (U, _), (Xt, _) = task
    head = create_head("grip", backbone=tiny, class_names=NAMES, **FAST).fit(X, y, unlabelled=U)
    same = head.with_classes(NAMES)
    np.testing.assert_allclose(same.logits(Xt), head.logits(Xt), rtol=1e-5, atol=1e-4)
    new = head.with_classes(["car", "tree"])
    learner = new._learner(["car", "tree"], head.ctx_)
    with torch.no_grad():
        expected = learner.text_features().numpy().T
    np.testing.assert_allclose(new.weights_, expected, atol=1e-6)
    assert new.logits(Xt).shape == (len(Xt), 2)
    assert new.fit_summary() == head.fit_summary()  # what base-to-new records for the moved head


def test_a_fit_with_a_checkpoint_folder_refits_to_the_same_numbers(tiny, task, tmp_path, monkeypatch):
    (X, y), (U, _), _ = task
    folder = tmp_path / "checkpoints"
    first = create_head("grip", backbone=tiny, class_names=NAMES, checkpoint_dir=str(folder), **FAST)
    first.fit(X, y, unlabelled=U)
    assert sorted(p.name for p in folder.iterdir()) == ["round-01", "round-02"]
    steps = []
    original = grip_module.GripObjective.__call__
    monkeypatch.setattr(grip_module.GripObjective, "__call__",
                        lambda self, module, batch: steps.append(1) or original(self, module, batch))
    again = create_head("grip", backbone=tiny, class_names=NAMES, checkpoint_dir=str(folder), **FAST)
    again.fit(X, y, unlabelled=U)  # every round resumes from its finished checkpoint: no step runs
    assert steps == []
    np.testing.assert_array_equal(again.round_weights_, first.round_weights_)


class _Images:
    """A dataset of random 32 px images (only ``load_image`` is read); ``labels`` is there to be ignored."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.pixels = rng.integers(0, 255, size=(n, 32, 32, 3), dtype=np.uint8)
        self.labels = rng.integers(0, 3, size=n)

    def __len__(self):
        return len(self.pixels)

    def load_image(self, i):
        return Image.fromarray(self.pixels[i])


def test_visual_prompts_train_only_themselves_and_give_a_backbone(tiny):
    images, pool = _Images(6, 0), _Images(12, 1)
    with torch.no_grad():
        X = tiny.encode_images(torch.stack([tiny.preprocess(images.load_image(i)) for i in range(6)])).numpy()
        U = tiny.encode_images(torch.stack([tiny.preprocess(pool.load_image(i)) for i in range(12)])).numpy()
    y = np.repeat(np.arange(3), 2)
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    head = create_head("grip-visual", backbone=tiny, class_names=NAMES, **{**FAST, "n_vis_ctx": 2})
    head.fit(X, y, unlabelled=U, images=images, unlabelled_images=pool)
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert head.vis_ctx_.shape == (2, tiny.image_tower().width)
    assert len(head.backbone_.attached_prompts("image")) == 1
    zeroshot = create_head("zeroshot", backbone=tiny, class_names=NAMES, templates=["a photo of a {c}."]).fit()
    np.testing.assert_allclose(head.weights_, zeroshot.weights_, atol=1e-6)  # the text side stays zero-shot
    prompted = head.backbone_.encode_images(torch.stack([tiny.preprocess(pool.load_image(i)) for i in range(12)]))
    assert not np.allclose(prompted.numpy(), U, atol=1e-4)
    poisoned = dataclasses.replace(_features(U, np.zeros(12, np.int64)))
    again = create_head("grip-visual", backbone=tiny, class_names=NAMES, **{**FAST, "n_vis_ctx": 2})
    pool.labels = pool.labels[::-1].copy()
    again.fit(X, y, unlabelled=poisoned, images=images, unlabelled_images=pool)
    np.testing.assert_array_equal(again.vis_ctx_, head.vis_ctx_)


def test_visual_prompts_on_a_resnet_image_tower_are_refused_in_one_line(monkeypatch):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIP(embed_dim=32, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                     text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    info = BackboneInfo(name="tiny-resnet", pretrained=None, source="test", random_weights=True)
    backbone = OpenClipBackbone(model.eval(), transform_for(model), open_clip.SimpleTokenizer(context_length=16),
                                info, "test:tiny-resnet", "cpu")
    monkeypatch.setattr(grip_module, "run_training", lambda *a, **k: pytest.fail("training started"))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 32)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    for name in ("grip-visual", "grip-multimodal"):
        head = create_head(name, backbone=backbone, class_names=NAMES, **FAST)
        with pytest.raises(UnsupportedOperationError, match="ModifiedResNet") as info:
            head.fit(X[:6], np.repeat(np.arange(3), 2), unlabelled=X[6:])
        assert "\n" not in str(info.value)


def test_a_saved_textual_head_gives_identical_logits(tiny, task, tmp_path):
    (X, y), (U, _), (Xt, _) = task
    head = create_head("grip", backbone=tiny, class_names=NAMES, **FAST).fit(X, y, unlabelled=U)
    save_head(head, tmp_path / "grip")
    loaded = load_head(tmp_path / "grip", tiny)
    np.testing.assert_array_equal(loaded.logits(Xt), head.logits(Xt))
    assert loaded.rounds_ == head.rounds_


def test_max_unlabelled_is_a_seeded_subsample_of_the_pool(tiny, task):
    """Fitting with max_unlabelled equals fitting on those rows given alone; pseudo_rows_ index the whole pool."""
    (X, y), (U, _), _ = task
    head = create_head("grip", backbone=tiny, class_names=NAMES, max_unlabelled=20, **FAST).fit(X, y, unlabelled=U)
    keep = np.sort(np.random.default_rng(1).choice(len(U), 20, replace=False))  # random_state=1
    alone = create_head("grip", backbone=tiny, class_names=NAMES, **FAST).fit(X, y, unlabelled=U[keep])
    assert head.pool_size_ == 20
    np.testing.assert_array_equal(head.round_weights_, alone.round_weights_)
    np.testing.assert_array_equal(head.pseudo_rows_, keep[alone.pseudo_rows_])


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 3)):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
            path = tmp_path / "toy" / split / f"class{c}"
            path.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(path / f"{i}.png")
    return tmp_path / "toy"


def test_the_protocol_gives_the_rest_of_the_train_split_unlabelled(tiny, folder, tmp_path, monkeypatch):
    """cliplab's one provider: the few-shot draw labelled, the other train rows as ``unlabelled`` with labels -1
    (and their images for the visual heads), no test row anywhere."""
    from cliplab.data import load_dataset
    from cliplab.eval.inputs import build_head, fit_method, prepare_fit

    train = load_dataset(folder, split="train")
    seen = {}
    original = grip_module._Grip._fit

    def spy(self, X, y, X_val=None, y_val=None, unlabelled=None, images=None, unlabelled_images=None):
        seen.update(X=X, val=X_val, unlabelled=unlabelled, images=images, unlabelled_images=unlabelled_images)
        return original(self, X, y, X_val, y_val, unlabelled, images, unlabelled_images)

    monkeypatch.setattr(grip_module._Grip, "_fit", spy)
    for name in ("grip", "grip-visual"):
        head = build_head(name, tiny, train.class_names, params={**FAST, "templates": None, "step_quantile": 100})
        inputs = prepare_fit(head, tiny, train, shots=1, seed=0, cache_dir=tmp_path / "cache", workers=0,
                             progress=False)
        fit_method(head, inputs)
        unlabelled = seen["unlabelled"]
        drawn = set(inputs.train.item_ids) | set(inputs.val.item_ids)
        assert len(unlabelled.features) == len(train) - len(drawn) and not drawn & set(unlabelled.item_ids)
        assert (unlabelled.labels == -1).all()
        if name == "grip-visual":
            assert len(seen["unlabelled_images"]) == len(unlabelled.features) and len(seen["images"]) == 3
        else:
            assert seen["unlabelled_images"] is None and seen["images"] is None
        assert head.pool_size_ == len(unlabelled.features)


def test_a_saved_visual_head_rebuilds_the_prompted_backbone(tiny, tmp_path):
    images, pool = _Images(6, 0), _Images(12, 1)
    with torch.no_grad():
        X = tiny.encode_images(torch.stack([tiny.preprocess(images.load_image(i)) for i in range(6)])).numpy()
        U = tiny.encode_images(torch.stack([tiny.preprocess(pool.load_image(i)) for i in range(12)])).numpy()
    head = create_head("grip-visual", backbone=tiny, class_names=NAMES, **{**FAST, "n_vis_ctx": 2})
    head.fit(X, np.repeat(np.arange(3), 2), unlabelled=U, images=images, unlabelled_images=pool)
    save_head(head, tmp_path / "visual")
    loaded = load_head(tmp_path / "visual", tiny)
    assert loaded.backbone_.model_id == head.backbone_.model_id
    batch = torch.stack([tiny.preprocess(pool.load_image(i)) for i in range(4)])
    np.testing.assert_array_equal(loaded.backbone_.encode_images(batch).numpy(),
                                  head.backbone_.encode_images(batch).numpy())
    np.testing.assert_array_equal(loaded.logits(U), head.logits(U))
