"""CPE-CLIP (paper 52): CLIP itself without prompts, the authors' old-class masking and exact gradient balance."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliplab.data.base import ArrayImageDataset
from cliplab.errors import CliplabError, UnsupportedOperationError
from cliplab.heads import head_entry
from cliplab.heads.cpe_clip import CPECLIP, MASKED, balance_factor, masked_logits
from cliplab.heads.saving import load_head, save_head
from cliplab.models import load_model

NAMES = ["red", "green", "blue"]
COLOURS = [[200, 40, 40], [40, 200, 40], [40, 40, 200]]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


def _images(classes: list[int], n_per_class: int, seed: int) -> ArrayImageDataset:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.asarray(classes), n_per_class)
    base = np.asarray(COLOURS, dtype=np.float64)[y]
    pixels = base[:, None, None, :] + rng.normal(0, 40, size=(len(y), 32, 32, 3))
    return ArrayImageDataset(np.clip(pixels, 0, 255).astype(np.uint8), y, NAMES, Path(f"s{seed}.npy"), "synthetic")


def _pixels(backbone, data) -> torch.Tensor:
    return torch.stack([backbone.preprocess(data.load_image(i)) for i in range(len(data))])


def _features(backbone, data) -> np.ndarray:
    return backbone.encode_images(_pixels(backbone, data)).numpy()


def test_registered_as_an_encoder_head_on_images_giving_a_backbone():
    entry = head_entry("cpe-clip")
    assert entry.family == "encoder" and entry.paper == 52
    assert "images" in entry.needs and "backbone" in entry.gives


def test_without_prompts_and_balance_it_is_clip(tiny):
    """n_prompts=0 and balance off: the class weights are CLIP's text features of "{c}." and backbone_ embeds the
    images as the model does, so the logits are zero-shot CLIP's (after two sessions too)."""
    first, second, test = _images([0], 2, 0), _images([1, 2], 2, 1), _images([0, 1, 2], 2, 2)
    head = CPECLIP(tiny, NAMES, n_prompts=0, balance=False)
    head.learn_session(_features(tiny, first), first.labels, images=first)
    head.learn_session(_features(tiny, second), second.labels, images=second)
    text = tiny.encode_texts([f"{c}." for c in NAMES]).numpy()
    np.testing.assert_allclose(head.weights_, text.T, atol=1e-6)
    X = _features(tiny, test)
    np.testing.assert_allclose(_features(head.backbone_, test), X, atol=1e-6)
    np.testing.assert_allclose(head.logits(X), tiny.logit_scale * X @ text.T, atol=1e-4)
    assert head.session_classes_ == [[0], [1, 2]] and head.seen_classes() == [0, 1, 2]


def test_old_class_logits_are_masked_as_the_authors_after_forward():
    """Their ``self.mb_output[:, :old_nclasses] = -9999``: the earlier sessions' columns, whatever their values;
    the cross-entropy is then that of the new columns alone."""
    logits = torch.tensor([[3.0, -1.0, 0.5, 2.0], [0.0, 7.0, 1.0, -2.0]])
    old = torch.tensor([True, True, False, False])
    got = masked_logits(logits, old)
    expected = torch.tensor([[MASKED, MASKED, 0.5, 2.0], [MASKED, MASKED, 1.0, -2.0]])
    assert torch.equal(got, expected) and MASKED == -9999.0
    labels = torch.tensor([3, 2])  # columns of new classes
    by_hand = -np.mean([2.0 - np.log(np.exp(0.5) + np.exp(2.0)), 1.0 - np.log(np.exp(1.0) + np.exp(-2.0))])
    assert float(F.cross_entropy(got, labels)) == pytest.approx(by_hand, abs=1e-6)


def test_balance_factor_is_new_over_seen_from_the_second_session():
    assert balance_factor(0, 5, 5) == 1.0
    assert balance_factor(1, 2, 6) == pytest.approx(1 / 3)
    assert balance_factor(4, 2, 10) == pytest.approx(0.2)


def _written_out_loss(backbone, values, weight, bias, pixels, labels, columns, n_old):
    """CPE-CLIP's second-session loss written out: prompts g_j in the text tower, W g_j + b in the image tower,
    scale * f . t over the seen classes, the old ones at -9999, cross-entropy."""
    image_prompts = [F.linear(v, weight, bias) for v in values.unbind(0)]
    f = backbone.forward_images(pixels, prompts=image_prompts)
    ids = backbone.tokenize([f"{NAMES[c]}." for c in columns])
    t = backbone.forward_texts(ids, prompts=list(values.unbind(0)))
    logits = backbone.logit_scale * f @ t.T
    logits = torch.cat([torch.full_like(logits[:, :n_old], -9999.0), logits[:, n_old:]], dim=1)
    return F.cross_entropy(logits, labels)


