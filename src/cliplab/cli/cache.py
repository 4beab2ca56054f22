"""``cliplab cache``: what the feature cache holds, and clean-up of leftovers."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import RUN_OPTIONS, console, friendly_errors


@friendly_errors
def cache(
    cache_dir: Path = RUN_OPTIONS["cache_dir"],
    gc: bool = typer.Option(False, "--gc", help="Delete unregistered shards and temporary files left by "
                            "killed runs (older than --min-age), and stored dataset views unused for --view-days."),
    min_age: float = typer.Option(3600.0, "--min-age", help="Seconds a leftover must be old before --gc removes it."),
    view_days: float = typer.Option(30.0, "--view-days", help="Days a dataset view may go unused before --gc "
                                    "removes it (views are rebuilt from the shards without recomputing)."),
):
    """List cache spaces (model, items, size); with --gc, remove what interrupted runs left behind."""
    from ..features.cache import cache_root, cache_spaces

    root = cache_root(cache_dir)
    spaces = cache_spaces(root)
    table = Table(title=f"feature cache: {root}")
    for column in ("space", "model id", "kind", "items", "MiB"):
        table.add_column(column, justify="right" if column in ("items", "MiB") else "left")
    for space in spaces:
        meta = space.meta
        table.add_row(space.space, meta.get("model_id", "?"), meta.get("modality", "?"), str(len(space)),
                      f"{space.disk_usage() / 2**20:.1f}")
    console.print(table)
    if gc:
        removed = freed = 0
        for space in spaces:
            files, size = space.collect_garbage(min_age, view_days * 86400)
            removed, freed = removed + files, freed + size
        console.print(f"removed {removed} leftover file(s), {freed / 2**20:.1f} MiB")
