"""Retrieval fine-tuning with maintained alignment (paper 5): losses, adapters merged into the towers, the stages."""

from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch

from cliplab.errors import CliplabError
from cliplab.eval.retrieval import retrieval_metrics
from cliplab.models.backbone import BackboneInfo
from cliplab.models.openclip import OpenClipBackbone, transform_for
from cliplab.train.retrieval_tune import (
    RetrievalTuneConfig,
    RetrievalTuned,
    adapt,
    apply_adapters,
    arcface_loss,
    group_infonce,
    image_retrieval_precision,
    load_tuned,
    realign_text_side,
    tune_image_side,
)

TEXTS = ["a photo of a cat.", "a dog on grass", "a red car", "a small boat at sea", "two birds"]


def _images(n=5, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet():
    """A small open_clip ModifiedResNet CLIP (random weights): its image projection is attnpool.c_proj (Linear)."""
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = open_clip.model.CLIP(**cfg).eval()
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mean": open_clip.OPENAI_DATASET_MEAN,
                                               "std": open_clip.OPENAI_DATASET_STD})
    info = BackboneInfo(name="rn-test", pretrained=None, source="local", random_weights=True)
    return OpenClipBackbone(model, transform_for(model), open_clip.SimpleTokenizer(context_length=16), info,
                            "rn-test-seed3", "cpu")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A small random transformers CLIPModel (Linear projections without bias), loaded through cliplab."""
    from transformers import CLIPConfig, CLIPModel

    from cliplab.models import load_model

    config = CLIPConfig(
        projection_dim=16,
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp("hf-clip") / "small-clip"
        CLIPModel(config).save_pretrained(str(path))
    return load_model(str(path), device="cpu")


# -- losses against written-out formulas ---------------------------------------------------------
def _arcface_by_hand(x, w, y, m, s):
    total = 0.0
    for xi, yi in zip(x, y):
        xi = xi / np.linalg.norm(xi)
        cos = [float(xi @ (wj / np.linalg.norm(wj))) for wj in w]
        theta = math.acos(cos[yi])
        target = math.cos(theta + m) if theta + m <= math.pi else cos[yi] - m * math.sin(m)
        logits = [s * (target if j == yi else c) for j, c in enumerate(cos)]
        total += -(logits[yi] - math.log(sum(math.exp(v) for v in logits)))
    return total / len(y)


def test_arcface_against_its_written_out_formula():
    w = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]])
    # each row's angle from its own class centre: 30 deg (class 0), 100 deg (class 1), and 175 deg (class 0,
    # past pi - m: the fallback branch); rows of different lengths (the loss normalises them)
    angles = [0.5236, math.pi / 2 + 1.745, 3.05]
    x = np.array([[math.cos(a), math.sin(a)] for a in angles]) * np.array([[2.0], [0.5], [1.0]])
    y = [0, 1, 0]
    got = arcface_loss(torch.tensor(x, dtype=torch.float64), torch.tensor(w, dtype=torch.float64), torch.tensor(y),
                       margin=0.3, scale=8.0)
    assert got.item() == pytest.approx(_arcface_by_hand(x, w, y, 0.3, 8.0), rel=1e-9)
    # the fallback case is really exercised: class 0's centre is 175 deg from x[2]
    assert math.acos(x[2] @ w[0] / np.linalg.norm(x[2])) + 0.3 > math.pi


def test_arcface_with_zero_margin_is_scaled_cosine_softmax():
    g = torch.Generator().manual_seed(0)
    x, w, y = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = torch.nn.functional.cross_entropy(
        16.0 * torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(w, dim=-1).T, y)
    assert arcface_loss(x, w, y, margin=0.0, scale=16.0).item() == pytest.approx(plain.item(), rel=1e-6)
    assert arcface_loss(x, w, y, margin=0.3, scale=16.0).item() > plain.item()  # the margin makes it harder


def test_group_infonce_with_distinct_groups_is_clips_loss():
    g = torch.Generator().manual_seed(1)
    v = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    clip = open_clip.loss.ClipLoss()(v, t, torch.tensor(1 / 0.07))
    assert group_infonce(v, t, torch.arange(5), 0.07).item() == pytest.approx(clip.item(), rel=1e-6)


def test_group_infonce_against_a_hand_computed_case():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    t = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    groups, temp = torch.tensor([0, 0, 1]), 0.5
    s = (v @ t.T).numpy() / temp
    same = [[0, 1], [0, 1], [2]]
    i2t = [-math.log(sum(math.exp(s[r, c]) for c in same[r]) / sum(math.exp(s[r, c]) for c in range(3)))
           for r in range(3)]
    t2i = [-math.log(sum(math.exp(s[r, c]) for r in same[c]) / sum(math.exp(s[r, c]) for r in range(3)))
           for c in range(3)]
    expected = (sum(i2t) / 3 + sum(t2i) / 3) / 2
    assert group_infonce(v, t, groups, temp).item() == pytest.approx(expected, rel=1e-12)


# -- adapters merged into the towers ---------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny", "resnet"])
def test_zero_adapters_leave_embeddings_and_metrics_bit_identical(model, request):
    backbone = request.getfixturevalue(model)
    d = backbone.embed_dim
    tuned = apply_adapters(backbone, np.zeros((d, d), np.float32), np.zeros((d, d), np.float32))
    images = _images()
    before_i, after_i = backbone.encode_images(images), tuned.encode_images(images)
    before_t, after_t = backbone.encode_texts(TEXTS), tuned.encode_texts(TEXTS)
    assert torch.equal(before_i, after_i) and torch.equal(before_t, after_t)
    assert retrieval_metrics(after_i, after_t, range(5)) == retrieval_metrics(before_i, before_t, range(5))
    assert tuned.model_id != backbone.model_id and tuned.model_id.startswith(backbone.model_id + "+rtune:")


@pytest.mark.parametrize("model", ["tiny", "resnet", "hf"])
def test_merged_adapters_give_the_feature_level_adapter(model, request):
    backbone = request.getfixturevalue(model)
    d = backbone.embed_dim
    rng = np.random.default_rng(0)
    a_img, a_txt = (0.3 * rng.standard_normal((d, d))).astype(np.float32), \
        (0.3 * rng.standard_normal((d, d))).astype(np.float32)
    images = _images()
    parent_before = backbone.encode_images(images)
    tuned = apply_adapters(backbone, a_img, a_txt)
    np.testing.assert_allclose(tuned.encode_images(images).numpy(),
                               adapt(backbone.encode_images(images).numpy(), a_img), atol=2e-5)
    np.testing.assert_allclose(tuned.encode_texts(TEXTS).numpy(),
                               adapt(backbone.encode_texts(TEXTS).numpy(), a_txt), atol=2e-5)
    assert not np.allclose(tuned.encode_images(images).numpy(), backbone.encode_images(images).numpy(), atol=1e-3)
    assert torch.equal(backbone.encode_images(images), parent_before)  # the parent is untouched


def test_text_adapter_leaves_image_embeddings_bit_identical(tiny):
    d = tiny.embed_dim
    rng = np.random.default_rng(1)
    a_img, a_txt = (0.2 * rng.standard_normal((d, d))).astype(np.float32), \
        (0.2 * rng.standard_normal((d, d))).astype(np.float32)
    stage1, both = apply_adapters(tiny, a_img, None), apply_adapters(tiny, a_img, a_txt)
    images = _images(6, seed=4)
    assert torch.equal(stage1.encode_images(images), both.encode_images(images))
    assert not torch.allclose(stage1.encode_texts(TEXTS), both.encode_texts(TEXTS), atol=1e-3)


# -- the stages on features --------------------------------------------------------------------------
def _clusters(n_per_class, seed, classes=4, d=16):
    """Unit features whose class sits in two small dimensions under large nuisance noise in the others."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((classes, 2)) * 0.6
    y = np.repeat(np.arange(classes), n_per_class)
    x = rng.standard_normal((len(y), d))
    x[:, :2] = centres[y] + 0.08 * rng.standard_normal((len(y), 2))
    return adapt(x.astype(np.float32), None), y


