"""MaPLe (paper 31): CoOp at depth 0, deep prompts placed as the authors' blocks do, frozen towers, errors."""

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from cliplab.data.base import ArrayImageDataset
from cliplab.errors import CliplabError, TextTooLongError, UnsupportedOperationError
from cliplab.heads import create_head, head_entry
from cliplab.heads.maple import MaPLe, MaPLeObjective
from cliplab.heads.saving import load_head, save_head
from cliplab.models import BackboneInfo, load_model
from cliplab.models.openclip import OpenClipBackbone, transform_for
from cliplab.train.config import BUILTIN_CONFIGS

NAMES = ["red", "blue"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


def _images(n_per_class: int, seed: int) -> ArrayImageDataset:
    """32-px images, class 0 reddish and class 1 bluish, with pixel noise (an easy task a random model misses)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(2), n_per_class)
    base = np.where(y[:, None] == 0, [[200, 40, 40]], [[40, 40, 200]]).astype(np.float64)
    pixels = base[:, None, None, :] + rng.normal(0, 40, size=(len(y), 32, 32, 3))
    images = np.clip(pixels, 0, 255).astype(np.uint8)
    return ArrayImageDataset(images, y, NAMES, Path(f"synthetic{seed}.npy"), "synthetic")


def _pixels(backbone, data) -> torch.Tensor:
    return torch.stack([backbone.preprocess(data.load_image(i)) for i in range(len(data))])


def _features(backbone, data) -> np.ndarray:
    return backbone.encode_images(_pixels(backbone, data)).numpy()


def _accuracy(head, data) -> float:
    X = _features(head.backbone_, data)
    return float((head.predict(X) == data.labels).mean())


def test_registered_as_an_encoder_head_on_images_giving_a_backbone():
    entry = head_entry("maple")
    assert entry.family == "encoder" and entry.paper == 31
    assert entry.needs == {"images"} and entry.gives == {"backbone", "class_weights"}
    defaults = MaPLe(None, NAMES).get_params()
    assert (defaults["n_ctx"], defaults["ctx_init"], defaults["lr"], defaults["batch_size"]) == (2, "a photo of a",
                                                                                                 0.0035, 4)


def test_depth_zero_is_coop_with_the_same_context(tiny):
    """J = 0 (no couplings, no vision prompts) trains CoOp's prompt: the same logits after the same SGD steps."""
    train, test = _images(4, 0), _images(3, 1)
    X, y = _features(tiny, train), train.labels
    common = dict(max_epoch=2, lr=0.05, batch_size=4, warmup_epochs=0, random_state=3)
    coop = create_head("coop", backbone=tiny, class_names=NAMES, ctx_init="a photo of a", **common).fit(X, y)
    maple = create_head("maple", backbone=tiny, class_names=NAMES, n_ctx=4, prompt_depth=0, augment=False,
                        **common).fit(X, y, images=train)
    init = create_head("maple", backbone=tiny, class_names=NAMES, n_ctx=4, prompt_depth=0, max_epoch=0).fit(
        X, y, images=train)
    assert np.abs(maple.ctx_ - init.ctx_).max() > 1e-3  # it trained
    np.testing.assert_allclose(maple.ctx_, coop.ctx_, atol=1e-5)
    X_test = _features(tiny, test)
    np.testing.assert_allclose(maple.logits(_features(maple.backbone_, test)), coop.logits(X_test), atol=1e-5)


def test_before_training_the_text_is_the_zero_shot_prompt_with_fixed_words(tiny):
    """The authors' n_ctx=2 of "a photo of a": "a photo" is the context and "of a" stays fixed (J = 1: deeper
    text prompts start random)."""
    train = _images(2, 0)
    head = MaPLe(tiny, NAMES, prompt_depth=1, max_epoch=0).fit(_features(tiny, train), train.labels, images=train)
    expected = tiny.encode_texts([f"a photo of a {c}." for c in NAMES]).numpy().T
    np.testing.assert_allclose(head.weights_, expected, atol=1e-5)
    np.testing.assert_allclose(head.ctx_, tiny.token_embeddings(tiny.tokenize(["a photo"]))[0, 1:3].numpy())


def _hand_image(backbone, images, prompts):
    """The authors' VisionTransformer_MaPLe on open_clip's modules: prompts appended after the patches, the last p
    tokens replaced before blocks 1..J-1, the class token pooled."""
    visual = backbone.model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
    p = prompts[0].shape[0]
    x = visual.ln_pre(torch.cat([x, prompts[0].expand(len(x), -1, -1)], dim=1))
    for j, block in enumerate(visual.transformer.resblocks):
        if 0 < j < len(prompts):
            x = torch.cat([x[:, :-p], prompts[j].expand(len(x), -1, -1)], dim=1)
        x = block(x) if visual.transformer.batch_first else block(x.transpose(0, 1)).transpose(0, 1)
    return F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1)


