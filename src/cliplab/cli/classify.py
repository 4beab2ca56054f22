"""``cliplab classify``: label a folder of images with your own class names."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from .common import (
    RunOptions,
    command,
    console,
    description_method,
    err_console,
    method_list,
    report_failures,
    report_fit_problems,
    report_skipped,
)


@command
def classify(
    paths: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    labels: str = typer.Option(None, "--labels", "-l", help='Comma-separated class names, e.g. "cat,dog,car".'),
    labels_file: Path = typer.Option(None, "--labels-file", help="Class names, one per line (or JSON list)."),
    top_k: int = typer.Option(None, "--top-k", "-k", min=1, help="Predictions to show per image (default 3)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write predictions to a .csv or .json file."),
    templates: str = typer.Option(None, "--templates", "-t", help="Template set name or file (default: the method's "
                                  "own, as cliplab zeroshot; the template classifier's: imagenet7)."),
    method: str = typer.Option(None, "--method", help="A zero-shot method (default zeroshot; with --descriptions: "
                               "cupl for a file of sentences, dclip for descriptor phrases): "
                               + method_list(family="zeroshot", trained=False) + "."),
    descriptions: Path = typer.Option(None, "--descriptions", help="Classify by description: a description set "
                                      "({class: [descriptors or sentences]}, DCLIP or CuPL format) for your labels; "
                                      "the format is detected and the method used is named."),
    llm: str = typer.Option(None, "--llm", help="Language model for the methods that ask one ("
                            + method_list(need="llm") + "): replay:FILE, http://HOST:PORT/v1, openai:MODEL or "
                            "hf:PATH."),
    head_dir: Path = typer.Option(None, "--head", help="A fitted head saved by cliplab evaluate --save-head (its "
                                  "classes replace --labels; the model must be the one it was fitted with)."),
    reject: bool = typer.Option(False, "--reject", help="Open set: label 'unknown' the images whose --reject-score is "
                                "below the threshold kept by --reject-tpr of the --reject-calibration images."),
    reject_score: str = typer.Option("mcm", "--reject-score", help="msp, energy or mcm (mcm: zero-shot heads)."),
    reject_tpr: float = typer.Option(0.95, "--reject-tpr", help="Fraction of calibration images kept (0 < TPR < 1)."),
    reject_calibration: str = typer.Option(None, "--reject-calibration", help="Images known to belong to the classes "
                                           "(a folder, manifest or named dataset's test split) to set the threshold."),
    run: RunOptions = None,
):
    """Classify images into your labels (zero-shot; default model ViT-B-32 LAION-2B, downloaded once)."""
    from ..data import image_files, parse_labels, read_class_names

    if head_dir is not None:
        if labels is not None or labels_file is not None:
            raise CliplabError("--head brings its own classes: leave out --labels and --labels-file")
        from ..heads.saving import saved_class_names

        names = saved_class_names(head_dir)
    elif (labels is None) == (labels_file is None):
        raise CliplabError("give the class names with exactly one of --labels or --labels-file (or a saved --head)")
    else:
        names = parse_labels(labels) if labels is not None else read_class_names(labels_file)
    if output is not None and output.suffix.lower() not in (".csv", ".json"):
        raise CliplabError(f"--output {output}: use a .csv or .json file name")
    dataset = image_files(paths, run.hash_content)  # a missing path is answered before torch loads
    from ..eval.inputs import build_head, for_single_images
    from ..heads import head_entry
    from ..heads.saving import load_head

    method = description_method(method, descriptions)
    extra = {key: value for key, value in (("descriptions", descriptions), ("llm", llm)) if value is not None}
    if head_dir is not None and extra:
        raise CliplabError("--head is a fitted head: leave out --descriptions and --llm")
    if head_dir is None and head_entry(method).needs_train:
        raise CliplabError(f"--method {method}: needs training data; fit it with cliplab evaluate --save-head DIR "
                           "and pass --head DIR")
    if top_k is not None and top_k > len(names):
        err_console.print(f"note: --top-k {top_k} capped at the {len(names)} labels given")
    top_k = min(top_k or 3, len(names))
    if reject:
        _check_reject(reject_score, reject_tpr, reject_calibration)
    backbone = run.load_backbone()
    if head_dir is not None:
        head = load_head(head_dir, backbone=backbone)
    else:  # the method's declared default templates (as cliplab zeroshot); bad ones fail before any image is embedded
        head = build_head(method, backbone, names, templates=templates, params=extra, cache_dir=run.cache_dir).fit()
    head = for_single_images(head)  # one image's label never depends on the other images in the folder
    report_fit_problems(head.fit_summary(), head)
    threshold = _reject_threshold(head, run, backbone, reject_score, reject_tpr, reject_calibration) if reject else None
    features = run.embed(getattr(head, "backbone_", None) or backbone, dataset)  # a head's own trained model
    rows = []
    if len(features):
        order, probs = head.top_k(features.features, top_k)
        columns = [_label(head.classes_[c], names) for c in range(len(head.classes_))]
        rows = [
            {"path": item, "predictions": [{"label": columns[c], "probability": float(p)} for c, p in zip(oi, pi)]}
            for item, oi, pi in zip(features.item_ids, order, probs)
        ]
        if reject:
            for row, value in zip(rows, _reject_scores(head, features.features, reject_score)):
                known = bool(value >= threshold)
                row.update(prediction=row["predictions"][0]["label"] if known else "unknown", score=float(value),
                           reject_score=reject_score, threshold=threshold, tpr=reject_tpr)
    rows += [{"path": item, "predictions": [], "error": reason} for item, reason in features.failures]
    _print(rows, dataset.root, len(features))
    if reject:
        unknown = sum(row.get("prediction") == "unknown" for row in rows)
        console.print(f"open set: {unknown} of {len(features)} image(s) unknown ({reject_score} < {threshold:.6g}, "
                      f"the threshold keeping {100 * reject_tpr:g}% of {reject_calibration})")
    report_failures(features.failures)
    report_skipped(dataset)
    if output is not None:
        _write(rows, output, top_k, reject)
        console.print(f"wrote {output}")


def _check_reject(score: str, tpr: float, calibration: str | None) -> None:
    if score not in ("msp", "energy", "mcm"):
        raise CliplabError(f"--reject-score {score!r}: use msp, energy or mcm")
    if not 0 < tpr < 1:
        raise CliplabError(f"--reject-tpr {tpr}: must be strictly between 0 and 1")
    if calibration is None:
        raise CliplabError("--reject needs --reject-calibration PATH_OR_DATASET: images known to belong to the "
                           "classes, to set the rejection threshold")


def _reject_scores(head, X, score: str, weights=None):
    """Open-set scores (higher = known): msp/energy on the head's logits, MCM on the features and class weights
    (``weights``, else those of a head declaring ``gives=("class_weights",)``)."""
    from ..ood import energy, mcm, msp

    if score == "mcm":
        if weights is None:
            from ..heads import head_entry

            if "class_weights" not in head_entry(head).gives:
                raise CliplabError("--reject-score mcm needs a head with class weights in the joint space "
                                   f"({method_list(gives='class_weights')}); use msp or energy")
            weights = head.weights_
        return mcm(X, weights)
    return (msp if score == "msp" else energy)(head.logits(X))


def _reject_threshold(head, run: RunOptions, backbone, score: str, tpr: float, calibration: str) -> float:
    """``threshold_at_tpr`` of the calibration images' scores."""
    from ..data import load_dataset
    from ..ood import threshold_at_tpr

    features = run.embed(backbone, load_dataset(calibration, hash_content=run.hash_content))
    if not len(features):
        raise CliplabError(f"--reject-calibration {calibration}: no image could be embedded")
    return threshold_at_tpr(_reject_scores(head, features.features, score), tpr)