def test_stage1_raises_held_out_image_retrieval_precision():
    x, y = _clusters(40, seed=0)
    vx, vy = _clusters(25, seed=1)
    config = RetrievalTuneConfig(stage1_epochs=20, stage2_epochs=0, lr=0.1, batch_size=160, scale=16.0)
    adapter, result = tune_image_side(x, y, config, val=(vx, vy))
    before, after = image_retrieval_precision(vx, vy), image_retrieval_precision(adapt(vx, adapter), vy)
    assert after > before + 0.2, (before, after)
    assert result.history[-1]["val_p@1"] == pytest.approx(after)


def test_stage2_realigns_texts_to_a_moved_image_space_and_keeps_the_images():
    rng = np.random.default_rng(2)
    d, classes = 16, 5
    texts = adapt(rng.standard_normal((classes, d)).astype(np.float32), None)  # one text per class
    rotation = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    y = np.repeat(np.arange(classes), 20)
    images = adapt(texts[y] @ rotation + 0.05 * rng.standard_normal((len(y), d)).astype(np.float32), None)
    frozen = images.copy()
    config = RetrievalTuneConfig(stage1_epochs=0, stage2_epochs=10, lr=0.1, batch_size=100)
    pairs = np.stack([np.arange(len(y)), y, y], axis=1)

    def zero_shot(adapter):
        return float(np.mean((images @ adapt(texts, adapter).T).argmax(1) == y))

    before = zero_shot(None)
    adapter, _ = realign_text_side(images, texts, lambda epoch: pairs, 0.05, config)
    assert zero_shot(adapter) == 1.0 and before < 0.6, before
    assert np.array_equal(images, frozen)


