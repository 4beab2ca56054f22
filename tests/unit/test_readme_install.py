"""The README's install section matches pyproject.toml: the CPU-only route pins the same torch/torchvision pair,
and every extra is listed with every package it installs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]


def test_cpu_only_route_installs_the_pinned_pair_from_the_cpu_wheels():
    readme = (ROOT / "README.md").read_text()
    pins = {_name(r): r for r in _project()["dependencies"] if _name(r) in ("torch", "torchvision")}
    assert set(pins) == {"torch", "torchvision"} and all("==" in r for r in pins.values())
    lines = [line for line in readme.splitlines() if "--index-url https://download.pytorch.org/whl/cpu" in line]
    assert len(lines) == 1, "one CPU-only install line"
    assert lines[0].split() == ["pip", "install", pins["torch"], pins["torchvision"], "--index-url",
                                "https://download.pytorch.org/whl/cpu"]
    install_section = readme[readme.index(lines[0]):]
    assert 'pip install -e ".[test]"' in install_section.split("```")[0]  # cliplab after torch, same block


def test_every_extra_is_explained_with_its_packages():
    readme = (ROOT / "README.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z]+)` \| ([^|]+) \|", readme, re.MULTILINE)}
    extras = _project()["optional-dependencies"]
    assert set(extras) <= set(rows), f"extras missing from the README table: {set(extras) - set(rows)}"
    for extra, requirements in extras.items():
        for requirement in requirements:
            name = _name(requirement).lower()
            assert name.replace("-", "").replace("_", "") in rows[extra].lower().replace("-", "").replace(" ", ""), \
                (extra, name)
