"""``cliplab models|methods|templates|datasets``: what cliplab knows.

Each starts without torch except ``models``, which lists open_clip's own registry.
"""

from __future__ import annotations

import difflib
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


@friendly_errors
def methods(family: str = typer.Option(None, "--family", help="Only this family (zeroshot, fewshot, ...).")):
    """Registered methods (heads): family, paper number, what they need."""
    from ..heads import describe_heads

    heads = describe_heads()
    families = sorted({h.family for h in heads}) + ["analysis"]  # analyses: cliplab.analysis.registry
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
    if family != "analysis":
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
