"""``cliplab models|methods|templates|datasets``: what cliplab knows."""

from __future__ import annotations

import typer
from rich.table import Table

from .common import console


def models(arch: str = typer.Argument(None, help="Only this architecture.")):
    """open_clip architectures and pretrained tags (plus 'tiny', hf-hub: names and local paths)."""
    import open_clip

    table = Table(title="models: ARCH[:TAG], 'tiny', hf-hub:ORG/REPO, or a local path")
    table.add_column("architecture")
    table.add_column("pretrained tags")
    tags: dict[str, list[str]] = {}
    for name, tag in open_clip.list_pretrained():
        tags.setdefault(name, []).append(tag)
    for name in open_clip.list_models():
        if arch is None or name == arch:
            table.add_row(name, ", ".join(tags.get(name, [])) or "(random only)")
    table.add_row("tiny", "random weights, built in-process (tests and try-outs)")
    console.print(table)


def methods(family: str = typer.Option(None, "--family", help="Only this family.")):
    """Registered heads (methods) with their family and paper number."""
    from ..heads import list_heads

    table = Table(title="methods (`cliplab evaluate --method NAME`)")
    for column in ("name", "family", "paper", "needs", "summary"):
        table.add_column(column)
    for entry in list_heads(family):
        needs = ", ".join(n for n, flag in (("train data", entry.needs_train), ("model", entry.needs_backbone)) if flag)
        table.add_row(entry.name, entry.family, str(entry.paper or "-"), needs or "-", entry.summary)
    console.print(table)


def templates(name: str = typer.Argument(None, help="Show the templates of this set.")):
    """Built-in prompt-template sets, or the templates of one."""
    from ..data import load_templates, template_sets

    if name:
        for template in load_templates(name):
            console.print(template, markup=False, highlight=False)
        return
    for set_name in template_sets():
        console.print(f"{set_name} ({len(load_templates(set_name))} templates)")


def datasets():
    """Dataset names ``--dataset`` accepts (besides folders and manifests), with their splits."""
    from ..data import dataset_names, dataset_splits, default_data_root

    table = Table(title=f"datasets (data root: {default_data_root()})")
    for column in ("name", "split", "what it is"):
        table.add_column(column)
    for name in dataset_names():
        for i, (split, description) in enumerate(dataset_splits(name).items()):
            table.add_row(name if i == 0 else "", split, description)
    console.print(table)
