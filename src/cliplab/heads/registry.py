"""Head registry: methods register by name when their module is imported, as timm and open_clip register models.

``@register("ncm", family="fewshot", needs_train=True)`` on a head class is all a new method needs:
the registry imports every module in ``cliplab/heads/`` on first use, ``create_head`` builds it by name,
and the generic evaluation, the CLI and ``cliplab methods`` find it. ``describe_heads`` reads the same
facts from the modules' source without importing them (``cliplab methods`` starts without scikit-learn
or torch).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import CliplabError

NOT_HEADS = {"base", "registry", "saving"}


@dataclass(frozen=True)
class HeadEntry:
    """A registered head class, its family, paper, and what it needs to be built and fitted."""

    name: str
    cls: type
    family: str
    paper: int | None
    summary: str
    needs_train: bool  # fit needs labelled training features
    needs_backbone: bool  # __init__ takes the Backbone (text encoder, or training through the encoders)


@dataclass(frozen=True)
class HeadSummary:
    """What ``cliplab methods`` shows of a head: a ``HeadEntry`` without the class."""

    name: str
    family: str
    paper: int | None
    summary: str
    needs_train: bool
    needs_backbone: bool


_REGISTRY: dict[str, HeadEntry] = {}
_LOADED = False


def register(name: str, family: str, paper: int | None = None, *, needs_train: bool = True,
             needs_backbone: bool | None = None):
    """Class decorator: ``@register("zeroshot", family="zeroshot", needs_train=False)``.

    ``needs_backbone`` defaults to whether ``__init__`` takes a ``backbone`` argument.
    """

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls.__qualname__ != cls.__qualname__:
            raise CliplabError(f"head name {name!r} is already registered by {_REGISTRY[name].cls.__name__}")
        takes_backbone = "backbone" in inspect.signature(cls.__init__).parameters
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[name] = HeadEntry(name, cls, family, paper, summary, needs_train,
                                    takes_backbone if needs_backbone is None else needs_backbone)
        cls._registered_name = name
        return cls

    return decorate


def load_all() -> None:
    """Import every module of ``cliplab.heads`` once, so that each registers its heads."""
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in NOT_HEADS and not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")
    _LOADED = True


def head_entry(name_or_head) -> HeadEntry:
    """The entry of a registered name, head class or head instance."""
    load_all()
    if isinstance(name_or_head, str):
        if name_or_head not in _REGISTRY:
            raise CliplabError(f"unknown method {name_or_head!r}; known: {', '.join(sorted(_REGISTRY))}")
        return _REGISTRY[name_or_head]
    cls = name_or_head if isinstance(name_or_head, type) else type(name_or_head)
    for entry in _REGISTRY.values():
        if entry.cls is cls:
            return entry
    raise CliplabError(f"{cls.__name__} is not a registered head")


def get_head(name: str) -> type:
    """The head class registered as ``name``."""
    return head_entry(name).cls


def list_heads(family: str | None = None) -> list[HeadEntry]:
    """Registered heads, optionally of one family, sorted by name."""
    load_all()
    return sorted((e for e in _REGISTRY.values() if family in (None, e.family)), key=lambda e: e.name)


def create_head(name: str, *, backbone=None, class_names=None, **params):
    """Build the head registered as ``name``; ``backbone`` and ``class_names`` go to heads that take them.

    Unknown parameters are an error naming the ones the head takes.
    """
    entry = head_entry(name)
    accepted = [p for p in inspect.signature(entry.cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise CliplabError(f"method {name!r} takes no parameter {unknown[0]!r}; it takes {', '.join(accepted)}")
    if entry.needs_backbone and backbone is None:
        raise CliplabError(f"method {name!r} needs a backbone (a loaded model)")
    given = {"backbone": backbone, "class_names": class_names}
    params.update({key: value for key, value in given.items() if key in accepted and value is not None})
    return entry.cls(**params)


def describe_heads(family: str | None = None) -> list[HeadSummary]:
    """``list_heads`` without importing the heads: the ``@register(...)`` facts read from their source.

    Once the heads are loaded, or where a module's registration cannot be read statically (arguments that
    are not literals, a class without its own ``__init__``, a file that is not plain source), this is
    ``list_heads``. Either way the summaries equal the registry's (a test compares them).
    """
    if not _LOADED:
        found = _scan_sources()
        if found is not None:
            return sorted((s for s in found if family in (None, s.family)), key=lambda s: s.name)
    return [HeadSummary(e.name, e.family, e.paper, e.summary, e.needs_train, e.needs_backbone)
            for e in list_heads(family)]


def _scan_sources() -> list[HeadSummary] | None:
    """Every ``@register(...)`` class in the package's modules, or None where one cannot be read statically."""
    folder = Path(__file__).resolve().parent
    found: list[HeadSummary] = []
    for module in pkgutil.iter_modules([str(folder)]):
        if module.name in NOT_HEADS or module.name.startswith("_"):
            continue
        path = folder / f"{module.name}.py"
        if module.ispkg or not path.is_file():
            return None
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            return None
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for decorator in node.decorator_list:
                    if _is_register_call(decorator):
                        summary = _summary_of(node, decorator)
                        if summary is None:
                            return None
                        found.append(summary)
    return found


def _is_register_call(node: ast.expr) -> bool:
    func = node.func if isinstance(node, ast.Call) else node
    return (isinstance(func, ast.Name) and func.id == "register") or (
        isinstance(func, ast.Attribute) and func.attr == "register")


def _summary_of(cls: ast.ClassDef, decorator: ast.expr) -> HeadSummary | None:
    """The registry's facts for one decorated class, as ``register`` would compute them; None if not literal."""
    if not isinstance(decorator, ast.Call) or any(isinstance(a, ast.Starred) for a in decorator.args):
        return None
    try:
        args = [ast.literal_eval(a) for a in decorator.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in decorator.keywords if k.arg is not None}
        if len(kwargs) != len(decorator.keywords):
            return None
        bound = inspect.signature(register).bind(*args, **kwargs)
    except (ValueError, TypeError, SyntaxError):
        return None
    bound.apply_defaults()
    params = bound.arguments
    needs_backbone = params["needs_backbone"]
    if needs_backbone is None:
        init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is None:
            return None  # inherited __init__: only the class itself can tell
        spec = init.args
        names = [a.arg for a in [*spec.posonlyargs, *spec.args, spec.vararg, *spec.kwonlyargs, spec.kwarg] if a]
        needs_backbone = "backbone" in names
    doc = ast.get_docstring(cls, clean=False)
    summary = doc.strip().splitlines()[0] if doc and doc.strip() else ""
    return HeadSummary(params["name"], params["family"], params["paper"], summary, params["needs_train"],
                       needs_backbone)
