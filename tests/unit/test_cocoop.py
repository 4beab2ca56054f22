"""CoCoOp (CoOp's follow-up): zero meta-network = CoOp, batched = per-image loop, only the prompt learner trains,
it fits, with_classes, saving, resume after a kill (CoOp and CoCoOp), bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss

import cliplab.train.prompts as prompts
from cliplab.errors import CliplabError, DimensionMismatchError, LabelError
from cliplab.heads import create_head, head_entry
from cliplab.heads.cocoop import CoCoOp
from cliplab.heads.saving import load_head, save_head
from cliplab.train.engine import list_objectives

NAMES = ["cat", "dog", "traffic light"]


def _features(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _separable(d: int, n_per_class: int = 3, seed: int = 0, classes: int = len(NAMES)):
    rng = np.random.default_rng(seed)
    centres = _features(classes, d, seed + 1)
    y = np.repeat(np.arange(classes), n_per_class)
    X = centres[y] + 0.1 * rng.normal(size=(len(y), d)).astype(np.float32)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), y


def test_registered_with_its_needs_and_the_authors_defaults(tiny):
    entry = head_entry("cocoop")
    assert entry.cls is CoCoOp and entry.family == "encoder" and entry.needs == {"val", "views"}
    assert "cocoop" in list_objectives() and "class_weights" not in entry.gives
    head = CoCoOp(tiny, NAMES)
    assert (head.ctx_init, head.n_ctx, head.lr, head.batch_size, head.max_epoch) == ("a photo of a", None, 0.002, 1, 10)
    learner = head.build_learner()
    assert learner.ctx.shape == (4, tiny.text_tower().width)
    assert learner.meta_net.linear1.weight.shape == (tiny.embed_dim // 16, tiny.embed_dim)
    assert learner.meta_net.linear2.weight.shape == (learner.ctx.shape[1], tiny.embed_dim // 16)


def test_a_zero_meta_network_is_coop_with_the_same_context(tiny):
    """pi(x) = 0 for every x: each image's prompts are CoOp's, so the logits are CoOp's."""
    X, y = _separable(tiny.embed_dim)
    coop = create_head("coop", backbone=tiny, class_names=NAMES, max_epoch=2, lr=0.5).fit(X, y)
    cocoop = create_head("cocoop", backbone=tiny, class_names=NAMES, max_epoch=0).fit(X, y)
    cocoop.ctx_ = coop.ctx_.copy()
    cocoop.meta_w2_ = np.zeros_like(cocoop.meta_w2_)
    cocoop.meta_b2_ = np.zeros_like(cocoop.meta_b2_)
    X_test = _features(7, tiny.embed_dim, seed=4)
    np.testing.assert_allclose(cocoop.logits(X_test), coop.logits(X_test), atol=1e-6, rtol=1e-6)  # float32 rounding
    assert not np.allclose(coop.logits(X_test), create_head("coop", backbone=tiny, class_names=NAMES,
                                                            max_epoch=0).fit(X, y).logits(X_test), atol=1e-3)
    # with the meta-network's output, the logits move
    learned = create_head("cocoop", backbone=tiny, class_names=NAMES, max_epoch=0).fit(X, y)
    learned.ctx_ = coop.ctx_.copy()
    assert np.abs(learned.logits(X_test) - coop.logits(X_test)).max() > 1e-4


