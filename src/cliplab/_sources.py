"""Reading registrations from source without importing: what ``cliplab methods`` and the help texts use, so the
command line starts without torch or scipy. Shared by the head and OOD-score registries."""

from __future__ import annotations

import ast
import inspect
import pkgutil
from collections.abc import Callable, Collection
from pathlib import Path

Decorated = tuple[ast.ClassDef, ast.expr, dict[str, ast.ClassDef]]


def decorated_classes(folder: Path, skip: Collection[str], decorator: str) -> list[Decorated] | None:
    """``(class, decorator, the module's top-level classes)`` for every class decorated with ``decorator`` (a name
    or an attribute of that name) in the package ``folder``'s modules, less ``skip`` and private ones; None where a
    module cannot be read statically (a subpackage, not plain source)."""
    found: list[Decorated] = []
    for module in pkgutil.iter_modules([str(folder)]):
        if module.name in skip or module.name.startswith("_"):
            continue
        path = folder / f"{module.name}.py"
        if module.ispkg or not path.is_file():
            return None
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            return None
        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                found += [(node, d, classes) for d in node.decorator_list if _calls(d, decorator)]
    return found


def _calls(node: ast.expr, name: str) -> bool:
    func = node.func if isinstance(node, ast.Call) else node
    return (isinstance(func, ast.Name) and func.id == name) or (isinstance(func, ast.Attribute) and func.attr == name)


def literal_arguments(decorator: ast.expr, function: Callable) -> dict | None:
    """The arguments of a decorator call bound to ``function``'s signature with defaults applied, None where they
    are not all literals (or do not bind)."""
    if not isinstance(decorator, ast.Call) or any(isinstance(a, ast.Starred) for a in decorator.args):
        return None
    try:
        args = [ast.literal_eval(a) for a in decorator.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in decorator.keywords if k.arg is not None}
        if len(kwargs) != len(decorator.keywords):
            return None
        bound = inspect.signature(function).bind(*args, **kwargs)
    except (ValueError, TypeError, SyntaxError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def first_doc_line(cls: ast.ClassDef) -> str:
    """The first line of a class's docstring, as a registry's summary."""
    doc = ast.get_docstring(cls, clean=False)
    return doc.strip().splitlines()[0] if doc and doc.strip() else ""
