"""``cliplab ood``: OOD detection of an ID test set against OOD sets, any registered scores on any head, JSON +
ROC/histogram PNGs. Also the head and score options ``cliplab robustness`` shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from ..ood.registry import describe_scores
from .common import DataOptions, RunOptions, command, console, default_templates, err_console

SCORE_NAMES = ", ".join(s.name for s in describe_scores())  # read from the scores' source, nothing imported

MethodOpt = typer.Option(None, "--method", help="The head whose logits the scores read: any registered method (see: "
                         "cliplab methods; default zeroshot), fitted on the ID train split (tuned on val) when it "
                         "needs data.")
HeadOpt = typer.Option(None, "--head", help="A saved head folder (cliplab evaluate --save-head) instead of --method; "
                       "fitted on the same model, predicting the ID classes.")
ParamOpt = typer.Option(None, "--param", help="Method parameter NAME=VALUE (repeatable).")
ScoreParamOpt = typer.Option(None, "--score-param", help="Score parameter NAME=VALUE for every chosen score that takes "
                             "it, or SCORE.NAME=VALUE for one (repeatable; cliplab methods lists each score's).")
ArtefactOpt = typer.Option(None, "--artefact", "--clipn", help="Folder a score reads (for clipn-ctw and "
                           "clipn-atd: a trained CLIPN, from cliplab train-clipn).")
TemperatureOpt = typer.Option(None, "--temperature", help="Softmax temperature T of every chosen score that takes "
                              "one, > 0 (the authors' default 1); same as --score-param temperature=T.")
LambdaOpt = typer.Option(None, "--lambda-local", min=0.0, help="Weight of the local score (GL-MCM, default 1); same "
                         "as --score-param lambda_local=W.")


@dataclass
class HeadChoice:
    """What --method/--head/--param chose: a method name and its parameters, or a saved head folder."""

    method: str | None
    folder: Path | None
    params: dict


def head_choice(method: str | None, folder: Path | None, params: list[str] | None) -> HeadChoice:
    """Check --method, --head and --param before anything is loaded."""
    from ..heads.registry import head_entry
    from .evaluate import _parse_params

    if method is not None and folder is not None:
        raise CliplabError("give --method or --head, not both")
    parsed = _parse_params(params)
    if folder is not None:
        if parsed:
            raise CliplabError("--param sets a method's parameters; a saved --head has them already")
        return HeadChoice(None, folder, {})
    return HeadChoice(head_entry(method or "zeroshot").name, None, parsed)


def score_choice(names: list[str], score_params: list[str] | None, temperature: float | None,
                 lambda_local: float | None) -> dict:
    """The score parameters of --score-param, --temperature and --lambda-local, checked against the chosen scores."""
    from ..eval.ood import score_params as split_params
    from .evaluate import _parse_params

    params = _parse_params(score_params)
    for key, value in (("temperature", temperature), ("lambda_local", lambda_local)):
        if value is not None:
            params[key] = value
    split_params(names, params)  # unknown names or keys fail before any data is read
    return params


def needs_fit_data(choice: HeadChoice, names: list[str]) -> bool:
    """Whether the chosen method or a chosen score fits on the ID train/val splits (as they declare)."""
    from ..heads.registry import head_entry
    from ..ood.registry import score_entry

    return (choice.method is not None and head_entry(choice.method).needs_train) or any(
        "fit_data" in score_entry(name).needs for name in names)


def build_head(choice: HeadChoice, backbone, id_data, templates: str | None, cache_dir):
    """The chosen head for ``id_data``'s classes (unfitted), or the saved one (its classes must be the ID ones)."""
    from ..eval.inputs import build_head as provider_build_head

    if choice.folder is not None:
        from ..heads.saving import load_head, saved_class_names

        names = saved_class_names(choice.folder)
        if list(names) != list(id_data.class_names):
            raise CliplabError(f"--head {choice.folder}: it predicts {len(names)} classes ({', '.join(names[:3])}"
                               f"{', ...' if len(names) > 3 else ''}), not the {len(id_data.class_names)} classes of "
                               f"{id_data.name}")
        return load_head(choice.folder, backbone)
    return provider_build_head(choice.method, backbone, list(id_data.class_names), dataset_name=id_data.name,
                               templates=templates, params=choice.params, cache_dir=cache_dir)


def _names(text: str, option: str) -> list[str]:
    from ..ood.registry import score_entry

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise CliplabError(f"{option}: give at least one score; known: {SCORE_NAMES}")
    for name in names:
        score_entry(name)
    return names


