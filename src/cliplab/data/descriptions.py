"""Class-description sets: CuPL's ``{class: [sentences]}`` and DCLIP's ``{class: [descriptor phrases]}``.

Both papers release the same JSON shape (a mapping of class name to a list of strings); CuPL's large files are
gzipped (``.json.gz``). Loading checks the shape and, given the labels, that every label has descriptions and
every described class is a label (names compared loosely: case, underscores and repeated spaces are ignored,
as :func:`cliplab.data.prompts.class_prompts` does). Errors are one :class:`DescriptionError` line naming the file.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import DescriptionError
from ..fileio import atomic_write
from .prompts import _loose

Descriptions = dict[str, list[str]]


def read_descriptions(path: str | Path) -> Descriptions:
    """The mapping in a ``.json`` or ``.json.gz`` file, checked to be ``{str: [str, ...]}`` with no empty list."""
    path = Path(path)
    if not path.is_file():
        raise DescriptionError(f"{path}: description file not found")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the suffix says
            raw = gzip.decompress(raw)
        data = json.loads(raw.decode("utf-8"))
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise DescriptionError(f"{path}: unreadable description file ({exc})") from exc
    except ValueError as exc:
        raise DescriptionError(f"{path}: not valid JSON ({exc})") from exc
    return check_descriptions(data, str(path))


def check_descriptions(data: object, source: str = "descriptions", allow_empty: bool = False) -> Descriptions:
    """``data`` as a plain ``{class: [strings]}`` dict; reject other shapes, empty lists, loosely equal keys and a
    class whose descriptions are all blank (they would embed "cat, which has  "). ``allow_empty`` lets a class
    map to empty strings only (``[""]``: no descriptor, the template prompt alone, as DCLIP's code uses for a
    class without descriptions); only in-memory mappings get it (:func:`load_descriptions`), never files."""
    if not isinstance(data, Mapping):
        raise DescriptionError(f"{source}: expected a JSON object {{class name: [descriptions]}}, "
                               f"got {type(data).__name__}")
    out: Descriptions = {}
    seen: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key.strip():
            raise DescriptionError(f"{source}: class name {key!r} is not a non-empty string")
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise DescriptionError(f"{source}: class {key!r} must map to a list of strings, "
                                   f"got {type(value).__name__}")
        if not value:
            raise DescriptionError(f"{source}: class {key!r} has no descriptions")
        bad = next((item for item in value if not isinstance(item, str)), None)
        if bad is not None:
            raise DescriptionError(f"{source}: class {key!r} has a description that is not a string: {bad!r}")
        if not any(item.strip() for item in value) and not (allow_empty and not any(value)):
            raise DescriptionError(f"{source}: class {key!r} has only blank descriptions")
        if _loose(key) in seen:
            raise DescriptionError(f"{source}: classes {seen[_loose(key)]!r} and {key!r} are the same name")
        seen[_loose(key)] = key
        out[key] = list(value)
    if not out:
        raise DescriptionError(f"{source}: no classes described")
    return out


def match_labels(descriptions: Mapping[str, Sequence[str]], labels: Sequence[str], source: str = "descriptions",
                 subset: bool = False) -> Descriptions:
    """``{label: descriptions}`` in label order; keys match a label exactly, else loosely.

    A label without descriptions is an error; so is a described class that is not a label, unless ``subset``
    (then the file may cover more classes than asked for, as DCLIP's ``classes_to_load``).
    """
    by_loose = {_loose(key): key for key in descriptions}
    out: Descriptions = {}
    for label in labels:
        key = label if label in descriptions else by_loose.get(_loose(label))
        if key is None:
            raise DescriptionError(f"{source}: no descriptions for label {label!r}")
        out[label] = list(descriptions[key])
    if not subset:
        wanted = {_loose(label) for label in labels}
        extra = [key for key in descriptions if _loose(key) not in wanted]
        if extra:
            raise DescriptionError(f"{source}: class {extra[0]!r} is not among the labels"
                                   + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return out


def load_descriptions(source: str | Path | Mapping[str, Sequence[str]], labels: Sequence[str] | None = None,
                      subset: bool = False) -> Descriptions:
    """A description set from a file (``.json``/``.json.gz``) or a mapping, checked; with ``labels``, keyed by
    label in label order (see :func:`match_labels`)."""
    if isinstance(source, Mapping):
        name = "descriptions"
        data = check_descriptions(source, name, allow_empty=True)
    else:
        name = str(source)
        data = read_descriptions(source)
    return data if labels is None else match_labels(data, list(labels), name, subset)


def save_descriptions(descriptions: Mapping[str, Sequence[str]], path: str | Path) -> Path:
    """Write a description set atomically as JSON (gzipped, reproducibly, when ``path`` ends in ``.gz``)."""
    path = Path(path)
    data = check_descriptions(descriptions, str(path))
    raw = (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    if path.suffix == ".gz":
        raw = gzip.compress(raw, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda handle: handle.write(raw))