def test_the_batched_text_pass_equals_a_per_image_loop(tiny):
    """Loss and gradients of a batch of 4 images (4 x C prompts in one pass) are the authors' per-image loop:
    for each image, ctx + pi(x) expanded to every class, its C text features, logit_scale * x . t."""
    learner = CoCoOp(tiny, NAMES).build_learner()
    with torch.no_grad():
        learner.meta_net.linear2.weight.normal_(0, 0.5)
    X, y = _separable(tiny.embed_dim, 2, seed=3)
    features, labels = torch.from_numpy(X[:4]), torch.from_numpy(y[:4])
    batched = F.cross_entropy(learner.logits(features), labels)
    batched.backward()
    grads = [p.grad.clone() for p in learner.parameters()]
    learner.zero_grad()
    rows = []
    for x in features:
        bias = learner.meta_net(x[None])[0]
        prompts_i = torch.cat([learner.prefix, (learner.ctx + bias).expand(len(NAMES), -1, -1), learner.suffix], 1)
        text = F.normalize(tiny.forward_text_embeddings(prompts_i, learner.tokens, normalize=False), dim=-1)
        rows.append(learner.logit_scale * x @ text.T)
    looped = F.cross_entropy(torch.stack(rows), labels)
    looped.backward()
    assert float(batched.detach()) == pytest.approx(float(looped.detach()), rel=1e-6)
    for got, expected in zip(grads, (p.grad for p in learner.parameters())):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-6, rtol=1e-4)
    assert any(float(g.abs().max()) > 1e-6 for g in grads)


def test_only_the_learnable_parameters_change_after_one_step(tiny):
    X, y = _separable(tiny.embed_dim, 1)
    trainable = tiny.derive("cocoop-test", trainable=True)
    before = {k: v.clone() for k, v in trainable.model.state_dict().items()}
    head = create_head("cocoop", backbone=trainable, class_names=NAMES, max_epoch=1, batch_size=3, lr=0.5,
                       warmup_epochs=0).fit(X, y)
    init = create_head("cocoop", backbone=trainable, class_names=NAMES, max_epoch=0).fit(X, y)
    after = trainable.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen weights bit-identical
    assert all(p.grad is None for p in trainable.model.parameters())
    assert all(p.requires_grad for p in trainable.model.parameters())
    for key in ("ctx_", "meta_w1_", "meta_b1_", "meta_w2_", "meta_b2_"):
        assert np.abs(getattr(head, key) - getattr(init, key)).max() > 1e-7, key
    assert head.history_ == [] and len(head.training_loss_) == 1


def test_it_fits_an_easy_task_better_than_zero_shot(tiny):
    X, y = _separable(tiny.embed_dim, 4)
    zero = create_head("cocoop", backbone=tiny, class_names=NAMES, max_epoch=0).fit(X, y)
    head = create_head("cocoop", backbone=tiny, class_names=NAMES, max_epoch=6, lr=0.5, batch_size=4,
                       warmup_epochs=0).fit(X, y)
    assert head.training_loss_[-1] < head.training_loss_[0]
    assert log_loss(y, head.predict_proba(X), labels=[0, 1, 2]) < 0.8 * log_loss(y, zero.predict_proba(X),
                                                                                    labels=[0, 1, 2])
    assert head.score(X, y) > zero.score(X, y)


def test_with_classes_scores_new_names_with_what_was_learned(tiny, tmp_path):
    X, y = _separable(tiny.embed_dim, 2)
    new = ["bird", "car", "tree", "boat"]
    for method in ("coop", "cocoop"):
        head = create_head(method, backbone=tiny, class_names=NAMES, max_epoch=2, lr=0.5, batch_size=3).fit(X, y)
        moved = head.with_classes(new)
        assert list(moved.class_names) == new and list(head.class_names) == NAMES
        np.testing.assert_array_equal(moved.ctx_, head.ctx_)
        # the same as a head built for the new names holding the learned state
        reference = create_head(method, backbone=tiny, class_names=new, max_epoch=0).fit(X[:4], [0, 1, 2, 3])
        reference.ctx_ = head.ctx_
        for key in ("meta_w1_", "meta_b1_", "meta_w2_", "meta_b2_"):
            if hasattr(head, key):
                setattr(reference, key, getattr(head, key))
        if method == "coop":
            learner = reference.build_learner()
            with torch.no_grad():
                learner.ctx.copy_(torch.from_numpy(head.ctx_))
                reference.weights_ = learner().numpy().T
        X_test = _features(5, tiny.embed_dim, seed=8)
        assert moved.logits(X_test).shape == (5, 4)
        np.testing.assert_allclose(moved.logits(X_test), reference.logits(X_test), atol=1e-5)
    saved = load_head(save_head(moved, tmp_path / "moved"), backbone=tiny)
    np.testing.assert_array_equal(saved.logits(X_test), moved.logits(X_test))