def _hand_text(backbone, texts, prompts):
    """The authors' TextEncoder: positions 1..p of the tokenized prompts are the context at the input and replaced
    by the deep prompts before blocks 1..J-1; the end-of-text token pooled."""
    model = backbone.model
    ids = backbone.tokenize(texts)
    p = prompts[0].shape[0]
    x = model.token_embedding(ids)
    x = torch.cat([x[:, :1], prompts[0].expand(len(x), -1, -1), x[:, 1 + p:]], dim=1) + model.positional_embedding
    for j, block in enumerate(model.transformer.resblocks):
        if 0 < j < len(prompts):
            x = torch.cat([x[:, :1], prompts[j].expand(len(x), -1, -1), x[:, 1 + p:]], dim=1)
        if model.transformer.batch_first:
            x = block(x, attn_mask=model.attn_mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=model.attn_mask).transpose(0, 1)
    x = model.ln_final(x)[torch.arange(len(x)), ids.argmax(dim=-1)] @ model.text_projection
    return F.normalize(x, dim=-1)


@pytest.mark.parametrize("truncate", [True, False])
def test_deep_prompts_replace_the_tokens_as_the_authors_blocks_do(tiny, truncate):
    learner = MaPLe(tiny, NAMES, prompt_depth=2, random_state=5, truncate=truncate).build_learner()
    with torch.no_grad():
        for param in learner.parameters():
            param.add_(0.3 * torch.randn_like(param))  # away from the init: every tensor matters
        images = _pixels(tiny, _images(2, 0))
        text, image = learner.text_prompts(), learner.image_prompts()
        assert len(text) == len(image) == 2 and image[1].shape == (2, tiny.image_tower().width)
        np.testing.assert_allclose(image[1], learner.couplings[1](learner.deep[0]))
        got_text = learner.text_features()
        got_image = learner.image_features(images)
        np.testing.assert_allclose(got_text, _hand_text(tiny, [f"a photo of a {c}." for c in NAMES], text),
                                   atol=1e-5)
        np.testing.assert_allclose(got_image, _hand_image(tiny, images, image), atol=1e-5)
        shallow_image = _hand_image(tiny, images, image[:1])  # the deep prompt left out: another answer
        shallow_text = _hand_text(tiny, [f"a photo of a {c}." for c in NAMES], text[:1])
    assert (got_image - shallow_image).abs().max() > 1e-3 and (got_text - shallow_text).abs().max() > 1e-3
    assert learner.length == (8 if truncate else None)  # SOS a photo of a red . EOS


def test_one_epoch_changes_only_the_prompts(tiny):
    train = _images(4, 0)
    X = _features(tiny, train)
    trainable = tiny.derive("maple-test", trainable=True)  # even a backbone that allows grads is not trained
    before = {k: v.clone() for k, v in trainable.model.state_dict().items()}
    init = MaPLe(trainable, NAMES, prompt_depth=2, max_epoch=0).fit(X, train.labels, images=train)
    head = MaPLe(trainable, NAMES, prompt_depth=2, max_epoch=1, warmup_epochs=0, lr=0.05).fit(
        X, train.labels, images=train)
    after = trainable.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and p.requires_grad for p in trainable.model.parameters())
    for key in ("ctx_", "deep_text_", "coupling_weight_", "coupling_bias_"):
        assert np.abs(getattr(head, key) - getattr(init, key)).min() > 0, key  # every learnable entry moved
    assert head.backbone_.model_id != init.backbone_.model_id != trainable.model_id


def test_fits_an_easy_task_better_than_zero_shot(tiny):
    """The authors' settings (5 epochs, SGD 0.0035, batch 4, J = 9 capped at tiny's 2 blocks) on held-out images."""
    train, test = _images(8, 0), _images(10, 1)
    X = _features(tiny, train)
    zero = MaPLe(tiny, NAMES, max_epoch=0).fit(X, train.labels, images=train)
    head = MaPLe(tiny, NAMES, random_state=2).fit(X, train.labels, images=train)
    assert head.epochs_ == 5 and head.prompt_depth_ == 2
    assert head.training_loss_[-1] < head.training_loss_[0]
    assert _accuracy(head, test) >= 0.9 > _accuracy(zero, test) + 0.2


