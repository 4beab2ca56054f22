"""``cliplab match``: ComCLIP (paper 45) against CLIP, on your captioned boxes or on swapped-caption pairs."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from .common import DataOptions, RunOptions, command, console


def _items(path: Path) -> list[dict]:
    """Rows of ``--items``: image, caption, and parts (word -> COCO [x, y, w, h] boxes, [] for the whole picture)
    or boxes (noun -> boxes; the caption is parsed into subject / predicate / object with those nouns)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CliplabError(f"{path}: cannot read the items ({exc})") from None
    if not isinstance(rows, list) or not rows:
        raise CliplabError(f"{path}: expected a non-empty JSON list of items")
    out = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("caption"),
                                                                                                  str):
            raise CliplabError(f"{path}: item {n} needs 'image' (a path) and 'caption'")
        for key in ("parts", "boxes"):
            value = row.get(key, {})
            if not isinstance(value, dict) or not all(
                    isinstance(b, list) and all(isinstance(x, list) and len(x) == 4 for x in b)
                    for b in value.values()):
                raise CliplabError(f"{path}: item {n}: '{key}' maps words to lists of [x, y, w, h] boxes")
        image = Path(row["image"]).expanduser()
        out.append({**row, "image": str(image if image.is_absolute() else path.parent / image)})
    return out


@command
def match(
    items: Path = typer.Option(None, "--items", help="A JSON list of {image, caption, parts: {word: [[x, y, w, h], "
                               "...]}} (or boxes: {noun: [...]}, the caption parsed with those nouns): CLIP and "
                               "ComCLIP score per item."),
    pairs: str = typer.Option(None, "--pairs", help="coco: the Winoground-style evaluation on seeded swapped-caption "
                              "pairs built from coco_mini's boxes (text, image and group scores)."),
    kinds: str = typer.Option("mirror,real", "--kinds", help="Which pairs: mirror (a picture and its mirror "
                              "image), real (two pictures with the same two objects in opposite order)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the results here (JSON)."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Compositional matching with ComCLIP's sub-images against plain CLIP: per item, or Winoground scores."""
    if (items is None) == (pairs is None):
        raise CliplabError("give one of --items FILE or --pairs coco")
    if pairs is not None and pairs not in ("coco", "coco_mini"):
        raise CliplabError(f"--pairs {pairs!r}: only coco (coco_mini's boxes) is built in")
    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip())
    if not chosen or set(chosen) - {"mirror", "real"}:
        raise CliplabError(f"--kinds {kinds!r}: choose from mirror, real")
    rows = _items(items) if items is not None else None
    if rows is None:
        from ..data.registry import default_data_root, named_dataset_folder
        from ..eval.swapped_pairs import swapped_pairs

        root = Path(data.data_root or default_data_root()) / named_dataset_folder("coco")
        built = swapped_pairs(root, seed=run.seed, kinds=chosen)
    backbone = run.load_backbone()
    if rows is not None:
        from ..eval.comclip import MatchItem, match_scores, parse_relation, relation_parts

        matched = []
        for row in rows:
            parts = row.get("parts") or relation_parts(parse_relation(row["caption"], list(row.get("boxes", {}))),
                                                       row.get("boxes", {}))
            matched.append(MatchItem(row["image"], row["caption"], parts))
        clip, com = match_scores(backbone, matched, run.cache_dir)
        table = Table(title=f"ComCLIP vs CLIP · {len(rows)} items · {backbone.display_name}")
        for name in ("image", "caption", "parts", "CLIP", "ComCLIP"):
            table.add_column(name, justify="right" if name in ("CLIP", "ComCLIP") else "left")
        result = []
        for item, c, m in zip(matched, clip, com):
            table.add_row(Path(item.image).name, item.caption, ", ".join(item.parts), f"{c:.4f}", f"{m:.4f}")
            result.append({"image": item.image, "caption": item.caption, "parts": list(item.parts),
                           "clip": float(c), "comclip": float(m)})
    else:
        from ..eval.swapped_pairs import evaluate_pairs

        result = evaluate_pairs(backbone, built, run.cache_dir)
        table = Table(title=f"Winoground-style swapped pairs (coco_mini, seed {run.seed}) · {backbone.display_name}")
        for name in ("pairs", "method", "text", "image", "group"):
            table.add_column(name, justify="right" if name != "method" else "left")
        for kind, part in [*result["kinds"].items(), ("all", result)]:
            for method, label in (("clip", "CLIP"), ("comclip", "ComCLIP")):
                s = part[method]
                table.add_row(f"{kind} ({part['pairs']})", label,
                              *(f"{100 * s[k]:.1f}%" for k in ("text", "image", "group")))
    console.print(table)
    if output is not None:
        from ..fileio import atomic_write_text

        atomic_write_text(output, json.dumps(result, indent=1))
        console.print(f"results: {output}")
