"""``cliplab models|methods|templates|datasets``: what cliplab knows.

Each starts without torch except ``models``, which lists open_clip's own registry.
"""

from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from ..errors import CliplabError
from .common import DATA_OPTIONS, console, friendly_errors


@friendly_errors
def models(arch: str = typer.Argument(None, help="Only this architecture, or those whose name contains it "
                                                 "(case-insensitive), e.g. ViT-B-32 or convnext.")):
    """open_clip architectures and their pretrained tags (also: 'tiny', hf-hub:ORG/REPO, local paths)."""
    import open_clip

    tags: dict[str, list[str]] = {}
    for name, tag in open_clip.list_pretrained():
        tags.setdefault(name, []).append(tag)
    rows = {name: ", ".join(tags.get(name, [])) or "(random only)" for name in open_clip.list_models()}
    rows["tiny"] = "random weights, built in-process (tests and try-outs)"
    chosen = _matching(list(rows), arch)
    if not chosen:
        close = difflib.get_close_matches(arch, list(rows), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; cliplab models lists them all"
        raise CliplabError(f"no architecture matches {arch!r}{hint}")
    table = Table(title="models: ARCH[:TAG], 'tiny', hf-hub:ORG/REPO, or a local path")
    table.add_column("architecture")
    table.add_column("pretrained tags")
    for name in chosen:
        table.add_row(name, rows[name])
    console.print(table)


def _matching(names: list[str], pattern: str | None) -> list[str]:
    """All names; else the one equal to ``pattern`` (ignoring case); else those containing it."""
    if pattern is None:
        return names
    wanted = pattern.lower()
    exact = [n for n in names if n.lower() == wanted]
    return exact or [n for n in names if wanted in n.lower()]


@dataclass(frozen=True)
class ObjectiveSummary:
    """What ``cliplab methods`` shows of a training objective, read from the source without importing it."""

    name: str
    paper: int | None
    module: str
    params: tuple[tuple[str, str], ...]
    summary: str


_PAPER = re.compile(r"\bpaper (\d+)")
SUMMARY_CHARS = 120


def describe_objectives(package: Path | None = None) -> list[ObjectiveSummary]:
    """Every class decorated ``@register_objective("name")`` in the cliplab package (or ``package``), sorted by name,
    read from source (no torch): the paper is the first "paper N" of the class docstring, else of the module
    docstring, else that of the head registered under the same name; the parameters are ``__init__``'s keyword
    arguments with their defaults as written; the summary is the docstring's first sentence."""
    from ..heads import describe_heads

    root = package or Path(__file__).resolve().parents[1]
    head_papers = {entry.name: entry.paper for entry in describe_heads()} if package is None else {}
    found: dict[str, ObjectiveSummary] = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if "register_objective(" not in text:
            continue
        tree = ast.parse(text)
        module_paper = _PAPER.search(ast.get_docstring(tree) or "")
        dotted = ".".join(path.relative_to(root).with_suffix("").parts)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for decorator in node.decorator_list:
                name = _objective_name(decorator)
                if name is None:
                    continue
                doc = ast.get_docstring(node) or ""
                paper = _PAPER.search(doc) or module_paper
                number = int(paper.group(1)) if paper else head_papers.get(name)
                found[name] = ObjectiveSummary(name, number, dotted, _init_params(node), _first_sentence(doc))
    return [found[name] for name in sorted(found)]


def _first_sentence(doc: str) -> str:
    """The docstring's first paragraph up to its first full stop followed by a space (or all of it)."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    sentence = paragraph if end < 0 else paragraph[:end + 1]
    return sentence if len(sentence) <= SUMMARY_CHARS else sentence[:SUMMARY_CHARS].rsplit(" ", 1)[0] + " ..."


def _objective_name(decorator: ast.expr) -> str | None:
    if not isinstance(decorator, ast.Call) or not decorator.args:
        return None
    func = decorator.func
    called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    first = decorator.args[0]
    if called != "register_objective" or not isinstance(first, ast.Constant) or not isinstance(first.value, str):
        return None
    return first.value


def _init_params(cls: ast.ClassDef) -> tuple[tuple[str, str], ...]:
    """``(name, default as written)`` of the class's own ``__init__`` arguments after ``self`` that have defaults."""
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:
        return ()
    args = init.args
    positional = args.posonlyargs + args.args
    pairs = list(zip([a.arg for a in positional[len(positional) - len(args.defaults):]], args.defaults))
    pairs += [(a.arg, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    return tuple((name, ast.unparse(default)) for name, default in pairs)


@friendly_errors
def methods(family: str = typer.Option(None, "--family", help="Only this family (zeroshot, fewshot, ...).")):
    """Registered methods (heads): family, paper number, what they need."""
    from ..heads import describe_heads

    heads = describe_heads()
    # analyses: cliplab.analysis.registry; objectives: train.engine's registry, read from source
    families = sorted({h.family for h in heads}) + ["analysis", "objective"]
    if family is not None and family not in families:
        raise CliplabError(f"no methods of family {family!r}; families: {', '.join(families)}")
    table = Table(title="methods (run one: cliplab evaluate --method NAME)")
    for column in ("name", "family", "paper", "needs", "summary"):
        table.add_column(column)
    for entry in heads:
        if family not in (None, entry.family):
            continue
        needs = ", ".join(n for n, flag in (("train data", entry.needs_train), ("model", entry.needs_backbone)) if flag)
        table.add_row(entry.name, entry.family, str(entry.paper or "-"), needs or "-", entry.summary)
    if family not in ("analysis", "objective"):
        console.print(table)
    if family in (None, "ood"):
        from ..ood.registry import describe_scores

        scores = Table(title="open-set scores (higher = more in-distribution; run: cliplab ood --scores NAMES "
                             "[--method M | --head DIR], cliplab robustness --score NAME)")
        for column in ("name", "paper", "needs", "parameters", "summary"):
            scores.add_column(column)
        for entry in describe_scores():
            params = ", ".join(f"{key}={value}" for key, value in entry.params)
            scores.add_row(entry.name, str(entry.paper or "-"), ", ".join(entry.needs).replace("_", " "),
                           params or "-", entry.summary)
        console.print(scores)
    if family in (None, "analysis"):
        from ..analysis.registry import list_analyses

        analyses = Table(title="analyses (run: the command shown; from Python: cliplab.analysis)")
        for column in ("name", "paper", "command", "summary"):
            analyses.add_column(column)
        for entry in list_analyses():
            analyses.add_row(entry.name, str(entry.paper or "-"), entry.command, entry.summary)
        console.print(analyses)
    if family in (None, "objective"):
        objectives = Table(title="training objectives (run: cliplab pretrain --loss NAME, or the method that trains "
                                 "with it; from Python: cliplab.train.engine.get_objective(NAME, **params) with "
                                 "run_training)")
        for column in ("name", "paper", "module", "parameters", "summary"):
            objectives.add_column(column)
        for entry in describe_objectives():
            params = ", ".join(f"{key}={value}" for key, value in entry.params)
            objectives.add_row(entry.name, str(entry.paper or "-"), f"cliplab.{entry.module}", params or "-",
                               entry.summary)
        console.print(objectives)


@friendly_errors
def templates(name: str = typer.Argument(None, help="Show the templates of this set (a built-in name or a "
                                                    "JSON/text file).")):
    """Built-in prompt-template sets, or the templates of one."""
    from ..data import load_templates, template_sets

    if name:
        for template in load_templates(name):
            console.print(template, markup=False, highlight=False)
        return
    for set_name in template_sets():
        console.print(f"{set_name} ({len(load_templates(set_name))} templates)")


@friendly_errors
def datasets(data_root: Path = DATA_OPTIONS["data_root"]):
    """Named datasets found under the data root, with their splits; names the known ones not found there."""
    from ..data import dataset_names, dataset_splits, default_data_root
    from ..data.registry import named_dataset_folder

    if data_root is not None and not data_root.is_dir():
        raise CliplabError(f"--data-root {data_root}: no such folder")
    root = data_root if data_root is not None else default_data_root()
    found = [n for n in dataset_names() if (root / named_dataset_folder(n)).exists()]
    missing = [n for n in dataset_names() if n not in found]
    if found:
        table = Table(title=f"datasets under {root} (names for --dataset)")
        for column in ("name", "folder", "split", "what it is"):
            table.add_column(column)
        for name in found:
            for i, (split, description) in enumerate(dataset_splits(name).items()):
                table.add_row(name if i == 0 else "", f"{named_dataset_folder(name)}/" if i == 0 else "", split,
                              description)
        console.print(table)
    if missing:
        where = f"{root}" + ("" if root.is_dir() else " (no such folder; pass --data-root or set CLIPLAB_DATA)")
        console.print(Text.assemble(("not found under ", "yellow"), where, ": ", ", ".join(missing)),
                      soft_wrap=True)