def _label(cls, names: list[str]) -> str:
    """A logit column's class: an index into ``names``, or the label itself."""
    import numpy as np

    return names[int(cls)] if isinstance(cls, (int, np.integer)) else str(cls)


def _print(rows, root, n_ok) -> None:
    table = Table(title=f"{n_ok} images classified (paths relative to {root})", show_lines=False)
    table.add_column("image", overflow="fold")
    table.add_column("prediction")
    table.add_column("p", justify="right")
    table.add_column("runners-up")
    scored = [row for row in rows if "score" in row]
    if scored:
        first = scored[0]
        table.title += f" · open set: {first['reject_score']} >= {first['threshold']:.6g} (TPR {first['tpr']:g})"
        table.add_column(first["reject_score"], justify="right")
    for row in rows:
        if "error" in row:
            continue
        best, rest = row["predictions"][0], row["predictions"][1:]
        shown = best["label"] if row.get("prediction", best["label"]) != "unknown" else f"unknown ({best['label']})"
        table.add_row(row["path"], shown, f"{best['probability']:.3f}",
                      ", ".join(f"{p['label']} {p['probability']:.3f}" for p in rest),
                      *([f"{row['score']:.4f}"] if scored else []))
    console.print(table)


def _write(rows, output: Path, top_k: int, reject: bool = False) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".json":
        output.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
        return
    header = ["path"] + [f"{kind}_{i}" for i in range(1, top_k + 1) for kind in ("label", "probability")] + ["error"]
    extra = ["prediction", "score", "reject_score", "threshold", "tpr"] if reject else []
    with open(output, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header + extra)
        for row in rows:
            cells = [row["path"]]
            for i in range(top_k):
                pred = row["predictions"][i] if i < len(row["predictions"]) else None
                cells += [pred["label"], f"{pred['probability']:.6f}"] if pred else ["", ""]
            writer.writerow(cells + [row.get("error", "")] + [row.get(key, "") for key in extra])
