"""``cliplab explain``: for an image's top classes, how much each prompt or descriptor added to the score."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from .common import RunOptions, command, console, description_method, method_list, report_failures


@command
def explain(
    images: list[Path] = typer.Argument(..., help="Image files."),
    labels: str = typer.Option(None, "--labels", "-l", help='Comma-separated class names, e.g. "cat,dog,car".'),
    labels_file: Path = typer.Option(None, "--labels-file", help="Class names, one per line (or JSON list)."),
    descriptions: Path = typer.Option(None, "--descriptions", help="A description set ({class: [descriptors or "
                                      "sentences]}, DCLIP or CuPL format); default method then dclip."),
    method: str = typer.Option(None, "--method", help="A method whose prompts can be explained: "
                               + method_list(gives="sentences") + " (default: dclip with --descriptions, else "
                               "zeroshot)."),
    templates: str = typer.Option(None, "--templates", "-t", help="Template set name or file (default: the method's "
                                  "own, as cliplab zeroshot; the template classifier's: imagenet7; cupl: templates "
                                  "ensembled with the sentences)."),
    top: int = typer.Option(3, "--top", min=1, help="Classes to explain per image."),
    show: int = typer.Option(8, "--show", min=1, help="Prompts shown per class in the table (the JSON has all)."),
    output_dir: Path = typer.Option(Path("explanations"), "--output-dir", "-o", help="Where the PNG and JSON go."),
    run: RunOptions = None,
):
    """Explain predictions: each descriptor's (or template's) contribution to the top classes' scores; table + PNG."""
    from ..data import image_files, parse_labels, read_class_names
    from ..eval.explain import explain as explain_image
    from ..eval.explain import plot_explanation
    from ..eval.inputs import build_head

    if (labels is None) == (labels_file is None):
        raise CliplabError("give the class names with exactly one of --labels or --labels-file")
    names = parse_labels(labels) if labels is not None else read_class_names(labels_file)
    method = description_method(method, descriptions)
    params = {"descriptions": descriptions} if descriptions is not None else {}
    dataset = image_files(images, run.hash_content)
    backbone = run.load_backbone()
    head = build_head(method, backbone, names, templates=templates, params=params, cache_dir=run.cache_dir).fit()
    features = run.embed(backbone, dataset)
    output_dir.mkdir(parents=True, exist_ok=True)
    stems = [Path(item).stem for item in features.item_ids]
    for item, x, stem in zip(features.item_ids, features.features, stems):
        found = explain_image(head, x, top=top, class_names=names)
        if stems.count(stem) > 1:  # a/cat.jpg and b/cat.jpg: one file each, never one over the other
            from ..fileio import digest

            stem = f"{stem}-{digest(item)[:8]}"
        png = plot_explanation(found, output_dir / f"explain_{stem}.png", f"{item} · {method} · {backbone.display_name}"
                               + (" · random weights" if backbone.info.random_weights else ""))
        record = {"image": item, "method": method, "model": backbone.display_name, "model_id": backbone.model_id,
                  "weights": "random" if backbone.info.random_weights else "pretrained",
                  "classes": [e.as_dict() for e in found]}
        json_path = output_dir / f"explain_{stem}.json"
        json_path.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
        for e in found:
            table = Table(title=f"{item} · #{e.rank} {e.label} · p={e.probability:.3f} · logit {e.logit:.2f}")
            table.add_column("prompt", overflow="fold")
            table.add_column("cosine", justify="right")
            table.add_column("contribution", justify="right")
            for row in e.as_dict()["prompts"][:show]:
                table.add_row(row["prompt"], f"{row['similarity']:.4f}", f"{row['contribution']:.3f}")
            if len(e.prompts) > show:
                table.caption = f"{len(e.prompts) - show} more in {json_path}"
            console.print(table)
        console.print(f"png: {png}\njson: {json_path}")
    report_failures(features.failures)
