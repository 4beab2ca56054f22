"""GOPro (paper 26): zero projections are CoOp, identical views cost no consistency, SimCLR as written, the
per-layer statistics, training, saving and refusals."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliplab.data.base import ArrayImageDataset
from cliplab.errors import UnsupportedOperationError
from cliplab.heads import create_head, head_entry
from cliplab.heads.gopro import GOPro, GOProObjective, consistency_loss, layer_statistics, simclr_loss
from cliplab.heads.saving import load_head, save_head
from cliplab.models import load_model

NAMES = ["red", "blue"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


def _images(n_per_class: int, seed: int) -> ArrayImageDataset:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(2), n_per_class)
    base = np.where(y[:, None] == 0, [[200, 40, 40]], [[40, 40, 200]]).astype(np.float64)
    pixels = np.clip(base[:, None, None, :] + rng.normal(0, 40, size=(len(y), 32, 32, 3)), 0, 255)
    return ArrayImageDataset(pixels.astype(np.uint8), y, NAMES, Path(f"g{seed}.npy"), "synthetic")


def _pixels(backbone, data) -> torch.Tensor:
    return torch.stack([backbone.preprocess(data.load_image(i)) for i in range(len(data))])


def _zero_projectors(learner) -> None:
    with torch.no_grad():
        for module in (*learner.style, *learner.content, learner.rho):
            module.weight.zero_()
            module.bias.zero_()


def test_registered_as_an_encoder_head_on_images():
    entry = head_entry("gopro")
    assert entry.family == "encoder" and entry.paper == 26 and "images" in entry.needs


def test_zero_projections_give_coops_prompts_and_logits(tiny):
    """With every style, content and mixing projection at zero the bias is zero for any image, so each image's
    logits are CoOp's with the same context (CoOp's own learner, its init "a photo of a")."""
    data = _images(2, 0)
    pixels = _pixels(tiny, data)
    learner = GOPro(tiny, NAMES).build_learner()
    _zero_projectors(learner)
    features, stats = layer_statistics(tiny, pixels)
    assert float(stats.abs().max()) > 0
    with torch.no_grad():
        assert float(learner.bias(stats).abs().max()) == 0.0
        gopro, _ = learner.conditioned(features, stats)
        coop = create_head("coop", backbone=tiny, class_names=NAMES).build_learner().logits(features)
    np.testing.assert_allclose(gopro.numpy(), coop.numpy(), atol=1e-5)
    np.testing.assert_allclose(features.numpy(), tiny.encode_images(pixels).numpy(), atol=1e-5)


def test_layer_statistics_are_the_token_mean_and_adains_sigma(tiny):
    pixels = _pixels(tiny, _images(1, 3))
    tower = tiny.image_tower()
    with torch.no_grad():
        x, state = tower.begin(pixels, None)
        x = tower.block(0, x, state)
    _, stats = layer_statistics(tiny, pixels)
    mu = x.mean(dim=1)
    sigma = torch.sqrt((((x - mu[:, None]) ** 2).sum(dim=1) + 0.000000023) / x.shape[1])
    np.testing.assert_allclose(stats[:, 0, 0].numpy(), mu.numpy(), atol=1e-6)
    np.testing.assert_allclose(stats[:, 0, 1].numpy(), sigma.numpy(), atol=1e-6)


def test_identical_views_cost_no_consistency(tiny):
    """The same picture as all three views: the consistency term is zero, so the loss is CE + 0.1 SimCLR(f, f)."""
    data = _images(2, 0)
    pixels = _pixels(tiny, data)
    learner = GOPro(tiny, NAMES).build_learner()
    labels = torch.from_numpy(data.labels.astype(np.int64))
    batch = {"images": pixels, "moco": pixels.clone(), "augmix": pixels.clone(), "labels": labels}
    text = torch.randn(4, 2, 8)
    assert float(consistency_loss(text, text.clone(), text.clone())) == 0.0
    with torch.no_grad():
        loss, _ = GOProObjective()(learner, batch)
        features, stats = layer_statistics(tiny, pixels)
        logits, _ = learner.conditioned(features, stats)
        rest = F.cross_entropy(logits, labels) + 0.1 * simclr_loss(learner.projected(features),
                                                                   learner.projected(features))
        no_contrast, _ = GOProObjective(contrastive_weight=0.0)(learner, batch)
    assert float(loss) == pytest.approx(float(rest), abs=1e-5)
    assert float(no_contrast) == pytest.approx(float(F.cross_entropy(logits, labels)), abs=1e-6)


def test_simclr_loss_as_written_out():
    rng = np.random.default_rng(0)
    a, b = (torch.from_numpy(rng.normal(size=(3, 5))).float() for _ in range(2))
    an, bn = F.normalize(a, dim=-1).numpy(), F.normalize(b, dim=-1).numpy()

    def side(x, y):
        total = 0.0
        for i in range(3):
            scores = [x[i] @ y[k] / 0.1 for k in range(3)] + [x[i] @ x[k] / 0.1 for k in range(3) if k != i]
            total += -(scores[i] - np.log(np.sum(np.exp(scores))))
        return total / 3

    assert float(simclr_loss(a, b)) == pytest.approx((side(an, bn) + side(bn, an)) / 2, abs=1e-4)


def test_trains_saves_loads_and_scores_new_names(tiny, tmp_path):
    train, test = _images(2, 0), _images(2, 1)
    X = tiny.encode_images(_pixels(tiny, train)).numpy()
    head = GOPro(tiny, NAMES, max_epoch=1, batch_size=2, lr=0.01).fit(X, train.labels, images=train)
    start = GOPro(tiny, NAMES, max_epoch=0).fit(X, train.labels, images=train)
    assert np.abs(head.ctx_ - start.ctx_).max() > 0 and np.isfinite(head.training_loss_).all()
    assert head.logits_images(test).shape == (4, 2)
    save_head(head, tmp_path / "gopro")
    loaded = load_head(tmp_path / "gopro", tiny, method="gopro")
    X_test = tiny.encode_images(_pixels(tiny, test)).numpy()
    np.testing.assert_array_equal(loaded.logits(X_test), head.logits(X_test))
    np.testing.assert_allclose(loaded.logits_images(test), head.logits_images(test), atol=1e-6)
    assert head.with_classes(["green", "red", "blue"]).logits(X_test).shape == (4, 3)


def test_a_resnet_image_tower_is_refused_in_one_line(tiny):
    from test_maple import _resnet

    rn = _resnet()
    data = _images(1, 0)
    with pytest.raises(UnsupportedOperationError) as error:
        GOPro(rn, NAMES).fit(rn.encode_images(_pixels(rn, data)).numpy(), data.labels, images=data)
    assert "\n" not in str(error.value) and "GOPro" in str(error.value)