def test_second_session_gradient_is_exactly_scaled_by_new_over_seen(tiny):
    """One SGD step (no momentum, no decay, one batch) of session 2 moves every learnable tensor by
    -lr * (2/3) * the autograd gradient of the written-out masked loss."""
    first, second = _images([0], 2, 0), _images([1, 2], 2, 1)
    params = dict(base_epochs=1, epochs=1, batch_size=4, lr=0.5, warmup_epochs=0, momentum=0.0, weight_decay=0.0)
    head = CPECLIP(tiny, NAMES, **params).learn_session(_features(tiny, first), first.labels, images=first)
    before = {k: torch.from_numpy(getattr(head, k).copy()).requires_grad_(True)
              for k in ("prompts_", "proj_weight_", "proj_bias_")}
    pixels = _pixels(tiny, second)
    columns = [0, 1, 2]
    labels = torch.from_numpy(second.labels.astype(np.int64))  # classes 1, 2 are columns 1, 2
    model = tiny.model
    model.requires_grad_(False)
    loss = _written_out_loss(tiny, before["prompts_"], before["proj_weight_"], before["proj_bias_"], pixels, labels,
                             columns, 1)
    grads = torch.autograd.grad(loss, list(before.values()))
    head.learn_session(_features(tiny, second), second.labels, images=second)
    factor = 2 / 3
    for (key, start), grad in zip(before.items(), grads, strict=True):
        expected = start.detach() - 0.5 * factor * grad
        assert float(grad.abs().max()) > 1e-4  # the step is not trivially zero
        np.testing.assert_allclose(getattr(head, key), expected.numpy(), atol=2e-6, rtol=1e-5)


def test_overlapping_sessions_and_a_resnet_image_tower_are_refused_in_one_line(tiny):
    from test_maple import _resnet

    first = _images([0, 1], 2, 0)
    head = CPECLIP(tiny, NAMES, base_epochs=0).learn_session(_features(tiny, first), first.labels, images=first)
    again = _images([1, 2], 2, 1)
    with pytest.raises(CliplabError) as error:
        head.learn_session(_features(tiny, again), again.labels, images=again)
    assert "\n" not in str(error.value) and "overlap" in str(error.value) and "'green'" in str(error.value)
    rn = _resnet()
    with pytest.raises(UnsupportedOperationError) as error:
        CPECLIP(rn, NAMES).fit(_features(rn, first), first.labels, images=first)
    assert "\n" not in str(error.value) and "vision_prompts=False" in str(error.value)
    text_only = CPECLIP(rn, NAMES, vision_prompts=False, base_epochs=1).fit(_features(rn, first), first.labels,
                                                                           images=first)
    assert text_only.backbone_.attached_prompts("image") == []


def test_a_saved_head_rebuilds_the_same_prompted_backbone(tiny, tmp_path):
    first, second, test = _images([0], 2, 0), _images([1, 2], 2, 1), _images([0, 1, 2], 1, 2)
    head = CPECLIP(tiny, NAMES, base_epochs=1, epochs=1).learn_session(_features(tiny, first), first.labels,
                                                                     images=first)
    head.learn_session(_features(tiny, second), second.labels, images=second)
    save_head(head, tmp_path / "cpe")
    loaded = load_head(tmp_path / "cpe", tiny, method="cpe-clip")
    assert loaded.backbone_.model_id == head.backbone_.model_id != tiny.model_id
    X = _features(head.backbone_, test)
    np.testing.assert_array_equal(_features(loaded.backbone_, test), X)
    np.testing.assert_array_equal(loaded.logits(X), head.logits(X))
    assert loaded.session_classes_ == [[0], [1, 2]]


def test_a_killed_session_resumes_to_the_same_prompts(tiny, tmp_path, monkeypatch):
    from cliplab.heads.cpe_clip import CPEObjective

    first, second = _images([0], 2, 0), _images([1, 2], 4, 1)
    params = dict(base_epochs=1, epochs=3, batch_size=4, lr=0.5, checkpoint_dir=str(tmp_path / "state"))

    def two_sessions(**extra):
        head = CPECLIP(tiny, NAMES, **{**params, **extra})
        head.learn_session(_features(tiny, first), first.labels, images=first)
        return head.learn_session(_features(tiny, second), second.labels, images=second)

    whole = two_sessions(checkpoint_dir=None)
    calls, original = [], CPEObjective.__call__

    def dying(self, module, batch):
        calls.append(1)
        if len(calls) == 1 + 4:  # session 2 (2 steps an epoch), in epoch 2 after the checkpoint of epoch 1
            raise KeyboardInterrupt
        return original(self, module, batch)

    monkeypatch.setattr(CPEObjective, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        two_sessions()
    monkeypatch.setattr(CPEObjective, "__call__", original)
    import cliplab.heads.cpe_clip as cpe

    real, starts = cpe.run_training, []

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        starts.append(result.resumed_from)
        return result

    monkeypatch.setattr(cpe, "run_training", spy)
    resumed = two_sessions()
    assert starts[-1] == 2  # session 2 went on from its checkpoint after epoch 1 (2 steps)
    for key in ("prompts_", "proj_weight_", "proj_bias_", "weights_"):
        np.testing.assert_array_equal(getattr(resumed, key), getattr(whole, key))