def test_a_rerun_with_the_checkpoint_folder_resumes_to_the_same_adapter(tmp_path):
    x, y = _clusters(10, seed=3)
    config = RetrievalTuneConfig(stage1_epochs=3, stage2_epochs=0, batch_size=16)
    first, run1 = tune_image_side(x, y, config, checkpoint_dir=tmp_path)
    again, run2 = tune_image_side(x, y, config, checkpoint_dir=tmp_path)
    assert np.array_equal(first, again) and run2.resumed_from == run1.steps
    other = RetrievalTuneConfig(stage1_epochs=3, stage2_epochs=0, batch_size=16, margin=0.1)
    with pytest.raises(CliplabError, match="cannot resume with different options"):
        tune_image_side(x, y, other, checkpoint_dir=tmp_path)


# -- saving, loading, bad input -----------------------------------------------------------------------
def test_save_and_load_round_trip_gives_the_same_tuned_model(tiny, tmp_path):
    d = tiny.embed_dim
    rng = np.random.default_rng(5)
    tuned = RetrievalTuned(rng.standard_normal((d, d)).astype(np.float32) * 0.1, None, tiny.model_id,
                           {"lr": 0.01}, {"note": "x"})
    loaded = load_tuned(tuned.save(tmp_path / "rt"))
    assert np.array_equal(loaded.image_adapter, tuned.image_adapter) and loaded.text_adapter is None
    assert loaded.config == {"lr": 0.01} and loaded.info["note"] == "x"
    images = _images(3)
    assert torch.equal(loaded.apply(tiny).encode_images(images), tuned.apply(tiny).encode_images(images))


def test_bad_input_is_one_line(tiny, resnet, tmp_path):
    x, _ = _clusters(5, seed=0)
    config = RetrievalTuneConfig(stage1_epochs=1, stage2_epochs=0)
    cases = [
        (lambda: tune_image_side(x, np.zeros(len(x), int), config), "one class"),
        (lambda: tune_image_side(x, np.full(len(x), -1), config), "needs a class label"),
        (lambda: tune_image_side(x, np.zeros(3, int), config), "labels for image features"),
        (lambda: RetrievalTuneConfig(stage1_epochs=0, stage2_epochs=0), "at least one stage"),
        (lambda: RetrievalTuneConfig(margin=2.0), "margin"),
        (lambda: apply_adapters(tiny, np.zeros((8, 8), np.float32), None), "does not fit"),
        (lambda: load_tuned(tmp_path), "not a retrieval-tune folder"),
        (lambda: RetrievalTuned(None, None, tiny.model_id, {}).apply(resnet), "trained on tiny-seed0"),
    ]
    for call, text in cases:
        with pytest.raises(CliplabError, match=text) as info:
            call()
        assert "\n" not in str(info.value)


def _class_folder(root, per_class=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "truck")):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) // (2 if c else 1)
            Image.fromarray(pixels).save(root / name / f"{k}.png")
    return root


def test_the_pipeline_on_a_class_folder_keeps_stage_one_images_through_stage_two(tiny, tmp_path):
    from cliplab.data import load_dataset
    from cliplab.train.retrieval_tune import retrieval_tune

    data = load_dataset(str(_class_folder(tmp_path / "imgs")))
    only1 = retrieval_tune(tiny, data, RetrievalTuneConfig(stage1_epochs=2, stage2_epochs=0, batch_size=4, lr=0.05),
                           cache_dir=tmp_path / "cache", workers=0)
    both = retrieval_tune(tiny, data, RetrievalTuneConfig(stage1_epochs=2, stage2_epochs=2, batch_size=4, lr=0.05,
                                                          templates=("a photo of a {}.", "a {} in the wild.")),
                          cache_dir=tmp_path / "cache", workers=0, checkpoint_dir=tmp_path / "state")
    assert np.array_equal(only1.image_adapter, both.image_adapter) and np.abs(both.image_adapter).max() > 0
    assert only1.text_adapter is None and np.abs(both.text_adapter).max() > 0
    assert both.info["stage2"]["texts"] == 4 and both.info["labelled"]["images"] == 8
    images = _images(4, seed=7)
    assert torch.equal(only1.apply(tiny).encode_images(images), both.apply(tiny).encode_images(images))
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["stage1", "stage2"]


def test_image_retrieval_precision_against_a_hand_computed_case():
    # four points on a line (unit vectors in 2-d at angles 0, 0.1, 0.5, 1.5): nearest others are 1, 0, 1, 2
    angles = np.array([0.0, 0.1, 0.5, 1.5])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    y = np.array([0, 0, 1, 1])
    assert image_retrieval_precision(x, y, 1) == pytest.approx((1 + 1 + 0 + 1) / 4)
    # k = 2: neighbours {1, 2}, {0, 2}, {1, 0}, {2, 1} -> hits 1/2, 1/2, 0, 1/2
    assert image_retrieval_precision(x, y, 2) == pytest.approx((0.5 + 0.5 + 0 + 0.5) / 4)
