"""``cliplab robustness``: accuracy, ECE and OOD AUROC under ImageNet-C-style corruptions (paper 11)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from .common import DataOptions, RunOptions, command, console, default_templates, err_console
from .evaluate import DatasetOpt, OutputDirOpt, _load
from .ood import (
    SCORE_NAMES,
    ArtefactOpt,
    HeadOpt,
    LambdaOpt,
    MethodOpt,
    ParamOpt,
    ScoreParamOpt,
    TemperatureOpt,
    build_head,
    head_choice,
    needs_fit_data,
    score_choice,
)

CORRUPTION_NAMES = ("gaussian_noise", "gaussian_blur", "jpeg_compression", "contrast", "brightness", "pixelate")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliplabError(f"{option} {text!r}: write comma-separated integers, e.g. 1,3,5") from None
    if not values:
        raise CliplabError(f"{option}: give at least one value")
    return values


@command
def robustness(
    dataset: str = DatasetOpt,
    ood: str = typer.Option(None, "--ood", help="OOD dataset (named, folder or manifest; read whole, or its test "
                            "split) for the AUROC and FPR@95 columns of --score; default: none (no OOD columns)."),
    score: str = typer.Option("mcm", "--score", help=f"The OOD score of those columns: {SCORE_NAMES}."),
    method: str = MethodOpt,
    head: Path = HeadOpt,
    params: list[str] = ParamOpt,
    score_params: list[str] = ScoreParamOpt,
    artefact: Path = ArtefactOpt,
    temperature: float = TemperatureOpt,
    lambda_local: float = LambdaOpt,
    ood_clean: bool = typer.Option(False, "--ood-clean", help="Keep the OOD images clean (default: they get the "
                                   "same corruption as the test images)."),
    corruptions: str = typer.Option(",".join(CORRUPTION_NAMES), "--corruptions", help="Comma-separated corruptions."),
    severities: str = typer.Option("1,3,5", "--severities", help="Comma-separated severities, 1..5 (ImageNet-C)."),
    limit: int = typer.Option(1000, "--limit", min=1, help="Images per dataset: a subset drawn with --seed "
                              "(the whole split when it is smaller)."),
    templates: str = typer.Option(None, "--templates", "-t", help="Template set or file of the class texts (default: "
                                  "the dataset's CLIP_benchmark set, else 'imagenet7'); the method's too where it "
                                  "takes templates (default: its own)."),
    output_dir: Path = OutputDirOpt,
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Top-1, ECE and OOD AUROC of any head and score under corruptions at several severities; JSON + PNG."""
    from ..data import load_dataset
    from ..data.corruptions import corruption_parameter
    from ..eval.robustness import evaluate_robustness

    names = [name.strip() for name in corruptions.split(",") if name.strip()]
    levels = _int_list(severities, "--severities")
    if not names:
        raise CliplabError("--corruptions: give at least one corruption")
    for name in names:
        for level in levels:
            corruption_parameter(name, level)
    choice = head_choice(method, head, params)
    scores = [score.strip()] if ood else []
    if ood:
        from ..ood.registry import score_entry

        score_entry(scores[0])
    parameters = score_choice(scores, score_params, temperature, lambda_local) if ood else {}
    if not ood and (score_params or temperature is not None or lambda_local is not None or artefact is not None):
        raise CliplabError("--score-param, --temperature, --lambda-local and --artefact are for the OOD score: "
                           "give --ood")
    test = _load(dataset, data, run, labelled=True)
    ood_data = load_dataset(ood, data.data_root, None, run.hash_content) if ood else None  # whole, or its test split
    fit_data = None
    if needs_fit_data(choice, scores):  # the method's fit or the score's: the train split, tuned on val
        fit_data = tuple(_load(dataset, data, run, split=s, labelled=True) for s in ("train", "val"))
    backbone = run.load_backbone()
    fitted = build_head(choice, backbone, test, templates, run.cache_dir)
    report = evaluate_robustness(backbone, test, default_templates(templates, test.name), head=fitted,
                                 score=scores[0] if scores else "mcm", params=parameters, fit_datasets=fit_data,
                                 artefact=artefact, ood=ood_data,
                                 corruptions=names, severities=levels, limit=limit, seed=run.seed,
                                 ood_corrupted=not ood_clean, output_dir=output_dir, cache_dir=run.cache_dir,
                                 batch_size=run.batch_size, num_workers=run.workers, progress=not run.quiet)
    subset = (f"a seeded subset of {report.num_images} (--limit {limit}, --seed {run.seed})"
              if report.num_images < len(test) else f"all {report.num_images}")
    table = Table(title=f"robustness · {test.name} ({test.split}, {subset} images) · {backbone.display_name} · "
                  f"{report.record['cliplab']['method']} head"
                  + (f" · OOD {ood_data.name} ({report.num_ood} images, {scores[0]})" if ood_data is not None else ""))
    for column in ("corruption", "severity", "top-1", "ECE") + (("AUROC", "FPR@95") if ood_data is not None else ()):
        table.add_column(column, justify="left" if column == "corruption" else "right")
    for row in report.rows:
        cells = [row["corruption"], str(row["severity"]), f"{100 * row['acc1']:.2f}%", f"{100 * row['ece']:.2f}%"]
        if ood_data is not None:
            cells += [f"{100 * row['auroc']:.2f}%", f"{100 * row['fpr95']:.2f}%"]
        table.add_row(*cells)
    console.print(table)
    failed = report.record["cliplab"]["failed_images"]
    if failed:
        err_console.print(f"[yellow]{len(failed)} image(s) skipped[/] (listed in {report.files.get('json')})")
    for kind, path in report.files.items():
        console.print(f"{kind}: {path}")
