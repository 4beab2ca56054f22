"""Dense (segmentation) method registry: a method registers by name when its module is imported.

``@register_dense("maskclip", paper=..., needs=("tower", "text_weights"))`` on a
:class:`~cliplab.dense.base.DenseMethod` subclass is all a new method needs: the registry imports every module of
``cliplab/dense/`` on first use, ``create_dense`` builds it by name with its parameters (the keyword arguments of
its ``__init__``), and ``cliplab segment`` / ``segment-eval`` give it what it declared, never knowing its name.
``describe_dense`` reads the same facts from the source without importing (help texts start without torch).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from .._sources import decorated_classes, first_doc_line, literal_arguments
from ..errors import CliplabError

NOT_METHODS = {"base", "registry", "inference", "guidance"}
#: What a dense method may declare it reads (``cliplab.dense.base.DenseContext`` carries each):
#: ``text_weights`` (d, C) class text weights (the templates' prompt ensemble, L2-normalised columns);
#: ``tower``        the backbone's ViT image tower block by block (``cliplab.models.dense.dense_tower``);
#: ``guidance``     a guidance encoder (images -> (n, g, h, w) features) for correlation pooling, or None.
NEEDS = ("text_weights", "tower", "guidance")


@dataclass(frozen=True)
class DenseEntry:
    """A registered dense method and its facts."""

    name: str
    cls: type
    paper: str | int | None
    needs: frozenset[str]
    params: tuple[tuple[str, object], ...]
    summary: str


_REGISTRY: dict[str, DenseEntry] = {}
_LOADED = False


def _check_needs(name: str, needs) -> frozenset[str]:
    needs = frozenset(needs)
    unknown = sorted(needs - set(NEEDS))
    if unknown:
        raise CliplabError(f"dense method {name!r} declares unknown needs {unknown}; known: {', '.join(NEEDS)}")
    return needs


def _params_of(init) -> tuple[tuple[str, object], ...]:
    if init is object.__init__:
        return ()
    out = []
    for p in list(inspect.signature(init).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            raise CliplabError(f"{init.__qualname__}: a dense method's parameters are keyword arguments with defaults")
        out.append((p.name, p.default))
    return tuple(out)


def register_dense(name: str, *, paper: str | int | None = None, needs=("tower", "text_weights")):
    """Class decorator: ``@register_dense("maskclip", paper="Zhou et al. 2022", needs=("tower", "text_weights"))``."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls.__qualname__ != cls.__qualname__:
            raise CliplabError(f"dense method {name!r} is already registered by {_REGISTRY[name].cls.__name__}")
        declared = _check_needs(name, needs)
        doc = (cls.__doc__ or "").strip()
        _REGISTRY[name] = DenseEntry(name, cls, paper, declared, _params_of(cls.__init__),
                                     doc.splitlines()[0] if doc else "")
        cls.name = name
        cls.needs = declared
        return cls

    return decorate


def load_all() -> None:
    """Import every module of ``cliplab.dense`` once, so that each registers its methods."""
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in NOT_METHODS and not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")
    _LOADED = True


def dense_entry(name: str) -> DenseEntry:
    load_all()
    if name not in _REGISTRY:
        raise CliplabError(f"unknown segmentation method {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_dense() -> list[DenseEntry]:
    load_all()
    return sorted(_REGISTRY.values(), key=lambda e: e.name)


def create_dense(name: str, **params):
    """Build the method registered as ``name``; an unknown parameter is an error naming the ones it takes."""
    entry = dense_entry(name)
    accepted = [key for key, _ in entry.params]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
        raise CliplabError(f"segmentation method {name!r} takes no parameter {unknown[0]!r}; {takes}")
    return entry.cls(**params)


def describe_dense() -> list[tuple[str, str]]:
    """``(name, summary)`` of every method, read from the source without importing (falls back to importing)."""
    if not _LOADED:
        decorated = decorated_classes(Path(__file__).resolve().parent, NOT_METHODS, "register_dense")
        if decorated is not None:
            found = []
            for cls, decorator, _ in decorated:
                arguments = literal_arguments(decorator, register_dense)
                if arguments is None:
                    break
                found.append((arguments["name"], first_doc_line(cls)))
            else:
                return sorted(found)
    return [(e.name, e.summary) for e in list_dense()]


def dense_method_names() -> list[str]:
    return [name for name, _ in describe_dense()]
