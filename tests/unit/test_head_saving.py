"""Fitted heads saved as safetensors + JSON and loaded back give the same predictions; nothing is pickled."""

import json

import numpy as np
import pytest

from cliplab.errors import CliplabError
from cliplab.heads import create_head
from cliplab.heads.saving import load_head, save_head


def _data(n_classes=4, per_class=6, dim=64, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    X = rng.normal(size=(len(y), dim)).astype(np.float32) + 2 * np.eye(dim, dtype=np.float32)[y]
    return X / np.linalg.norm(X, axis=1, keepdims=True), y


def test_ncm_round_trip(tmp_path):
    X, y = _data()
    head = create_head("ncm", logit_scale=30.0).fit(X, y)
    save_head(head, tmp_path / "ncm", model_id="m1")
    assert not list((tmp_path / "ncm").glob("*.pkl"))
    loaded = load_head(tmp_path / "ncm", model_id="m1")
    np.testing.assert_array_equal(loaded.logits(X), head.logits(X))
    assert loaded.logit_scale == 30.0 and loaded.n_features_in_ == 64


def test_zeroshot_round_trip_with_its_backbone(tiny, tmp_path):
    X, _ = _data()
    head = create_head("zeroshot", backbone=tiny, class_names=["a", "b", "c"], templates=["a {c}"],
                       cache_dir=tmp_path / "c").fit()
    save_head(head, tmp_path / "zs")
    record = json.loads((tmp_path / "zs" / "head.json").read_text())
    assert record["model_id"] == tiny.model_id and record["params"]["class_names"] == ["a", "b", "c"]
    loaded = load_head(tmp_path / "zs", backbone=tiny)
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))


def test_loading_with_another_model_is_a_clear_error(tmp_path):
    X, y = _data()
    save_head(create_head("ncm").fit(X, y), tmp_path / "h", model_id="model-A")
    with pytest.raises(CliplabError, match="fitted on features of model model-A"):
        load_head(tmp_path / "h", model_id="model-B")


def test_unfitted_and_unreadable_heads_are_refused(tmp_path):
    with pytest.raises(CliplabError, match="not fitted"):
        save_head(create_head("ncm"), tmp_path / "x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "head.json").write_text("{oops")
    with pytest.raises(CliplabError, match="not a saved cliplab head"):
        load_head(tmp_path / "bad")
