"""Analysis registry: an analysis registers its entry function by name, with its paper and the command that runs it.

``@register_analysis("sce", paper=20, command="cliplab analyse sce")`` on a module-level function of a module in
``cliplab/analysis/`` is all a new analysis needs to appear in ``cliplab methods``: :func:`list_analyses` imports
every module of the package on first use (they import only numpy at load time, so the listing stays light) and
returns the registrations sorted by name. The summary is the first line of the function's docstring.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CliplabError

NOT_ANALYSES = frozenset({"registry"})


@dataclass(frozen=True)
class AnalysisEntry:
    """A registered analysis: its name, paper number, the command that runs it, the function and a summary."""

    name: str
    paper: int | None
    command: str
    function: Callable
    summary: str


_REGISTRY: dict[str, AnalysisEntry] = {}
_LOADED = False


def register_analysis(name: str, *, paper: int | None, command: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``function`` as the analysis ``name`` (one per name; a second one is an error)."""

    def decorate(function: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name].function is not function:
            raise CliplabError(f"analysis {name!r} is registered twice")
        doc = inspect.getdoc(function) or ""
        _REGISTRY[name] = AnalysisEntry(name, paper, command, function, doc.splitlines()[0] if doc else "")
        return function

    return decorate


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    folder = Path(__file__).resolve().parent
    for module in pkgutil.iter_modules([str(folder)]):
        if module.name not in NOT_ANALYSES and not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")
    _LOADED = True


def list_analyses() -> list[AnalysisEntry]:
    """Every registered analysis, sorted by name (imports the package's modules on first use)."""
    _load()
    return sorted(_REGISTRY.values(), key=lambda entry: entry.name)


def analysis_entry(name: str) -> AnalysisEntry:
    """The registration of ``name``; an unknown name is one line listing the known ones."""
    _load()
    if name not in _REGISTRY:
        raise CliplabError(f"no analysis {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
