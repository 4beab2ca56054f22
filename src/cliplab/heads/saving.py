"""Save and load fitted heads: safetensors for arrays, JSON for everything else; nothing is pickled.

A saved head is a folder with ``head.json`` (method name, hyperparameters, scalar fitted state, class
names, the feature model's id) and ``arrays.safetensors`` (the fitted arrays). Loading rebuilds the head
with ``create_head`` and refuses a backbone whose ``model_id`` differs from the one the head was fitted on.

A saved head may be damaged or hostile, so loading checks it against the schema before using it: only
the known top-level keys; hyperparameters the method takes, with finite numbers; fitted state named as
fitted state is (``name_``), never an attribute or method of the head's class; numeric arrays; a
positive ``n_features_in_``; ``classes_`` and the class names agreeing in count; and a probe: the rebuilt
head's logits on a few unit vectors are finite, one column per class. Anything else is refused in one line.

Heads that give a derived Backbone (``gives=("backbone",)``: CLIP-SVD, MaPLe) keep what they learned as numpy fitted
state; their ``backbone_`` is not saved but rebuilt on loading by ``head.rebuild_backbone(backbone)`` from the base
backbone (which must then be given). Training-run paths (``cache_dir``, ``checkpoint_dir``) are not saved.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np

from ..errors import CliplabError
from ..fileio import atomic_write, atomic_write_text
from .registry import create_head, head_entry

FORMAT = "cliplab-head/1"
SIMPLE = (str, int, float, bool, type(None))
RECORD_KEYS = {"format", "method", "params", "fitted", "class_names", "model_id", "model"}
FITTED_NAME = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|_(?!_))*_$")  # no leading underscore, no dunder
NOT_PARAMS = ("backbone", "cache_dir", "checkpoint_dir")  # never saved: the model, run-local paths
REBUILT = ("backbone_",)  # fitted state rebuilt on loading (rebuild_backbone), never saved
ARRAY_KINDS = "biuf"  # bool, signed and unsigned integers, floats
PROBE_ROWS = 8


def _jsonable(value) -> bool:
    if isinstance(value, SIMPLE):
        return True
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def save_head(head, path: str | Path, model_id: str | None = None, class_names: list[str] | None = None,
              model: str | None = None) -> Path:
    """Write a fitted ``head`` to the folder ``path``; ``model_id`` is that of the features it was fitted on
    (default: its backbone's); ``class_names`` name its classes (default: the head's own ``class_names``);
    ``model`` is the ``--model`` value that loads that model (default: its backbone's ``display_name``)."""
    from safetensors.numpy import save

    entry = head_entry(head)
    fitted = {k: v for k, v in vars(head).items() if k.endswith("_") and not k.startswith("_")}
    if "backbone" in entry.gives:
        if not callable(getattr(head, "rebuild_backbone", None)):
            raise CliplabError(f"{entry.name}: gives a backbone but has no rebuild_backbone, so it cannot be saved")
        fitted = {k: v for k, v in fitted.items() if k not in REBUILT}
    if not fitted:
        raise CliplabError(f"{entry.name}: the head is not fitted; fit it before saving")
    arrays = {k: np.ascontiguousarray(v) for k, v in fitted.items() if isinstance(v, np.ndarray)}
    scalars = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in fitted.items() if k not in arrays}
    bad = [k for k, v in scalars.items() if not _jsonable(v)]
    params = {k: v for k, v in head.get_params(deep=False).items() if k not in NOT_PARAMS}
    bad += [k for k, v in params.items() if not _jsonable(v)]
    if bad:
        raise CliplabError(f"{entry.name}: cannot save {bad[0]!r} (not an array or JSON value)")
    backbone = getattr(head, "backbone", None)
    names = list(class_names or getattr(head, "class_names", None) or [])
    record = {"format": FORMAT, "method": entry.name, "params": params, "fitted": scalars, "class_names": names,
              "model_id": model_id or (backbone.model_id if backbone is not None else None),
              "model": model or getattr(backbone, "display_name", None)}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    payload = save(arrays, metadata={"format": FORMAT}) if arrays else save({"_empty": np.zeros(0)})
    atomic_write(path / "arrays.safetensors", lambda handle: handle.write(payload))
    atomic_write_text(path / "head.json", json.dumps(record, indent=1))
    return path


