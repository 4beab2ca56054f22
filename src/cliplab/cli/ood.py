"""``cliplab ood``: OOD detection of an ID test set against OOD sets, several scores, JSON + ROC/histogram PNGs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from .common import DataOptions, RunOptions, command, console, default_templates, err_console


@command
def ood(
    id_dataset: str = typer.Option(..., "--id", help="In-distribution dataset (named, a class-folder path or a "
                                   "manifest); its classes are the known ones; --split picks its split."),
    ood_datasets: str = typer.Option(..., "--ood", help="Comma-separated OOD datasets (named or paths; read whole, "
                                     "or their test split)."),
    scores: str = typer.Option("msp,energy,mcm", "--scores", help="Comma-separated scores: msp, max-logit, energy, "
                               "mcm, glmcm (runs the images through the model again for patch tokens), cooked (fits "
                               "a linear probe on the ID train split, C on val), clipn-ctw, clipn-atd (need --clipn)."),
    clipn: Path = typer.Option(None, "--clipn", help="Folder of a trained CLIPN (cliplab.train.clipn) for the "
                               "clipn scores."),
    fpr_convention: str = typer.Option("id-positive", "--fpr-convention", help="FPR@95: id-positive (MCM, CLIP OOD "
                                       "papers) or ood-positive (OpenOOD's code)."),
    templates: str = typer.Option(None, "--templates", "-t", help="Template set or file (default: the ID dataset's "
                                  "CLIP_benchmark set, else 'imagenet7')."),
    temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature T of "
                                      "MCM and GL-MCM, > 0 (authors' default 1)."),
    lambda_local: float = typer.Option(1.0, "--lambda-local", min=0.0, help="GL-MCM weight of the local score."),
    output_dir: Path = typer.Option(Path("results"), "--output-dir", "-o", help="Where ood.json and the PNGs go."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """OOD detection: AUROC, FPR@95, AUPR-in/out per score and OOD set; JSON + ROC and histogram PNGs."""
    from ..data import has_labels, load_dataset
    from ..eval.ood import OOD_SCORES, evaluate_ood
    from ..ood import FPR_CONVENTIONS

    names = [s.strip() for s in scores.split(",") if s.strip()]
    unknown = [s for s in names if s not in OOD_SCORES]
    if not names or unknown:
        raise CliplabError(f"--scores: unknown score {unknown[0]!r}" if unknown else "--scores: give at least one "
                           f"score; known: {', '.join(OOD_SCORES)}")
    if fpr_convention not in FPR_CONVENTIONS:
        raise CliplabError(f"--fpr-convention {fpr_convention!r}: use one of {', '.join(FPR_CONVENTIONS)}")
    ood_names = [s.strip() for s in ood_datasets.split(",") if s.strip()]
    if not ood_names:
        raise CliplabError("--ood: give at least one OOD dataset")
    id_data = load_dataset(id_dataset, data.data_root, data.split, run.hash_content)
    if not has_labels(id_data):
        raise CliplabError(f"--id {id_dataset}: has no labels/classes (an unlabelled folder?)")
    ood_data = [load_dataset(name, data.data_root, None, run.hash_content) for name in ood_names]
    fit_data = None
    if "cooked" in names:  # COOkeD's linear probe fits on the ID train split, its C chosen on val
        fit_data = tuple(load_dataset(id_dataset, data.data_root, s, run.hash_content) for s in ("train", "val"))
    backbone = run.load_backbone()
    clipn_model = None
    if clipn is not None:
        from ..train.clipn import ClipnModel

        clipn_model = ClipnModel.load(clipn, backbone)
    report = evaluate_ood(backbone, id_data, ood_data, names, default_templates(templates, id_data.name), output_dir,
                          fpr_convention=fpr_convention, cache_dir=run.cache_dir, batch_size=run.batch_size,
                          workers=run.workers, progress=not run.quiet, temperature=temperature,
                          lambda_local=lambda_local, fit_datasets=fit_data,
                          clipn=clipn_model)
    metrics = report.record["metrics"]
    table = Table(title=f"OOD detection · ID {id_data.name} ({id_data.split}) · {backbone.model_id} · "
                        f"ID accuracy {100 * metrics['id_accuracy']:.2f}%")
    for column in ("score", "OOD set", "AUROC", f"FPR@95 ({fpr_convention})", "AUPR-in", "AUPR-out"):
        table.add_column(column, justify="left" if column in ("score", "OOD set") else "right")
    for score_name, per_set in metrics["ood"].items():
        for set_name, m in per_set.items():
            cells = (f"{100 * m[k]:.2f}" for k in ("auroc", "fpr95", "aupr_in", "aupr_out"))
            table.add_row(score_name, set_name, *cells)
    console.print(table)
    for name, failures in report.record["cliplab"]["failures"].items():
        err_console.print(f"[yellow]{name}: {len(failures)} image(s) skipped[/] (listed in the JSON)")
    for kind, path in report.files.items():
        console.print(f"{kind}: {path}")
