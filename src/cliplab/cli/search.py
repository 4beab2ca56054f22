"""``cliplab search``: query a search index by text, by image, or (``--captions``) an image against captions.

The table names each hit relative to the indexed folder (as the service does), so it fits a terminal;
``--output`` keeps the full paths.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from ..fileio import atomic_write_text
from .common import RunOptions, command, console
from .index import with_index_model


@command
def search(
    query: str = typer.Argument(None, help="Text to look for (leave out with --image)."),
    image: Path = typer.Option(None, "--image", help="Find images similar to this image file (or, with --captions, "
                               "the captions that describe it)."),
    captions: bool = typer.Option(False, "--captions", help="Image-to-text: search the indexed captions."),
    index_dir: Path = typer.Option(..., "--index-dir", "-i", help="The index folder (cliplab index build)."),
    k: int = typer.Option(20, "-k", "--top-k", min=1, help="How many results."),
    output: Path = typer.Option(None, "--output", "-o", help="Also write the results to this .json or .csv file."),
    sheet: Path = typer.Option(None, "--sheet", help="Also draw the image hits as a PNG contact sheet."),
    nprobe: int = typer.Option(None, "--nprobe", min=1, help="IVF cells to visit (default: the index's own, "
                               "generous for text queries)."),
    ef_search: int = typer.Option(None, "--ef-search", min=1, help="HNSW search breadth (default: the index's)."),
    run: RunOptions = None,
):
    """Search an index by text or by image; print, save (JSON/CSV) or draw (PNG) the hits."""
    if (query is None) == (image is None):
        raise CliplabError("give a text QUERY or --image FILE (one of them)")
    if query is not None and not query.strip():
        raise CliplabError("the text QUERY is empty; give some words to search for (or --image FILE)")
    if captions and image is None:
        raise CliplabError("--captions searches captions with an image: give --image FILE")
    if sheet is not None and captions:
        raise CliplabError("--sheet draws image hits; leave it out with --captions")
    if output is not None and output.suffix.lower() not in (".json", ".csv"):
        raise CliplabError(f"--output {output}: use a .json or .csv file name")
    from ..data.images import load_image
    from ..search import SearchIndex

    params = {name: value for name, value in (("nprobe", nprobe), ("efSearch", ef_search)) if value is not None}
    with SearchIndex.open(index_dir, search_params=params) as index:
        backbone = with_index_model(run, index_dir).load_backbone()
        index.check_model(backbone)
        if captions:
            hits = index.search_captions(backbone, load_image(image), k)
            records = [{"rank": r + 1, "id": h.id, "score": h.score, "text": h.text, "item": h.item, "path": h.path}
                       for r, h in enumerate(hits)]
        else:
            hits = index.search_image(backbone, load_image(image), k) if image is not None else \
                index.search_text(backbone, query, k)
            records = [{"rank": r + 1, "id": h.id, "score": h.score, "path": h.path, "caption": h.caption,
                        "extra": h.extra} for r, h in enumerate(hits)]
        root = indexed_root(index.manifest, [r["path"] for r in records])
    _show(records, captions, root)
    if output is not None:
        _save(records, output)
        console.print(f"wrote {output}")
    if sheet is not None:
        from ..search.sheet import contact_sheet

        contact_sheet(hits, sheet)
        console.print(f"wrote {sheet}")


def indexed_root(manifest: dict, paths: list[str]) -> str | None:
    """The folder an index covers: its source folder, a manifest file's folder, else the common folder of
    ``paths``; None when nothing says."""
    source = manifest.get("source") or {}
    kind, location = source.get("kind"), source.get("location")
    if location and kind in ("folder", "dataset-object"):
        return str(location)
    if location and kind == "dataset":
        return os.path.dirname(str(location))
    folders = sorted({os.path.dirname(p) for p in paths if p})
    if not folders:
        return None
    try:
        return os.path.commonpath(folders)
    except ValueError:  # different drives
        return None


def display_name(path: str, root: str | None) -> str:
    """``path`` relative to ``root`` when it lies inside it, else as stored."""
    if path and root:
        try:
            relative = os.path.relpath(path, root)
        except ValueError:
            return path
        if relative != "." and not relative.startswith(".." + os.sep) and relative != "..":
            return Path(relative).as_posix()
    return path


def _show(records: list[dict], captions: bool, root: str | None = None) -> None:
    if root:
        console.print(f"in {root}", soft_wrap=True)
    table = Table()
    columns = ("rank", "score", "text", "name") if captions else ("rank", "score", "name", "caption")
    for column in columns:
        table.add_column(column, justify="right" if column in ("rank", "score") else "left",
                         overflow="fold" if column == "name" else "ellipsis")
    for record in records:
        shown = {**record, "name": display_name(record["path"], root)}
        table.add_row(*(f"{shown[c]:.4f}" if c == "score" else str(shown[c] or "") for c in columns))
    console.print(table)


def _save(records: list[dict], output: Path) -> None:
    if output.suffix.lower() == ".json":
        atomic_write_text(output, json.dumps(records, indent=1))
        return
    buffer = io.StringIO()
    flat = [{**{k: v for k, v in r.items() if k != "extra"},
             **{f"extra.{k}": _cell(v) for k, v in (r.get("extra") or {}).items()}} for r in records]
    fields = [key for key in records[0] if key != "extra"] if records else ["rank", "id", "score", "path"]
    fields += sorted({key for row in flat for key in row if key.startswith("extra.")})
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    atomic_write_text(output, buffer.getvalue())


def _cell(value):
    """A CSV cell for an extra field (lists and objects as JSON)."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value
