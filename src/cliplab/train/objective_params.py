"""An objective's parameters from text: ``KEY=VALUE`` strings checked against the objective's ``__init__``.

``cliplab pretrain --loss mlcd --loss-param centres=64 --loss-param weight=0.5`` goes through
:func:`parse_objective_params`; a ``PretrainConfig`` built in Python is checked by :func:`check_objective_params`.
Values take the type of the parameter's default (bool: true/false/yes/no/on/off/1/0; int; float; str); a parameter
without a default or with ``None`` reads a Python literal, else the text itself.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from .engine import TrainOptionError, get_objective, list_objectives

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def objective_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters of objective ``name``'s ``__init__`` (an unknown name is one line)."""
    from . import engine

    if name not in list_objectives():
        get_objective(name)  # raises the registry's one line naming the known objectives
    signature = inspect.signature(engine._OBJECTIVES[name].__init__)
    return {key: p for key, p in signature.parameters.items()
            if key != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_objective_params(name: str, params: Mapping[str, Any]) -> None:
    """One line naming the objective's parameters when ``params`` has a key its ``__init__`` does not take."""
    known = objective_parameters(name)
    for key in params:
        if key not in known:
            listed = ", ".join(known) if known else "none"
            raise TrainOptionError(f"objective {name!r} has no parameter {key!r}; its parameters: {listed}")


def parse_objective_params(name: str, items: Iterable[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: typed value}`` for objective ``name``; a malformed item, a repeated or
    unknown key or a value of the wrong type is one line."""
    known = objective_parameters(name)
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TrainOptionError(f"--loss-param {item!r}: write KEY=VALUE")
        if key in params:
            raise TrainOptionError(f"--loss-param {key!r} is given twice")
        check_objective_params(name, {key: None})
        params[key] = _typed(key, text.strip(), known[key].default)
    return params


def _typed(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise TrainOptionError(f"--loss-param {key}={text}: {key} takes true or false (default {default})")
    if isinstance(default, (int, float)):
        kind = type(default)
        try:
            return kind(text)
        except ValueError:
            raise TrainOptionError(f"--loss-param {key}={text}: {key} takes {'an int' if kind is int else 'a float'}"
                                   f" (default {default})") from None
    if isinstance(default, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
