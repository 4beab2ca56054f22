"""The layers of ../shared/DESIGN.md hold: no module imports from a layer above its own, and no head imports another.

The check resolves every way a module can reach another cliplab module: ``import cliplab.x`` (and attribute use of
a bound ``cliplab``), ``from cliplab import x``, relative imports, names a package exports lazily (its literal
``_LAZY`` map), and ``importlib.import_module`` / ``__import__`` calls; a dynamic import it cannot resolve is a
violation unless the module is listed in ``DYNAMIC_OK`` with its reason. Every module under ``src/cliplab`` must
belong to a ranked layer, so a new top-level package fails here until it is ranked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from cliplab.heads.registry import NOT_HEADS

SRC = Path(__file__).resolve().parents[2] / "src" / "cliplab"
# Data flows down these ranks; a module may import from its own layer and the ranks before it. The root package
# (``cliplab/__init__.py``) is rank 0: every module loads it, so it imports nothing eagerly but ``_lazy``.
RANK = {"_lazy": 0, "_sources": 0, "errors": 0, "fileio": 0, "llm": 0, "models": 1, "data": 2, "datasets": 2,
        "features": 3, "train": 4, "heads": 4, "ood": 4, "dense": 4, "search": 4, "regions": 4, "eval": 5,
        "analysis": 5, "service": 6, "cli": 6, "__main__": 6}
ROOT_RANK = 0
# Modules allowed a dynamic import the check cannot resolve, with the reason.
DYNAMIC_OK = {("_lazy",): "imports a submodule of the package that calls lazy_exports (a name relative to it)"}
# heads/ modules that are not heads: the shared code, the registry (which imports every head) and the package.
HEADS_SHARED = {"__init__", *NOT_HEADS}
ANY = "*"  # a statically unknown submodule: ``import_module(f"{__package__}.{name}")``

Module = tuple[str, ...]  # a module's dotted name below ``cliplab``: ("heads", "gda"); () is the root package


def module_of(path: Path, src: Path) -> Module:
    """The dotted name of a source file below the package root ``src``."""
    parts = path.relative_to(src).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def _is_module(parts: Module, src: Path) -> bool:
    here = src.joinpath(*parts) if parts else src
    return bool(parts) and (here.with_suffix(".py").is_file() or (here / "__init__.py").is_file())


def _lazy_map(package: Module, src: Path) -> dict[str, str]:
    """A package's literal ``_LAZY = {name: submodule}`` map (names it exports on first use), else {}."""
    init = src.joinpath(*package, "__init__.py")
    if not init.is_file():
        return {}
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            try:
                return {str(k): str(v) for k, v in ast.literal_eval(node.value).items()}
            except ValueError:
                return {}
    return {}


def _member(package: Module, name: str, src: Path) -> Module:
    """What ``from package import name`` loads: the submodule ``name``, the submodule a lazy export comes from, or
    just the package."""
    if name != "*" and _is_module((*package, name), src):
        return (*package, name)
    lazy = _lazy_map(package, src)
    return (*package, *lazy[name].split(".")) if name in lazy else package


def _absolute(dotted: str) -> Module | None:
    """``cliplab.x.y`` -> ("x", "y"); None for another package."""
    parts = tuple(dotted.split("."))
    return parts[1:] if parts[0] == "cliplab" else None


def _relative(level: int, name: str, package: Module) -> Module | None:
    """``from <level dots><name>`` inside ``package``; None if it climbs out of cliplab."""
    if level - 1 > len(package):
        return None
    base = package[: len(package) - level + 1]
    return (*base, *name.split(".")) if name else base


def _package_of(path: Path, src: Path) -> Module:
    parts = path.relative_to(src).with_suffix("").parts
    return parts[:-1]


def _string_prefix(node: ast.expr, package: Module) -> tuple[str, bool] | None:
    """A module-name argument as (text, complete): a literal, ``__package__``/``__name__``, or an f-string that
    starts with literals or ``__package__`` (then incomplete: the rest is a name known only at run time)."""
    own = ".".join(("cliplab", *package))
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value, True
    if isinstance(node, ast.Name) and node.id == "__package__":
        return own, True
    if isinstance(node, ast.JoinedStr):
        text = ""
        for value in node.values:
            if isinstance(value, ast.Constant):
                text += str(value.value)
            elif isinstance(value.value, ast.Name) and value.value.id == "__package__":
                text += own
            else:
                return text, False
        return text, True
    return None