def test_saved_cocoop_gives_identical_logits_and_seeds_repeat(tiny, tmp_path):
    X, y = _separable(tiny.embed_dim, 2)
    params = dict(backbone=tiny, class_names=NAMES, max_epoch=2, lr=0.2, batch_size=2)
    head = create_head("cocoop", **params).fit(X, y, X_val=X, y_val=y)
    again = create_head("cocoop", **params).fit(X, y, X_val=X, y_val=y)
    np.testing.assert_array_equal(head.meta_w1_, again.meta_w1_)
    np.testing.assert_array_equal(head.ctx_, again.ctx_)
    loaded = load_head(save_head(head, tmp_path / "cocoop"), backbone=tiny)
    np.testing.assert_array_equal(loaded.logits(X), head.logits(X))
    assert head.val_accuracy_ == head.score(X, y) == head.history_[-1]["val_acc"]


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_a_fit_killed_after_epoch_one_resumes_to_the_uninterrupted_fit(tiny, tmp_path, monkeypatch, method):
    """checkpoint_dir: the loop checkpoints each epoch; a fit killed after epoch 1 and fitted again with the same
    folder ends with the same context, meta-network, losses and history as one that was never stopped."""
    X, y = _separable(tiny.embed_dim, 2)
    views = np.stack([_separable(tiny.embed_dim, 2, seed=s)[0] for s in (5, 6)])
    params = dict(backbone=tiny, class_names=NAMES, max_epoch=3, lr=0.3, batch_size=2, warmup_epochs=0)
    whole = create_head(method, **params).fit(X, y, X_val=X, y_val=y, views=views)
    original = prompts.run_training
    steps_per_epoch = len(y) // 2

    def killed(*args, **kwargs):
        def stop(step, loss):
            if step == steps_per_epoch:
                raise KeyboardInterrupt

        return original(*args, **kwargs, callback=stop)

    folder = tmp_path / "state"
    monkeypatch.setattr(prompts, "run_training", killed)
    with pytest.raises(KeyboardInterrupt):
        create_head(method, checkpoint_dir=folder, **params).fit(X, y, X_val=X, y_val=y, views=views)
    assert (folder / "checkpoint.pt").is_file()
    monkeypatch.setattr(prompts, "run_training", original)
    resumed = create_head(method, checkpoint_dir=folder, **params).fit(X, y, X_val=X, y_val=y, views=views)
    keys = ["ctx_", "meta_w1_", "meta_b2_"] if method == "cocoop" else ["ctx_", "weights_"]
    for key in keys:
        np.testing.assert_array_equal(getattr(resumed, key), getattr(whole, key))
    assert resumed.training_loss_ == whole.training_loss_ and len(whole.training_loss_) == 3
    assert resumed.history_ == whole.history_
    with pytest.raises(CliplabError, match="different options"):  # other training data: refused, not resumed
        create_head(method, checkpoint_dir=folder, **params).fit(X[::-1].copy(), y, views=views[:, ::-1].copy())


def test_bad_inputs_are_one_line_errors(tiny):
    X, y = _features(6, 64), np.array([0, 1, 2] * 2)
    with pytest.raises(LabelError):
        create_head("cocoop", backbone=tiny, class_names=NAMES, max_epoch=0).fit(X, y + 1)
    with pytest.raises(DimensionMismatchError):
        create_head("cocoop", backbone=tiny, class_names=NAMES, max_epoch=0).fit(_features(6, 32), y)
    with pytest.raises(CliplabError, match="batch_size"):
        create_head("cocoop", backbone=tiny, class_names=NAMES, batch_size=0).fit(X, y)
    with pytest.raises(CliplabError, match="over the model's") as caught:
        create_head("cocoop", backbone=tiny, class_names=["word " * 80], max_epoch=0).fit(X, y % 1)
    assert "\n" not in str(caught.value)
    with pytest.raises(CliplabError, match="shorter than ctx_init"):
        create_head("cocoop", backbone=tiny, class_names=NAMES, n_ctx=2, max_epoch=0).fit(X, y)
