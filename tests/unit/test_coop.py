"""CoOp (paper 50): zero-shot at its init, one hand-written SGD step, frozen towers, seeds, saving, the protocol."""

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CustomTextCLIP
from PIL import Image
from sklearn.metrics import log_loss

from cliplab.errors import CliplabError, DimensionMismatchError, LabelError
from cliplab.heads import create_head, head_entry
from cliplab.heads.coop import CoOp, authors_epochs
from cliplab.heads.saving import load_head, save_head
from cliplab.models import BackboneInfo
from cliplab.models.openclip import OpenClipBackbone, transform_for
from cliplab.train.engine import list_objectives

NAMES = ["cat", "dog", "traffic light"]


def _features(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _separable(tiny, n_per_class: int = 4, seed: int = 0):
    """Features near one random direction per class (not the text directions: the context must learn)."""
    rng = np.random.default_rng(seed)
    centres = _features(len(NAMES), tiny.embed_dim, seed + 1)
    y = np.repeat(np.arange(len(NAMES)), n_per_class)
    X = centres[y] + 0.1 * rng.normal(size=(len(y), tiny.embed_dim)).astype(np.float32)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), y


def test_registered_as_an_encoder_head_with_declared_needs():
    entry = head_entry("coop")
    assert entry.cls is CoOp and entry.family == "encoder" and entry.paper == 50
    assert entry.needs == {"val", "views"} and "class_weights" in entry.gives and not entry.takes_templates
    assert "coop" in list_objectives()
    assert [authors_epochs(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]


def test_before_training_the_context_is_the_zero_shot_prompt(tiny, tmp_path):
    """Context frozen at the embedding of "a photo of a": the class weights are zero-shot's for "a photo of a {c}."."""
    head = create_head("coop", backbone=tiny, class_names=NAMES, max_epoch=0).fit(_features(6, 64), [0, 1, 2] * 2)
    zeroshot = create_head("zeroshot", backbone=tiny, class_names=NAMES, templates=["a photo of a {c}."],
                           cache_dir=tmp_path).fit()
    np.testing.assert_allclose(head.weights_, zeroshot.weights_, atol=1e-6)
    X = _features(5, 64, seed=3)
    np.testing.assert_allclose(head.logits(X), zeroshot.logits(X), rtol=1e-5, atol=1e-5)
    ids = tiny.tokenize(["a photo of a"])[0]
    np.testing.assert_array_equal(head.ctx_, tiny.token_embeddings(ids[1:5][None])[0].numpy())
    # the prompt the learner runs is "X X X X {c}." with the context in the X slots (the code's layout)
    learner = head.build_learner()
    np.testing.assert_array_equal(learner.tokens.numpy(), tiny.tokenize([f"X X X X {c}." for c in NAMES]).numpy())
    assert head.ctx_.shape == (4, 64) and head.epochs_ == 0 and head.training_loss_ == []


def test_the_text_tower_runs_to_the_last_end_of_text_only_with_the_same_features(tiny):
    """CLIP's text mask is causal: the pooled outputs ignore the padding, so the learner runs only the positions
    up to the longest prompt's end-of-text token; features and context gradients equal the full forward's."""
    short = CoOp(tiny, NAMES).build_learner()
    full = CoOp(tiny, NAMES, truncate=False).build_learner()
    longest = int(tiny.tokenize([f"X X X X {c}." for c in NAMES]).argmax(dim=-1).max())
    assert short.length == longest + 1 < tiny.context_length and full.length is None
    a, b = short(), full()
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), atol=1e-6)
    weights = torch.randn(a.shape, generator=torch.Generator().manual_seed(0))
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    np.testing.assert_allclose(short.ctx.grad.numpy(), full.ctx.grad.numpy(), atol=1e-6, rtol=1e-4)
    X, y = _separable(tiny, 2)
    fitted = create_head("coop", backbone=tiny, class_names=NAMES, max_epoch=2, lr=0.5).fit(X, y)
    reference = create_head("coop", backbone=tiny, class_names=NAMES, max_epoch=2, lr=0.5, truncate=False).fit(X, y)
    assert fitted.text_positions_ == longest + 1 and reference.text_positions_ == tiny.context_length
    np.testing.assert_allclose(fitted.weights_, reference.weights_, atol=1e-5)