def saved_class_names(path: str | Path) -> list[str]:
    """The class names a saved head predicts (one per column of its logits)."""
    try:
        names = json.loads((Path(path) / "head.json").read_text()).get("class_names") or []
    except (OSError, ValueError) as exc:
        raise CliplabError(f"{path}: not a saved cliplab head ({exc})") from exc
    if not names:
        raise CliplabError(f"{path}: the saved head records no class names")
    return [str(n) for n in names]


def load_head(path: str | Path, backbone=None, model_id: str | None = None, method: str | None = None):
    """A head saved by :func:`save_head`; ``backbone`` (or ``model_id``) must be the model it was fitted on, and
    ``method``, if given, the method it is.

    The saved files are checked against the schema (module docstring) first; a damaged or crafted head is a
    one-line CliplabError, and nothing from the files is set on the head except checked fitted state. A head that
    gives a Backbone gets its ``backbone_`` rebuilt from ``backbone`` (``rebuild_backbone``).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        record = json.loads((path / "head.json").read_text())
        arrays = load_file(str(path / "arrays.safetensors"))
    except (OSError, ValueError, SafetensorError, RecursionError) as exc:
        raise CliplabError(f"{path}: not a saved cliplab head ({_line(exc)})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CliplabError(f"{path}: unknown head format {found!r}")
    if method is not None and record.get("method") != method:
        raise CliplabError(f"{path}: holds a {record.get('method')!r} head, not {method!r}")
    current = model_id or (backbone.model_id if backbone is not None else None)
    if record.get("model_id") and current and record["model_id"] != current:
        given = record.get("model") if isinstance(record.get("model"), str) else None
        shown = getattr(backbone, "display_name", None)
        hint = ("load it with --model " + given + (" and the options it was fitted with (--seed, --quick-gelu, "
                                                   "--long-positions)" if given == shown else "")
                if given else "load it with the model it was fitted with")
        raise CliplabError(f"{path}: this head was fitted on features of model {record['model_id']}, not "
                           f"{current}; {hint}")
    _check_record(path, record, arrays)
    try:
        head = create_head(record["method"], backbone=backbone, **record["params"])
    except CliplabError as exc:
        raise CliplabError(f"{path}: {exc}") from None
    except Exception as exc:  # a head's __init__ given values of the wrong type
        raise CliplabError(f"{path}: saved parameters do not build {record['method']!r} ({_line(exc)})") from None
    protected = set(head.get_params(deep=False))
    state = {**record["fitted"], **{k: v for k, v in arrays.items() if k != "_empty"}}
    for key in state:
        if hasattr(type(head), key) or key in protected:
            raise CliplabError(f"{path}: saved head would overwrite {key!r} of {record['method']}; refused")
    for key, value in state.items():
        setattr(head, key, value)
    _probe(path, head, record)
    if "backbone" in head_entry(head).gives:
        _rebuild(path, head, backbone)
    return head


def _rebuild(path: Path, head, backbone) -> None:
    """Set ``backbone_`` of a loaded head that gives a Backbone, rebuilt from the base ``backbone``."""
    if backbone is None:
        raise CliplabError(f"{path}: a {head_entry(head).name} head rebuilds its model from the base model: load it "
                           "with the backbone it was fitted on")
    try:
        head.backbone_ = head.rebuild_backbone(backbone)
    except CliplabError as exc:
        raise CliplabError(f"{path}: {exc}") from None
    except Exception as exc:  # saved state of the wrong shape or type
        raise CliplabError(f"{path}: saved head does not rebuild its model ({_line(exc)}); refit and save it "
                           "again") from None


def _finite(value) -> bool:
    """No NaN or infinity anywhere in a JSON value."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _check_record(path: Path, record: dict, arrays: dict[str, np.ndarray]) -> None:
    """Refuse (one line) a head.json / arrays pair that does not follow the saved-head schema."""
    def refuse(why: str) -> CliplabError:
        return CliplabError(f"{path}: damaged or foreign saved head: {why}")

    unknown = sorted(set(record) - RECORD_KEYS)
    if unknown:
        raise refuse(f"unknown key {unknown[0]!r} in head.json")
    if not isinstance(record.get("method"), str):
        raise refuse("no method name")
    for key in ("params", "fitted"):
        if not isinstance(record.get(key), dict):
            raise refuse(f"{key!r} is not a mapping")
    bad = [k for k in record["params"] if not isinstance(k, str) or k in NOT_PARAMS or not k.isidentifier()]
    if bad:
        raise refuse(f"parameter {bad[0]!r} cannot be saved")
    bad = [k for k, v in record["params"].items() if not _finite(v)]
    if bad:
        raise refuse(f"parameter {bad[0]!r} is NaN or infinite")
    names = record.get("class_names") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise refuse("class_names is not a list of distinct strings")
    if record.get("model_id") is not None and not isinstance(record["model_id"], str):
        raise refuse("model_id is not a string")
    if record.get("model") is not None and not isinstance(record["model"], str):
        raise refuse("model is not a string")
    overlap = set(record["fitted"]) & set(arrays)
    if overlap:
        raise refuse(f"{sorted(overlap)[0]!r} is saved twice")
    for key in [*record["fitted"], *(k for k in arrays if k != "_empty")]:
        if not FITTED_NAME.match(key):
            raise refuse(f"{key!r} is not fitted state (names end in one underscore and start with a letter)")
    for key, value in arrays.items():
        if value.dtype.kind not in ARRAY_KINDS:
            raise refuse(f"array {key!r} has dtype {value.dtype}")
    width = record["fitted"].get("n_features_in_")
    if not (isinstance(width, int) and not isinstance(width, bool) and 0 < width <= 1 << 20):
        raise refuse(f"n_features_in_ is {width!r}, not a positive feature width")
    classes = arrays.get("classes_", record["fitted"].get("classes_"))
    if classes is not None:
        count = len(classes) if isinstance(classes, (list, np.ndarray)) and np.ndim(classes) == 1 else None
        if count is None or count == 0:
            raise refuse("classes_ is not a non-empty list")
        if names and count != len(names):
            raise refuse(f"{len(names)} class names for {count} classes")


def _probe(path: Path, head, record: dict) -> None:
    """The rebuilt head's logits on unit vectors: finite, one column per class (its names, else classes_)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(PROBE_ROWS, int(record["fitted"]["n_features_in_"]))).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    try:
        with np.errstate(all="ignore"):
            logits = np.asarray(copy.copy(head).logits(X))  # a copy: state a head caches on first use stays unset
    except Exception as exc:  # shapes that do not fit, state of the wrong type ...
        raise CliplabError(f"{path}: saved head does not compute ({_line(exc)}); refit and save it again") from None
    names = record.get("class_names") or []
    classes = getattr(head, "classes_", None)
    expected = len(names) or (len(classes) if classes is not None else logits.shape[-1])
    if logits.shape != (PROBE_ROWS, expected):
        raise CliplabError(f"{path}: saved head gives {logits.shape[-1] if logits.ndim == 2 else logits.shape} "
                           f"columns for {expected} classes; refit and save it again")
    if not np.isfinite(logits).all():
        raise CliplabError(f"{path}: saved head gives NaN or infinite scores (damaged weights); refit and save it "
                           "again")
