"""Save and load fitted heads: safetensors for arrays, JSON for everything else; nothing is pickled.

A saved head is a folder with ``head.json`` (method name, hyperparameters, scalar fitted state, class
names, the feature model's id) and ``arrays.safetensors`` (the fitted arrays). Loading rebuilds the head
with ``create_head`` and refuses a backbone whose ``model_id`` differs from the one the head was fitted on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import CliplabError
from ..fileio import atomic_write, atomic_write_text
from .registry import create_head, head_entry

FORMAT = "cliplab-head/1"
SIMPLE = (str, int, float, bool, type(None))


def _jsonable(value) -> bool:
    if isinstance(value, SIMPLE):
        return True
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def save_head(head, path: str | Path, model_id: str | None = None, class_names: list[str] | None = None) -> Path:
    """Write a fitted ``head`` to the folder ``path``; ``model_id`` is that of the features it was fitted on
    (default: its backbone's); ``class_names`` name its classes (default: the head's own ``class_names``)."""
    from safetensors.numpy import save

    entry = head_entry(head)
    fitted = {k: v for k, v in vars(head).items() if k.endswith("_") and not k.startswith("_")}
    if not fitted:
        raise CliplabError(f"{entry.name}: the head is not fitted; fit it before saving")
    arrays = {k: np.ascontiguousarray(v) for k, v in fitted.items() if isinstance(v, np.ndarray)}
    scalars = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in fitted.items() if k not in arrays}
    bad = [k for k, v in scalars.items() if not _jsonable(v)]
    params = {k: v for k, v in head.get_params(deep=False).items() if k not in ("backbone", "cache_dir")}
    bad += [k for k, v in params.items() if not _jsonable(v)]
    if bad:
        raise CliplabError(f"{entry.name}: cannot save {bad[0]!r} (not an array or JSON value)")
    backbone = getattr(head, "backbone", None)
    names = list(class_names or getattr(head, "class_names", None) or [])
    record = {"format": FORMAT, "method": entry.name, "params": params, "fitted": scalars, "class_names": names,
              "model_id": model_id or (backbone.model_id if backbone is not None else None)}
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


def load_head(path: str | Path, backbone=None, model_id: str | None = None):
    """A head saved by :func:`save_head`; ``backbone`` (or ``model_id``) must be the model it was fitted on."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        record = json.loads((path / "head.json").read_text())
        arrays = load_file(str(path / "arrays.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CliplabError(f"{path}: not a saved cliplab head ({exc})") from exc
    if record.get("format") != FORMAT:
        raise CliplabError(f"{path}: unknown head format {record.get('format')!r}")
    current = model_id or (backbone.model_id if backbone is not None else None)
    if record.get("model_id") and current and record["model_id"] != current:
        raise CliplabError(f"{path}: this head was fitted on features of model {record['model_id']}, not "
                           f"{current}; load it with that model")
    head = create_head(record["method"], backbone=backbone, **record["params"])
    for key, value in record["fitted"].items():
        setattr(head, key, value)
    for key, value in arrays.items():
        if key != "_empty":
            setattr(head, key, value)
    return head
