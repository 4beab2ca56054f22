"""A damaged or crafted saved head is refused in one line, never loaded into nonsense (issue 21, item 10)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cliplab.errors import CliplabError
from cliplab.heads import create_head
from cliplab.heads.saving import load_head, save_head


def _saved(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 16)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    head = create_head("ncm").fit(X, np.repeat([0, 1], 6))
    return save_head(head, tmp_path / "head", model_id="m", class_names=["a", "b"]), X, head


def _edit_json(folder, change):
    record = json.loads((folder / "head.json").read_text())
    change(record)
    (folder / "head.json").write_text(json.dumps(record))


def _edit_arrays(folder, change):
    arrays = dict(load_file(str(folder / "arrays.safetensors")))
    change(arrays)
    save_file(arrays, str(folder / "arrays.safetensors"))


def _set(section, key, value):
    return lambda record: record[section].__setitem__(key, value) if section else record.__setitem__(key, value)


def _nan_weights(arrays):
    arrays["weights_"] = arrays["weights_"].copy()
    arrays["weights_"][3, 1] = np.nan


CASES = {
    "nan weights": ("arrays", _nan_weights, "NaN or infinite"),
    "inf weights": ("arrays", lambda a: a.__setitem__("weights_", np.full_like(a["weights_"], np.inf)),
                    "NaN or infinite"),
    "3 names for 2 columns": ("json", _set("", "class_names", ["a", "b", "c"]), "3 class names for 2 classes"),
    "transposed weights": ("arrays", lambda a: a.__setitem__("weights_", np.ascontiguousarray(a["weights_"].T)),
                           "does not compute"),
    "extra column": ("arrays", lambda a: a.__setitem__("weights_", np.ones((16, 3), np.float32)), "columns for 2"),
    "dunder key": ("json", _set("fitted", "__class__", "x"), "'__class__' is not fitted state"),
    "method key": ("json", _set("fitted", "logits", 1), "'logits' is not fitted state"),
    "private key": ("json", _set("fitted", "_validate_params", 1), "is not fitted state"),
    "state of the wrong type": ("json", _set("fitted", "n_features_in_", 16.5), "n_features_in_"),
    "unknown top-level key": ("json", _set("", "exec", "import os"), "unknown key 'exec'"),
    "backbone param": ("json", _set("params", "backbone", "x"), "parameter 'backbone'"),
    "unknown param": ("json", _set("params", "evil", 1), "takes no parameter 'evil'"),
    "nan param": ("json", _set("params", "logit_scale", float("nan")), "NaN or infinite"),
    "string param": ("json", _set("params", "logit_scale", "a lot"), None),
    "string width": ("json", _set("fitted", "n_features_in_", "16"), "n_features_in_"),
    "negative width": ("json", _set("fitted", "n_features_in_", -1), "n_features_in_"),
    "params not a mapping": ("json", _set("", "params", [1, 2]), "'params' is not a mapping"),
    "names not strings": ("json", _set("", "class_names", [1, 2]), "class_names"),
    "unknown method": ("json", _set("", "method", "no-such-head"), None),
    "model id not text": ("json", _set("", "model_id", {"a": 1}), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_crafted_head_is_refused_in_one_line(tmp_path, case):
    folder, _, _ = _saved(tmp_path)
    where, change, expected = CASES[case]
    (_edit_arrays if where == "arrays" else _edit_json)(folder, change)
    with pytest.raises(CliplabError) as caught:
        load_head(folder, model_id="m")
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message
    if expected:
        assert expected in message


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "[1, 2]", '"head"', "null"])
def test_a_head_json_that_is_no_record_is_one_line(tmp_path, text):
    folder, _, _ = _saved(tmp_path)
    (folder / "head.json").write_text(text)
    with pytest.raises(CliplabError) as caught:
        load_head(folder, model_id="m")
    assert "\n" not in str(caught.value)


def test_a_sound_head_still_loads_and_predicts_the_same(tmp_path):
    folder, X, head = _saved(tmp_path)
    loaded = load_head(folder, model_id="m")
    np.testing.assert_array_equal(loaded.logits(X), head.logits(X))
