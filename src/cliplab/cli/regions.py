"""``cliplab regions``: score your boxes against category and attribute prompts (OvarNet's inference side, with
BIRDet's background class and partial-object suppression as options)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import CliplabError
from .common import RunOptions, command, console

BOXES_HELP = ("JSON of COCO-format [x, y, w, h] boxes: a list (one image), a mapping image file name -> boxes, or a "
              "COCO annotation file (images + annotations).")
BACKGROUND_HELP = ("Add BIRDet's image-conditioned background class: the 'background' prompt mixed with the whole "
                   "image's embedding by this weight (0: the plain prompt).")
SUPPRESS_HELP = ("Partial-object suppression: mark a box whose overlap with a larger box of the same predicted label "
                 "exceeds this share of its own area (1: none).")


@command
def regions(
    images: list[Path] = typer.Argument(..., help="Image files."),
    boxes: Path = typer.Option(..., "--boxes", "-b", help=BOXES_HELP),
    labels: str = typer.Option(None, "--labels", "-l", help='Comma-separated category names, e.g. "cat,dog".'),
    labels_file: Path = typer.Option(None, "--labels-file", help="Category names, one per line (or JSON list)."),
    attributes: str = typer.Option(None, "--attributes", "-a", help='Comma-separated attributes, e.g. "red,furry".'),
    templates: str = typer.Option("imagenet7", "--templates", "-t", help="Template set name or file (categories)."),
    background_mix: float = typer.Option(None, "--background-mix", min=0.0, max=1.0, help=BACKGROUND_HELP),
    suppress: float = typer.Option(None, "--suppress", min=0.0, max=1.0, help=SUPPRESS_HELP),
    top: int = typer.Option(3, "--top", min=1, help="Categories listed per box."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the per-box scores as JSON here."),
    run: RunOptions = None,
):
    """Score boxes in images: per box a category softmax and attribute probabilities against prompted text."""
    from ..data import parse_labels, read_class_names
    from ..data.images import load_image
    from ..regions.boxes import boxes_for_image, check_boxes, read_box_file

    if (labels is None) == (labels_file is None):
        raise CliplabError("give the category names with exactly one of --labels or --labels-file")
    names = parse_labels(labels) if labels is not None else read_class_names(labels_file)
    attribute_names = parse_labels(attributes) if attributes else []
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise CliplabError(f"image not found: {missing[0]}")
    table = read_box_file(boxes)
    if None in table and len(images) > 1:
        raise CliplabError(f"{boxes} is a bare list of boxes: name the image of each box list for several images")
    work = []
    for path in images:  # every box is checked before the model loads
        image = load_image(path)
        work.append((path, image, check_boxes(boxes_for_image(table, path, boxes), image.size, path)))
    from ..regions.scoring import score_regions

    backbone = run.load_backbone()
    results = []
    for path, image, found in work:
        scores = score_regions(backbone, image, found, names, attribute_names, templates=templates,
                               cache_dir=run.cache_dir, image_name=str(path), background_mix=background_mix,
                               suppress=suppress)
        records = scores.records(top=top)
        results.append({"image": str(path), "boxes": records})
        for k, record in enumerate(records):
            cats = ", ".join(f"{n} {p:.1%}" for n, p in record["categories"].items())
            line = f"{path} box {k} [{', '.join(f'{v:g}' for v in record['box'])}]: {cats}"
            if record.get("attributes"):
                line += " | " + ", ".join(f"{a} {p:.0%}" for a, p in record["attributes"].items())
            if record["suppressed"]:
                line += " (suppressed: part of a larger box)"
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    if output is not None:
        record = {"model": backbone.display_name, "model_id": backbone.model_id,
                  "weights": "random" if backbone.info.random_weights else "pretrained", "labels": names,
                  "attributes": attribute_names, "templates": templates, "background_mix": background_mix,
                  "suppress": suppress, "images": results}
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
        console.print(f"json: {output}", markup=False, highlight=False, soft_wrap=True)