def _dynamic_target(call: ast.Call, package: Module) -> Module | None | str:
    """The module an ``import_module(name, package)`` / ``__import__(name)`` call loads; "" if not cliplab;
    None if unresolvable. A run-time suffix under a known package gives ``(*package, ANY)``."""
    if not call.args:
        return None
    name = _string_prefix(call.args[0], package)
    anchor = _string_prefix(call.args[1], package) if len(call.args) > 1 else None
    anchor = anchor or next((_string_prefix(k.value, package) for k in call.keywords if k.arg == "package"), None)
    if name is None:
        return None
    text, complete = name
    if not complete:  # only "<known package>." followed by a run-time name can be placed
        if not text.endswith(".") or text.strip(".") == "":
            return None
        text, complete = text[:-1] + "." + ANY, True
    if text.startswith("."):
        if anchor is None or not anchor[1]:
            return None
        level = len(text) - len(text.lstrip("."))
        anchor_parts = _absolute(anchor[0])
        if anchor_parts is None:
            return ""
        target = _relative(level, text.lstrip("."), anchor_parts)
        return target if target is not None else None
    target = _absolute(text)
    return "" if target is None else target


def _is_import_call(node: ast.Call) -> bool:
    func = node.func
    return (isinstance(func, ast.Name) and func.id in ("import_module", "__import__")) or (
        isinstance(func, ast.Attribute) and func.attr == "import_module")


def _attribute_chain(node: ast.Attribute) -> list[str] | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(names)]


