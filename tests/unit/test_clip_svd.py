"""CLIP-SVD (heads/clip_svd.py): the reparametrised model equals the plain one at initialisation, only the singular
values train, a fit beats zero-shot on an easy task, the fitted backbone is rebuilt exactly, bad input is one line."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.data.base import ImageDataset
from cliplab.errors import CliplabError
from cliplab.features.text import class_weights
from cliplab.heads import create_head
from cliplab.heads.clip_svd import SVDLearner, SVDObjective, parametrisations, singular_value_blocks
from cliplab.train.engine import TrainSettings, run_training

NAMES = ["cat", "dog", "bird"]
TEMPLATE = "a photo of a {c}."


class Colours(ImageDataset):
    """In-memory 32-pixel images: class c is noise around colour c (red, green, blue)."""

    COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])

    def __init__(self, per_class: int, seed: int):
        rng = np.random.default_rng(seed)
        self.class_names = list(NAMES)
        self.labels = np.repeat(np.arange(len(NAMES)), per_class)
        self.pixels = [np.clip(rng.normal(self.COLOURS[c], 50, (32, 32, 3)), 0, 255).astype(np.uint8)
                       for c in self.labels]
        self.name, self.split = "colours", f"seed{seed}"

    def item_id(self, index: int) -> str:
        return f"{self.split}#{index}"

    def identity(self, index: int) -> str:
        return f"colours-{self.split}-{index}"

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.pixels[index])


def _images(backbone, data: ImageDataset) -> torch.Tensor:
    return torch.stack([backbone.preprocess(data.load_image(i)) for i in range(len(data))])


def _features(backbone, data: ImageDataset) -> np.ndarray:
    return backbone.encode_images(_images(backbone, data)).numpy()


def _expected_count(backbone) -> int:
    """The number of singular values, counted from the plain model's weight shapes: min(m, n) per nn.Linear of the
    towers' blocks and 3 x min(m/3, n) per packed q/k/v projection (the authors' separate q, k, v linears)."""
    total = 0
    for name, param in backbone.model.named_parameters():
        if name.endswith("in_proj_weight"):
            total += 3 * min(param.shape[0] // 3, param.shape[1])
        elif param.dim() == 2 and ("mlp." in name or "out_proj" in name):
            total += min(param.shape)
    return total


def test_at_initialisation_the_model_is_unchanged_and_only_the_singular_values_train(tiny):
    derived = tiny.derive("svd-test", trainable=False)
    derived.reparametrize(singular_value_blocks)
    trainable = [p for p in derived.model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == _expected_count(tiny) == 2 * 2 * (3 * 64 + 64 + 64 + 64)
    assert all(p.dim() == 1 for p in trainable)
    images = _images(tiny, Colours(2, 0))
    tokens = tiny.tokenize([TEMPLATE.replace("{c}", n) for n in NAMES])
    with torch.no_grad():
        torch.testing.assert_close(derived.forward_images(images), tiny.forward_images(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(derived.forward_texts(tokens), tiny.forward_texts(tokens), rtol=0, atol=1e-5)
    X = _features(tiny, Colours(2, 0))
    head = create_head("clip-svd", backbone=tiny, class_names=NAMES, max_epoch=0).fit(X, np.repeat([0, 1, 2], 2))
    np.testing.assert_allclose(head.weights_, class_weights(tiny, NAMES, [TEMPLATE]), rtol=0, atol=1e-5)
    assert head.singular_values_.size == _expected_count(tiny) // 2  # text tower only: no images given


def test_one_step_changes_only_the_singular_values(tiny):
    head = create_head("clip-svd", backbone=tiny, class_names=NAMES)
    derived, names = head._reparametrised(tiny, ("image", "text"))
    modules = parametrisations(derived, names)
    before = {k: v.clone() for k, v in derived.model.state_dict().items()}
    shared = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    tokens, per_class = head._tokens(tiny)
    learner = SVDLearner(derived, [m.s for m in modules], tokens, per_class, tiny.logit_scale, True)
    data = Colours(2, 0)
    batch = {"images": _images(tiny, data), "labels": torch.from_numpy(data.labels)}
    run_training(learner, SVDObjective(), lambda epoch: [batch],
                 TrainSettings(steps=1, lr=0.1, optimizer="sgd", momentum=0.0, progress=False, device="cpu"))
    after = derived.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.endswith(".s") for k in changed)
    assert len(changed) == len(names)  # every decomposed weight of both towers got a gradient
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in shared.items())  # the shared model untouched


def test_a_fit_beats_zero_shot_on_an_easy_task_and_the_backbone_is_rebuilt_exactly(tiny):
    train, test = Colours(6, 0), Colours(10, 1)
    X = _features(tiny, train)
    zero = create_head("clip-svd", backbone=tiny, class_names=NAMES, max_epoch=0).fit(X, train.labels)
    head = create_head("clip-svd", backbone=tiny, class_names=NAMES, max_epoch=10, lr=0.01)
    head.fit(X, train.labels, images=train)
    assert head.trained_towers_ == ["image", "text"] and head.steps_ == 10
    zero_shot = (zero.predict(_features(tiny, test)) == test.labels).mean()
    tuned_features = _features(head.backbone_, test)
    tuned = (head.predict(tuned_features) == test.labels).mean()
    assert tuned >= zero_shot + 0.3 and tuned >= 0.9
    rebuilt = head.rebuild_backbone(tiny)
    assert rebuilt.model_id == head.backbone_.model_id != tiny.model_id
    np.testing.assert_array_equal(_features(rebuilt, test), tuned_features)
    renamed = head.with_classes(["bird", "cat"])
    np.testing.assert_allclose(renamed.weights_, head.weights_[:, [2, 0]], rtol=0, atol=1e-6)
    assert renamed.logits(tuned_features).shape == (len(test), 2) and head.weights_.shape[1] == 3
    restored = pickle.loads(pickle.dumps(head))
    np.testing.assert_array_equal(restored.logits(tuned_features), head.logits(tuned_features))


@pytest.mark.parametrize("params, fit, match", [
    ({"towers": "vision"}, {}, "towers must be one of"),
    ({"lr": 0.0}, {}, "lr must be"),
    ({"towers": "image"}, {}, "needs the training images"),
    ({}, {"images": Colours(1, 0)}, "3 images for 6 training rows"),
    ({"templates": ["a photo of a {c}" + " very" * 80]}, {}, "tokens, over the model's 77"),
])
def test_bad_input_is_one_line_before_training(tiny, params, fit, match):
    X = np.eye(6, 64, dtype=np.float32)
    head = create_head("clip-svd", backbone=tiny, class_names=NAMES, max_epoch=1, **params)
    with pytest.raises(CliplabError, match=match) as caught:
        head.fit(X, np.repeat([0, 1, 2], 2), **fit)
    assert "\n" not in str(caught.value)
    assert not hasattr(head, "singular_values_")