def test_with_classes_scores_new_names_with_the_learned_prompts(tiny):
    train = _images(4, 0)
    head = MaPLe(tiny, NAMES, prompt_depth=2, max_epoch=1, lr=0.05).fit(_features(tiny, train), train.labels,
                                                                         images=train)
    swapped = head.with_classes(NAMES[::-1])
    np.testing.assert_allclose(swapped.weights_, head.weights_[:, ::-1], atol=1e-6)
    new = head.with_classes(["green", "traffic light"])
    attached = head.backbone_.encode_texts(["of a green.", "of a traffic light."]).numpy().T  # prompts attached
    np.testing.assert_allclose(new.weights_, attached, atol=1e-5)
    assert new.class_names == ["green", "traffic light"] and head.class_names == NAMES
    rebuilt = head.rebuild_backbone(tiny)
    assert rebuilt.model_id == head.backbone_.model_id


def test_a_saved_head_rebuilds_the_same_prompted_backbone(tiny, tmp_path):
    train, test = _images(4, 0), _images(3, 1)
    head = MaPLe(tiny, NAMES, max_epoch=1, lr=0.05).fit(_features(tiny, train), train.labels, images=train)
    save_head(head, tmp_path / "maple")
    loaded = load_head(tmp_path / "maple", tiny, method="maple")
    assert loaded.backbone_.model_id == head.backbone_.model_id != tiny.model_id
    X, X_loaded = _features(head.backbone_, test), _features(loaded.backbone_, test)
    np.testing.assert_array_equal(X_loaded, X)
    np.testing.assert_array_equal(loaded.logits(X_loaded), head.logits(X))
    np.testing.assert_allclose(loaded.with_classes(["green"]).weights_, head.with_classes(["green"]).weights_,
                               atol=0)


def test_a_killed_fit_resumes_to_the_same_prompts(tiny, tmp_path, monkeypatch):
    train = _images(4, 0)
    X = _features(tiny, train)
    params = dict(prompt_depth=2, max_epoch=3, lr=0.05, checkpoint_dir=str(tmp_path / "state"))
    whole = MaPLe(tiny, NAMES, **{**params, "checkpoint_dir": None}).fit(X, train.labels, images=train)
    calls = []
    original = MaPLeObjective.__call__

    def dying(self, module, batch):
        calls.append(1)
        if len(calls) == 5:  # in epoch 2 (2 steps an epoch), after the checkpoint of epoch 1
            raise KeyboardInterrupt
        return original(self, module, batch)

    monkeypatch.setattr(MaPLeObjective, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        MaPLe(tiny, NAMES, **params).fit(X, train.labels, images=train)
    monkeypatch.setattr(MaPLeObjective, "__call__", original)
    resumed = MaPLe(tiny, NAMES, **params).fit(X, train.labels, images=train)
    for key in ("ctx_", "deep_text_", "coupling_weight_", "weights_"):
        np.testing.assert_array_equal(getattr(resumed, key), getattr(whole, key))


def _resnet() -> OpenClipBackbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.model.CLIP(**BUILTIN_CONFIGS["cliplab-rn-32px"]).eval()
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    info = BackboneInfo(name="cliplab-rn-32px", pretrained=None, source="test", random_weights=True)
    return OpenClipBackbone(model, transform_for(model), open_clip.SimpleTokenizer(context_length=32), info,
                            "test:rn", "cpu")


class _Unreadable(ArrayImageDataset):
    def load_image(self, index):
        raise AssertionError("an image was read before the refusal")


def test_a_resnet_image_tower_and_too_deep_prompts_are_refused_before_training(tiny):
    rn = _resnet()
    train = _images(2, 0)
    unread = _Unreadable(train.images, train.labels, NAMES, Path("x.npy"), "synthetic")
    with pytest.raises(UnsupportedOperationError) as error:
        MaPLe(rn, NAMES).fit(_features(rn, train), train.labels, images=unread)
    message = str(error.value)
    assert "\n" not in message and "MaPLe" in message and "ModifiedResNet" in message
    with pytest.raises(CliplabError) as error:
        MaPLe(tiny, NAMES, prompt_depth=3).fit(_features(tiny, train), train.labels, images=unread)
    message = str(error.value)
    assert "\n" not in message and "prompt_depth=3" in message and "2 blocks" in message
    with pytest.raises(CliplabError, match="images"):
        MaPLe(tiny, NAMES, max_epoch=0).fit(_features(tiny, train), train.labels)
    with pytest.raises(CliplabError, match="n_ctx=5"):
        MaPLe(tiny, NAMES, n_ctx=5).fit(_features(tiny, train), train.labels, images=unread)
    with pytest.raises(TextTooLongError) as error:  # a class whose prompt does not fit the text tower's context
        MaPLe(tiny, ["red", "very " * 80 + "blue"]).fit(_features(tiny, train), train.labels, images=unread)
    assert "\n" not in str(error.value) and "77" in str(error.value)
    assert MaPLe(tiny, NAMES).build_learner().couplings.__len__() == 2  # default 9, capped at tiny's 2 blocks
