"""``cliplab curate``: MetaCLIP's balancing of an image-text pool over metadata entries (paper 17)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from .common import RUN_OPTIONS, command, console, err_console


@command
def curate(
    pool: Path = typer.Argument(..., help="Image-text pool: JSONL (image + caption, captions or text), CSV/TSV "
                                "with those columns, or a COCO-style captions .json. Image paths are relative to "
                                "its folder."),
    metadata: Path = typer.Option(..., "--metadata", help="Metadata entries: a text file with one entry a line, or "
                                  "a JSON list (MetaCLIP's metadata.json)."),
    t: int = typer.Option(20_000, "--t", "-t", min=1, help="Cap per entry: an entry matched by more pairs than t "
                          "keeps each with probability t/count (MetaCLIP: 20,000)."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the sampling: the same seed gives the same pool."),
    output: Path = typer.Option(None, "--output", "-o", help="Folder for curated.jsonl, report.json/.md, "
                                "entry_distribution.png and skipped.tsv (default: ./<pool name>-curated)."),
    top: int = typer.Option(10, "--top", min=0, help="Entries to list, most matched first."),
    quiet: bool = RUN_OPTIONS["quiet"],
):
    """Balance an image-text pool as MetaCLIP: match captions to metadata entries, cap each entry at t pairs."""
    from ..data.curate import curate as run_curation

    output = output if output is not None else Path(f"{pool.stem}-curated")
    result = run_curation(pool, metadata, output, t=t, seed=seed, progress=not quiet, top=top)
    s = result.summary

    def ratio(value) -> str:
        return "-" if value is None else f"{value:.3g}"

    table = Table(title=f"MetaCLIP curation, t = {t:,}, seed {seed}")
    for column in ("", "before", "after"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row("pairs", f"{s['pairs_matched']:,} matched of {s['pairs_in']:,}", f"{s['pairs_out']:,}")
    table.add_row("entries matched", f"{s['entries_matched_before']:,}", f"{s['entries_matched_after']:,}")
    table.add_row("entries above t", f"{s['head_entries_before']:,}", f"{s['head_entries_after']:,}")
    table.add_row("largest entry count", f"{s['max_count_before']:,}", f"{s['max_count_after']:,}")
    table.add_row("tail/head ratio", ratio(s["tail_head_ratio_before"]), ratio(s["tail_head_ratio_after"]))
    console.print(table)
    if top and result.entries:
        entries = Table(title=f"top {min(top, len(result.entries))} entries")
        for column in ("entry", "before", "p", "after"):
            entries.add_column(column, justify="left" if column == "entry" else "right")
        for row in result.entries[:top]:
            entries.add_row(row["entry"], f"{row['before']:,}", f"{row['probability']:.3g}", f"{row['after']:,}")
        console.print(entries)
    skipped = s["captions_skipped"]
    if skipped:
        kinds = ", ".join(f"{n:,} {kind}" for kind, n in skipped.items())
        err_console.print(Text.assemble((f"skipped {sum(skipped.values()):,} caption(s)", "yellow"),
                                        f": {kinds} (all listed in {result.skipped_file})"), highlight=False)
        for line in s["skipped_examples"][:5]:
            err_console.print(f"  {line}", markup=False, highlight=False)
    if s["entries_never_matchable"]:
        err_console.print(f"note: {s['entries_never_matchable']:,} metadata entries can never match (punctuation "
                          "inside a word, as in MetaCLIP)", markup=False, highlight=False)
    console.print(f"{s['captions_per_s']:,.0f} captions/s; wrote {result.manifest}, {result.report_md}, "
                  f"{result.plot}", markup=False, highlight=False)
