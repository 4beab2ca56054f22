"""Saved heads that give a derived Backbone (CLIP-SVD): the learned state is saved as arrays, the Backbone is rebuilt
from the base model on loading to the same weights; another model, another method, no model or damaged state are
refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cliplab.errors import CliplabError
from cliplab.heads import create_head
from cliplab.heads.saving import load_head, save_head
from cliplab.models import load_model

NAMES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def fitted():
    tiny = load_model("tiny", device="cpu")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, tiny.embed_dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    head = create_head("clip-svd", backbone=tiny, class_names=NAMES, max_epoch=2, lr=0.05, batch_size=3,
                       checkpoint_dir="/nowhere/else")
    head.set_params(checkpoint_dir=None).fit(X, np.repeat([0, 1, 2], 2))
    return tiny, head, X


def test_a_saved_head_rebuilds_its_backbone_to_the_same_weights(fitted, tmp_path):
    tiny, head, X = fitted
    assert head.backbone_.model_id != tiny.model_id  # training changed the singular values
    save_head(head, tmp_path / "h")
    record = json.loads((tmp_path / "h" / "head.json").read_text())
    assert "backbone_" not in record["fitted"] and "checkpoint_dir" not in record["params"]
    assert record["model_id"] == tiny.model_id
    assert set(load_file(str(tmp_path / "h" / "arrays.safetensors"))) >= {"singular_values_", "weights_"}
    loaded = load_head(tmp_path / "h", backbone=tiny, method="clip-svd")
    assert loaded.backbone_.model_id == head.backbone_.model_id
    np.testing.assert_array_equal(loaded.logits(X), head.logits(X))
    probe = X[:2, :].copy()
    np.testing.assert_array_equal(loaded.singular_values_, head.singular_values_)
    assert loaded.backbone_.encode_texts(["a photo of a cat."]).shape == (1, probe.shape[1])


def test_another_model_method_no_model_or_damaged_state_is_one_line(fitted, tmp_path):
    tiny, head, _ = fitted
    folder = save_head(head, tmp_path / "h")
    other = load_model("tiny", seed=1, device="cpu")
    cases = [
        (dict(backbone=other), "fitted on features of model tiny-seed0"),
        (dict(backbone=tiny, method="coop"), "holds a 'clip-svd' head, not 'coop'"),
        (dict(backbone=None), "needs a backbone"),
    ]
    for kwargs, match in cases:
        with pytest.raises(CliplabError, match=match) as caught:
            load_head(folder, **kwargs)
        assert "\n" not in str(caught.value)
    arrays = load_file(str(folder / "arrays.safetensors"))
    arrays["singular_values_"] = arrays["singular_values_"][:-5]
    save_file(arrays, str(folder / "arrays.safetensors"))
    with pytest.raises(CliplabError, match=r"singular values saved, the model's weights have") as caught:
        load_head(folder, backbone=tiny)
    assert str(caught.value).startswith(str(folder)) and "\n" not in str(caught.value)