@command
def ood(
    id_dataset: str = typer.Option(..., "--id", help="In-distribution dataset (named, a class-folder path or a "
                                   "manifest); its classes are the known ones; --split picks its split."),
    ood_datasets: str = typer.Option(..., "--ood", help="Comma-separated OOD datasets (named or paths; read whole, "
                                     "or their test split)."),
    scores: str = typer.Option("msp,energy,mcm", "--scores", help=f"Comma-separated OOD scores: {SCORE_NAMES} "
                               "(cliplab methods says what each needs: a head's logits, text weights, patch grids, "
                               "the ID train/val splits or an --artefact folder)."),
    method: str = MethodOpt,
    head: Path = HeadOpt,
    params: list[str] = ParamOpt,
    score_params: list[str] = ScoreParamOpt,
    artefact: Path = ArtefactOpt,
    fpr_convention: str = typer.Option("id-positive", "--fpr-convention", help="FPR@95: id-positive (MCM, CLIP OOD "
                                       "papers) or ood-positive (OpenOOD's code)."),
    templates: str = typer.Option(None, "--templates", "-t", help="Template set or file of the class texts (default: "
                                  "the ID dataset's CLIP_benchmark set, else 'imagenet7'); the method's too where it "
                                  "takes templates (default: its own)."),
    temperature: float = TemperatureOpt,
    lambda_local: float = LambdaOpt,
    output_dir: Path = typer.Option(Path("results"), "--output-dir", "-o", help="Where the results JSON and "
                                    "PNGs go (ood_METHOD_DATASET_SPLIT_MODEL_HASH.*: no run overwrites another)."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """OOD detection: AUROC, FPR@95, AUPR-in/out per score and OOD set; JSON + ROC and histogram PNGs."""
    from ..data import has_labels, load_dataset
    from ..eval.ood import evaluate_ood
    from ..ood.metrics import FPR_CONVENTIONS

    names = _names(scores, "--scores")
    choice = head_choice(method, head, params)
    parameters = score_choice(names, score_params, temperature, lambda_local)
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
    if needs_fit_data(choice, names):  # the method's fit or a score's: the ID train split, tuned on val
        fit_data = tuple(load_dataset(id_dataset, data.data_root, s, run.hash_content) for s in ("train", "val"))
    backbone = run.load_backbone()
    fitted = build_head(choice, backbone, id_data, templates, run.cache_dir)
    report = evaluate_ood(backbone, id_data, ood_data, names, default_templates(templates, id_data.name), output_dir,
                          head=fitted, params=parameters, fpr_convention=fpr_convention, cache_dir=run.cache_dir,
                          batch_size=run.batch_size, workers=run.workers, progress=not run.quiet,
                          fit_datasets=fit_data, artefact=artefact)
    metrics = report.record["metrics"]
    table = Table(title=f"OOD detection · ID {id_data.name} ({id_data.split}) · {backbone.display_name} · "
                        f"{report.record['cliplab']['method']} head, ID accuracy {100 * metrics['id_accuracy']:.2f}%")
    for column in ("score", "OOD set", "AUROC", f"FPR@95 ({fpr_convention})", "AUPR-in", "AUPR-out"):
        table.add_column(column, justify="left" if column in ("score", "OOD set") else "right")
    for score_name, per_set in metrics["ood"].items():
        for set_name, m in per_set.items():
            cells = (f"{100 * m[k]:.2f}" for k in ("auroc", "fpr95", "aupr_in", "aupr_out"))
            table.add_row(score_name, set_name, *cells)
    console.print(table)
    if metrics.get("open_set"):  # scores with their own decision (e.g. osloprompt): open-set accuracies, H-score
        opened = Table(title="Open set (%): known = ID accepted and right, unknown = OOD rejected, H = harmonic mean")
        for column in ("score", "OOD set", "known acc", "unknown acc", "H-score"):
            opened.add_column(column, justify="left" if column in ("score", "OOD set") else "right")
        for score_name, per_set in metrics["open_set"].items():
            for set_name, m in per_set.items():
                opened.add_row(score_name, set_name, *(f"{100 * m[k]:.2f}" for k in ("acc_known", "acc_unknown",
                                                                                       "h_score")))
        console.print(opened)
    for name, failures in report.record["cliplab"]["failures"].items():
        err_console.print(f"[yellow]{name}: {len(failures)} image(s) skipped[/] (listed in the JSON)")
    for kind, path in report.files.items():
        console.print(f"{kind}: {path}")
