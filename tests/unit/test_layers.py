"""The layers of ../shared/DESIGN.md hold: no module imports from a layer above its own."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "cliplab"
# Data flows down these ranks; a module may import from its own layer and the ranks before it.
RANK = {"errors": 0, "fileio": 0, "llm": 0, "models": 1, "data": 2, "datasets": 2, "features": 3, "train": 4,
        "heads": 4, "ood": 4, "search": 4, "eval": 5,
        "service": 6, "cli": 6}


def _layer(path: Path) -> str | None:
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[0] if parts[0] in RANK else None


def _imported_layers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    package = path.relative_to(SRC).parent.parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1]) if node.level <= len(package) + 1 else []
                target = base + (node.module.split(".") if node.module else [])
                if not target and node.level == len(package) + 1:
                    target = [alias.name for alias in node.names]
            elif node.module and node.module.startswith("cliplab."):
                target = node.module.split(".")[1:]
            else:
                continue
            if target and target[0] in RANK:
                found.add(target[0])
    return found


MODULES = [p for p in sorted(SRC.rglob("*.py")) if _layer(p)]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_module_imports_only_from_its_layer_or_below(path):
    own = _layer(path)
    above = {layer for layer in _imported_layers(path) if RANK[layer] > RANK[own]}
    assert not above, f"{path.relative_to(SRC)} ({own}) imports from a layer above: {sorted(above)}"


def test_the_layer_check_sees_relative_imports():
    assert "features" in _imported_layers(SRC / "heads" / "zeroshot.py")
    assert "heads" in _imported_layers(SRC / "eval" / "evaluate.py")


def test_heads_never_import_other_heads():
    heads = {p.stem for p in (SRC / "heads").glob("*.py")} - {"__init__", "base", "registry"}
    for path in (SRC / "heads").glob("*.py"):
        if path.stem in heads:
            text = path.read_text()
            others = [h for h in heads - {path.stem} if f"from .{h} import" in text or f"heads.{h}" in text]
            assert not others, f"{path.name} imports the heads {others}"


def test_cli_app_starts_without_torch():
    code = "import sys, cliplab.cli.app; print('torch' in sys.modules, 'open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
