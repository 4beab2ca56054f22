"""``cliplab cache``: what the feature cache holds, checks and repairs, and clean-up of leftovers."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import RUN_OPTIONS, console, err_console, friendly_errors


@friendly_errors
def cache(
    cache_dir: Path = RUN_OPTIONS["cache_dir"],
    verify: bool = typer.Option(False, "--verify", help="Check every shard against the index (size, checksum "
                                "recorded at write time, rows) and every stored view; exit 1 if any is damaged."),
    repair: bool = typer.Option(False, "--repair", help="Fix what --verify finds: rebuild a damaged index from the "
                                "shards, drop damaged shards (their features are recomputed on the next run), "
                                "delete damaged views."),
    gc: bool = typer.Option(False, "--gc", help="Delete unregistered shards and temporary files left by "
                            "killed runs (older than --min-age), and stored dataset views unused for --view-days."),
    min_age: float = typer.Option(3600.0, "--min-age", help="Seconds a leftover must be old before --gc removes it."),
    view_days: float = typer.Option(30.0, "--view-days", help="Days a dataset view may go unused before --gc "
                                    "removes it (views are rebuilt from the shards without recomputing)."),
):
    """List cache spaces (model, items, size); --verify and --repair check and fix them; --gc cleans up."""
    from ..features.cache import cache_root, cache_spaces
    from ..features.cache_check import repair_space, verify_space

    root = cache_root(cache_dir)
    spaces = cache_spaces(root)
    table = Table(title=f"feature cache: {root}")
    for column in ("space", "model id", "kind", "items", "MiB"):
        table.add_column(column, justify="right" if column in ("items", "MiB") else "left")
    for space in spaces:
        meta = space.meta
        items = "damaged index" if space.damaged else str(len(space))
        table.add_row(space.space, meta.get("model_id", "?"), meta.get("modality", "?"), items,
                      f"{space.disk_usage() / 2**20:.1f}")
    console.print(table)
    damaged = [space for space in spaces if space.damaged]
    if damaged and not (verify or repair):
        err_console.print(f"[yellow]warning:[/] {len(damaged)} space(s) with a damaged index: run "
                          "cliplab cache --repair (or any command using them repairs them)")
    problems = []
    if verify or repair:
        problems = [p for space in spaces for p in verify_space(space)]
        for problem in problems:
            err_console.print(f"damaged {problem.kind} {problem.space}/{problem.name}: {problem.detail}",
                              markup=False, highlight=False)
        console.print(f"verified {len(spaces)} space(s): {len(problems)} problem(s)")
    if repair and problems:
        for space in spaces:
            for line in repair_space(space, [p for p in problems if p.space == space.space]):
                console.print(f"repaired: {line}", markup=False, highlight=False)
    if gc:
        removed = freed = 0
        for space in cache_spaces(root, repair=True) if repair else [s for s in spaces if not s.damaged]:
            files, size = space.collect_garbage(min_age, view_days * 86400)
            removed, freed = removed + files, freed + size
        console.print(f"removed {removed} leftover file(s), {freed / 2**20:.1f} MiB")
    if problems and not repair:
        raise typer.Exit(1)