def test_a_bidirectional_text_tower_runs_whole_and_still_starts_at_zero_shot(tmp_path):
    """Padding that attends everywhere (no causal mask) changes the pooled output: no truncation there."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CustomTextCLIP(embed_dim=32, vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                         "head_width": 32},
                               text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                         "layers": 2, "pool_type": "last", "no_causal_mask": True, "pad_id": 0})
    model.text.use_pad_mask = True
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    info = BackboneInfo(name="bidirectional", pretrained=None, source="test", random_weights=True)
    backbone = OpenClipBackbone(model.eval(), transform_for(model), open_clip.SimpleTokenizer(context_length=16),
                                info, "test:bidirectional", "cpu")
    assert CoOp(backbone, NAMES).build_learner().length is None
    head = create_head("coop", backbone=backbone, class_names=NAMES, max_epoch=0).fit(_features(3, 32), [0, 1, 2])
    zeroshot = create_head("zeroshot", backbone=backbone, class_names=NAMES, templates=["a photo of a {c}."],
                           cache_dir=tmp_path).fit()
    np.testing.assert_allclose(head.weights_, zeroshot.weights_, atol=1e-6)
    assert head.text_positions_ == 16


def test_random_context_and_longer_context_with_init(tiny):
    X, y = _features(6, 64), np.array([0, 1, 2] * 2)
    random_ctx = create_head("coop", backbone=tiny, class_names=NAMES, ctx_init=None, max_epoch=0).fit(X, y)
    assert random_ctx.ctx_.shape == (16, 64)  # the authors' N_CTX without an init
    assert 0.015 < random_ctx.ctx_.std() < 0.025  # N(0, 0.02^2)
    longer = create_head("coop", backbone=tiny, class_names=NAMES, n_ctx=6, max_epoch=0).fit(X, y)
    ids = tiny.tokenize(["a photo of a"])[0]
    np.testing.assert_array_equal(longer.ctx_[2:], tiny.token_embeddings(ids[1:5][None])[0].numpy())
    with pytest.raises(CliplabError, match="shorter than ctx_init"):
        create_head("coop", backbone=tiny, class_names=NAMES, n_ctx=3, max_epoch=0).fit(X, y)


@pytest.mark.parametrize("warmup_epochs", [0, 1])
def test_one_sgd_step_is_the_hand_written_step(tiny, warmup_epochs):
    """One epoch of one batch: ctx1 = ctx0 - lr_0 (grad + wd ctx0) (SGD's first momentum step), with lr_0 the
    constant warm-up rate in a warm-up epoch, else the cosine's start, the base rate."""
    X, y = _separable(tiny, 2)
    lr, wd, scale = 0.5, 5e-4, 20.0
    head = create_head("coop", backbone=tiny, class_names=NAMES, max_epoch=1, lr=lr, weight_decay=wd,
                       warmup_epochs=warmup_epochs, warmup_lr=1e-2, logit_scale=scale).fit(X, y)
    # the same loss written out: "a photo of a {c}." with its 4 context token embeddings made a parameter
    tokens = tiny.tokenize([f"a photo of a {c}." for c in NAMES])
    with torch.no_grad():
        embedded = tiny.token_embeddings(tokens)
    ctx = embedded[0, 1:5].clone().requires_grad_(True)
    prompts = torch.cat([embedded[:, :1], ctx.expand(len(NAMES), -1, -1), embedded[:, 5:]], dim=1)
    text = F.normalize(tiny.forward_text_embeddings(prompts, tokens, normalize=False), dim=-1)
    loss = F.cross_entropy(scale * torch.from_numpy(X) @ text.T, torch.from_numpy(y))
    loss.backward()
    rate = 1e-2 if warmup_epochs else lr
    expected = (ctx - rate * (ctx.grad + wd * ctx)).detach().numpy()
    step = expected - ctx.detach().numpy()
    assert np.abs(step).max() > 1e-4  # a step large enough to see
    np.testing.assert_allclose(head.ctx_ - ctx.detach().numpy(), step, atol=1e-4 * np.abs(step).max())
    assert head.training_loss_ == [pytest.approx(float(loss.detach()), rel=1e-5)]


def test_training_lowers_the_loss(tiny):
    """Features at the class text directions of another context: the loss falls well below the init's."""
    target = CoOp(tiny, NAMES, ctx_init=None, n_ctx=4, random_state=7).build_learner()
    with torch.no_grad():
        target.ctx.mul_(50)
        text = target().numpy()
    y = np.repeat(np.arange(len(NAMES)), 4)
    X = text[y] + 0.05 * np.random.default_rng(0).normal(size=(len(y), tiny.embed_dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    zero = create_head("coop", backbone=tiny, class_names=NAMES, max_epoch=0).fit(X, y)
    head = create_head("coop", backbone=tiny, class_names=NAMES, max_epoch=6, lr=0.5, batch_size=4,
                       warmup_epochs=0).fit(X, y)
    losses = head.training_loss_
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert log_loss(y, head.predict_proba(X)) < 0.8 * log_loss(y, zero.predict_proba(X))
    assert head.score(X, y) >= zero.score(X, y)


def test_only_the_context_trains_and_the_backbone_gets_no_gradient(tiny):
    X, y = _separable(tiny, 2)
    trainable = tiny.derive("coop-test", trainable=True)  # even a backbone that allows grads is not trained
    before = {k: v.clone() for k, v in trainable.model.state_dict().items()}
    digest = trainable.weights_digest()
    head = create_head("coop", backbone=trainable, class_names=NAMES, max_epoch=3, lr=0.5).fit(X, y)
    after = trainable.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and trainable.weights_digest() == digest
    assert all(p.grad is None for p in trainable.model.parameters())
    assert all(p.requires_grad for p in trainable.model.parameters())  # its flags are given back
    assert not any(p.requires_grad for p in tiny.model.parameters())
    init = create_head("coop", backbone=trainable, class_names=NAMES, max_epoch=0).fit(X, y)
    assert np.abs(head.ctx_ - init.ctx_).max() > 1e-4  # the context did move


def test_seeds_repeat_bit_for_bit_and_views_replace_x(tiny):
    X, y = _separable(tiny, 3)
    views = np.stack([_separable(tiny, 3, seed=s)[0] for s in (5, 6, 7)])
    params = dict(backbone=tiny, class_names=NAMES, ctx_init=None, n_ctx=4, max_epoch=4, lr=0.2, batch_size=4)
    first = create_head("coop", random_state=3, **params).fit(X, y, views=views)
    again = create_head("coop", random_state=3, **params).fit(X, y, views=views)
    np.testing.assert_array_equal(first.ctx_, again.ctx_)
    np.testing.assert_array_equal(first.weights_, again.weights_)
    other = create_head("coop", random_state=4, **params).fit(X, y, views=views)
    assert not np.array_equal(first.ctx_, other.ctx_)
    # with views, the epochs draw from the views only: another X changes nothing
    moved = create_head("coop", random_state=3, **params).fit(_features(len(y), 64, seed=9), y, views=views)
    np.testing.assert_array_equal(first.ctx_, moved.ctx_)
    # each epoch draws one view per item, seeded by (random_state, epoch): each row comes from one of the views
    data = first.epoch_data(views, y)
    rows = torch.cat([b["features"] for b in data(2)]).numpy()
    assert all(any((views[:, i] == row).all(axis=1).any() for i in range(len(y))) for row in rows)
    assert all(torch.equal(a["features"], b["features"]) for a, b in zip(data(2), data(2)))


def test_drop_last_as_dassl(tiny):
    y = np.arange(70) % 3
    head = CoOp(tiny, NAMES, batch_size=32)
    batches = head.epoch_data(_features(70, 64)[None], y)(0)
    assert [len(b["labels"]) for b in batches] == [32, 32]  # 70 items: the last 6 dropped
    assert [len(b["labels"]) for b in head.epoch_data(_features(7, 64)[None], y[:7])(0)] == [7]


def test_saved_head_gives_identical_logits(tiny, tmp_path):
    X, y = _separable(tiny, 2)
    head = create_head("coop", backbone=tiny, class_names=NAMES, max_epoch=2, lr=0.5).fit(X, y, X_val=X, y_val=y)
    loaded = load_head(save_head(head, tmp_path / "coop"), backbone=tiny)
    np.testing.assert_array_equal(loaded.logits(X), head.logits(X))
    np.testing.assert_array_equal(loaded.ctx_, head.ctx_)
    assert loaded.history_ == head.history_ and head.history_[-1]["val_acc"] == head.val_accuracy_
    assert loaded.get_params()["max_epoch"] == 2 and head.val_accuracy_ == head.score(X, y)


def test_bad_inputs_are_one_line_errors(tiny):
    X, y = _features(6, 64), np.array([0, 1, 2] * 2)
    with pytest.raises(LabelError):
        create_head("coop", backbone=tiny, class_names=NAMES, max_epoch=0).fit(X, y + 1)
    with pytest.raises(DimensionMismatchError):
        create_head("coop", backbone=tiny, class_names=NAMES, max_epoch=0).fit(_features(6, 32), y)
    with pytest.raises(CliplabError, match="max_epoch"):
        create_head("coop", backbone=tiny, class_names=NAMES, max_epoch=-1).fit(X, y)
    with pytest.raises(CliplabError, match="tokens"):
        create_head("coop", backbone=tiny, class_names=["word " * 80], max_epoch=0).fit(X, y % 1)


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 3)):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
            path = tmp_path / "toy" / split / f"class{c}"
            path.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(path / f"{i}.png")
    return tmp_path / "toy"


def test_the_protocol_fits_on_train_shots_and_views_only(tiny, folder, tmp_path, monkeypatch):
    """Through the few-shot protocol: no test image's features (plain or augmented) reach fit."""
    from cliplab.data import load_dataset
    from cliplab.eval.fewshot import run_fewshot
    from cliplab.features import embed_images

    seen = []
    original = CoOp.fit

    def spy(self, X, y, X_val=None, y_val=None, views=None):
        seen.append((np.array(X), None if X_val is None else np.array(X_val), None if views is None else
                     np.array(views)))
        return original(self, X, y, X_val=X_val, y_val=y_val, views=views)

    monkeypatch.setattr(CoOp, "fit", spy)
    train, test = load_dataset(folder, split="train"), load_dataset(folder, split="test")
    result = run_fewshot(tiny, train, test, ["coop"], [2], [1], views=2, params={"coop": {"max_epoch": 2}},
                         output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", workers=0, progress=False)
    assert len(result.runs) == 1 and len(seen) == 1
    X, X_val, views = seen[0]
    assert X.shape == (6, 64) and views.shape == (2, 6, 64) and X_val is not None
    test_rows = embed_images(tiny, test, tmp_path / "cache", num_workers=0, progress=False).features
    fitted = np.concatenate([X, X_val, views.reshape(-1, 64)])
    assert not (np.abs(fitted[:, None, :] - np.asarray(test_rows)[None]).max(axis=2) < 1e-6).any()
    record = json.loads(Path(result.runs[0]["json"]).read_text())
    assert record["cliplab"]["method"] == "coop" and record["cliplab"]["split"] == "test"