def imports_of(path: Path, src: Path) -> tuple[set[Module], list[str]]:
    """The cliplab modules ``path`` imports, and the imports it makes that cannot be resolved statically."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _package_of(path, src)
    found: set[Module] = set()
    unresolved: list[str] = []
    bound_root: set[str] = set()  # names bound to the root package by ``import cliplab[.x]``
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _absolute(alias.name)
                if target is None:
                    continue
                found.add(target)
                if alias.asname is None:
                    bound_root.add("cliplab")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _relative(node.level, node.module or "", package)
                if base is None:
                    unresolved.append(f"line {node.lineno}: relative import above cliplab")
                    continue
            else:
                base = _absolute(node.module) if node.module else None
                if base is None:
                    continue
            found.add(base)
            found.update(_member(base, alias.name, src) for alias in node.names)
        elif isinstance(node, ast.Call) and _is_import_call(node):
            target = _dynamic_target(node, package)
            if target is None:
                unresolved.append(f"line {node.lineno}: {ast.unparse(node)}")
            elif target != "":
                found.add(target)
    for node in ast.walk(tree):  # ``cliplab.eval.evaluate(...)`` after ``import cliplab``
        if isinstance(node, ast.Attribute):
            chain = _attribute_chain(node)
            if chain and chain[0] in bound_root:
                target: Module = ()
                for name in chain[1:]:
                    step = _member(target, name, src)
                    if step == target:
                        break
                    target = step
                if target:
                    found.add(target)
    return found, unresolved


def rank_of(module: Module) -> int | None:
    """The layer rank of a module (None: not in a ranked layer)."""
    return RANK.get(module[0]) if module else ROOT_RANK


def source_modules(src: Path) -> list[Path]:
    return sorted(src.rglob("*.py"))


def violations(path: Path, src: Path) -> list[str]:
    """Why ``path`` breaks the layering: an unranked module, an import from a higher rank or an unranked module,
    a head importing another head, or an unresolvable dynamic import."""
    own = module_of(path, src)
    name = ".".join(("cliplab", *own))
    own_rank = rank_of(own)
    if own_rank is None:
        return [f"{name} is in no ranked layer (add its top-level package to RANK)"]
    found, unresolved = imports_of(path, src)
    problems = [f"{name}: dynamic import the check cannot resolve, {u}" for u in unresolved
                if own not in DYNAMIC_OK]
    for target in sorted(found):
        target_rank = rank_of(target)
        shown = ".".join(("cliplab", *target))
        if target_rank is None:
            problems.append(f"{name} (rank {own_rank}) imports {shown}, which is in no ranked layer")
        elif target_rank > own_rank:
            problems.append(f"{name} (rank {own_rank}) imports {shown} (rank {target_rank}) from a layer above")
    if own[:1] == ("heads",) and len(own) > 1 and own[1] != "registry":  # the registry loads every head
        others = sorted(t for t in found if t[:1] == ("heads",) and len(t) > 1 and t[1] not in HEADS_SHARED
                        and t[1] != own[1])
        problems += [f"{name} imports the head {'.'.join(('cliplab', *t))} (heads never import other heads)"
                     for t in others]
    return problems


def tree_violations(src: Path) -> list[str]:
    return [problem for path in source_modules(src) for problem in violations(path, src)]


MODULES = source_modules(SRC)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_module_imports_only_from_its_layer_or_below(path):
    assert not violations(path, SRC)


def test_the_layer_check_sees_the_real_imports():
    assert ("features", "text") in imports_of(SRC / "heads" / "base.py", SRC)[0]
    assert any(t[:1] == ("heads",) for t in imports_of(SRC / "eval" / "evaluate.py", SRC)[0])
    assert ("heads", ANY) in imports_of(SRC / "heads" / "registry.py", SRC)[0]  # it loads every head
    assert len(MODULES) > 50


# Synthetic trees: each case is a hole the first version of this check had (it passed all of them).

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "cliplab"
    for name in ("__init__.py", "models/__init__.py", "eval/__init__.py", "heads/__init__.py", "heads/registry.py",
                 "heads/base.py"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("")
    (src / "eval" / "evaluate.py").write_text("")
    (src / "__init__.py").write_text('_LAZY = {"evaluate": "eval", "load_model": "models"}\n')
    (src / "heads" / "__init__.py").write_text('_LAZY = {"GDA": "gda"}\nfrom .registry import register\n')
    (src / "heads" / "gda.py").write_text("from .base import X\nfrom .registry import register\n")
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    return src


UPWARD = {  # each line in models/a.py (rank 1) reaches eval (rank 5)
    "import": "import cliplab.eval.evaluate\n",
    "import-as": "import cliplab.eval as ev\n",
    "from-root": "from cliplab import eval\n",
    "from-root-lazy-name": "from cliplab import evaluate\n",
    "relative-root-lazy-name": "from .. import evaluate\n",
    "attribute-of-bound-root": "import cliplab\n\ndef f():\n    return cliplab.eval.evaluate\n",
    "attribute-lazy-name": "import cliplab.models\n\ndef f():\n    return cliplab.evaluate()\n",
    "import_module": "import importlib\nimportlib.import_module('cliplab.eval.evaluate')\n",
    "import_module-relative": "import importlib\nimportlib.import_module('..eval', __package__)\n",
    "import_module-from-import": "from importlib import import_module\nimport_module('.evaluate', 'cliplab.eval')\n",
    "__import__": "__import__('cliplab.eval')\n",
    "f-string": "import importlib\nimportlib.import_module(f'cliplab.eval.{1}')\n",
}


@pytest.mark.parametrize("line", UPWARD.values(), ids=UPWARD.keys())
def test_an_upward_import_is_seen_however_it_is_written(tmp_path, line):
    src = _tree(tmp_path, {"models/a.py": line})
    problems = violations(src / "models" / "a.py", src)
    assert any("imports cliplab.eval" in p and "from a layer above" in p for p in problems), problems


def test_a_downward_import_passes_however_it_is_written(tmp_path):
    lines = ["import cliplab.models", "from cliplab import models", "from .. import load_model",
             "import importlib", "importlib.import_module('..models', __package__)", "from .. import __version__"]
    src = _tree(tmp_path, {"eval/a.py": "\n".join(lines) + "\n"})
    assert violations(src / "eval" / "a.py", src) == []


SIBLING = {  # each line in heads/tip.py reaches the head heads/gda.py
    "from-dot": "from . import gda\n",
    "from-dot-module": "from .gda import GaussianDiscriminant\n",
    "from-package-lazy-name": "from . import GDA\n",
    "absolute": "from cliplab.heads import gda\n",
    "import": "import cliplab.heads.gda\n",
    "import_module": "import importlib\nimportlib.import_module('.gda', __package__)\n",
    "import_module-run-time-name": "import importlib\nname = 'gda'\nimportlib.import_module(f'{__package__}.{name}')\n",
}


@pytest.mark.parametrize("line", SIBLING.values(), ids=SIBLING.keys())
def test_a_head_importing_another_head_is_seen(tmp_path, line):
    src = _tree(tmp_path, {"heads/tip.py": line})
    problems = violations(src / "heads" / "tip.py", src)
    assert any("heads never import other heads" in p for p in problems), problems


def test_heads_may_import_the_shared_modules_and_the_registry_may_load_every_head(tmp_path):
    shared = "from .base import X\nfrom .registry import register\nfrom . import saving\nfrom . import register\n"
    loader = "import importlib\nimportlib.import_module(f'{__package__}.{name}')\n"
    src = _tree(tmp_path, {"heads/tip.py": shared, "heads/saving.py": "", "heads/registry.py": loader})
    assert violations(src / "heads" / "tip.py", src) == []
    assert violations(src / "heads" / "registry.py", src) == []


@pytest.mark.parametrize("name", ["newlayer/__init__.py", "newlayer/x.py", "helpers.py"])
def test_a_module_outside_the_ranked_layers_fails(tmp_path, name):
    src = _tree(tmp_path, {name: ""})
    assert any("no ranked layer" in p for p in tree_violations(src))


def test_importing_an_unranked_module_fails(tmp_path):
    src = _tree(tmp_path, {"helpers.py": "", "models/a.py": "from ..helpers import x\n"})
    assert any("cliplab.helpers, which is in no ranked layer" in p for p in violations(src / "models" / "a.py", src))


def test_a_dynamic_import_that_cannot_be_resolved_fails(tmp_path):
    source = "import importlib\n\ndef f(name):\n    return importlib.import_module(name)\n"
    src = _tree(tmp_path, {"models/a.py": source})
    assert any("cannot resolve" in p for p in violations(src / "models" / "a.py", src))


# Libraries that cost start-up time (scipy alone is over a second of CPU here): the command line loads none of them.
HEAVY = ("torch", "open_clip", "torchvision", "transformers", "scipy", "sklearn", "faiss", "ray", "pyarrow",
         "matplotlib")


def test_cli_app_starts_without_heavy_libraries():
    code = f"import sys, cliplab.cli.app; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
