"""``cliplab robustness``: accuracy, ECE and OOD AUROC under ImageNet-C-style corruptions (paper 11)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from .common import DataOptions, RunOptions, command, console, default_templates, err_console
from .evaluate import DatasetOpt, OutputDirOpt, TemplatesOpt, _load

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
    ood: str = typer.Option(None, "--ood", help="OOD dataset (named, folder or manifest) for the MCM AUROC column; "
                            "default: none (no OOD column)."),
    ood_clean: bool = typer.Option(False, "--ood-clean", help="Keep the OOD images clean (default: they get the "
                                   "same corruption as the test images)."),
    corruptions: str = typer.Option(",".join(CORRUPTION_NAMES), "--corruptions", help="Comma-separated corruptions."),
    severities: str = typer.Option("1,3,5", "--severities", help="Comma-separated severities, 1..5 (ImageNet-C)."),
    limit: int = typer.Option(1000, "--limit", min=1, help="Images per dataset: a subset drawn with --seed "
                              "(the whole split when it is smaller)."),
    templates: str = TemplatesOpt,
    output_dir: Path = OutputDirOpt,
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Zero-shot top-1, ECE and OOD AUROC (MCM) under corruptions at several severities; JSON + PNG."""
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
    test = _load(dataset, data, run, labelled=True)
    ood_data = load_dataset(ood, data.data_root, data.split, run.hash_content) if ood else None
    backbone = run.load_backbone()
    report = evaluate_robustness(backbone, test, default_templates(templates, test.name), ood=ood_data,
                                 corruptions=names, severities=levels, limit=limit, seed=run.seed,
                                 ood_corrupted=not ood_clean, output_dir=output_dir, cache_dir=run.cache_dir,
                                 batch_size=run.batch_size, num_workers=run.workers, progress=not run.quiet)
    subset = (f"a seeded subset of {report.num_images} (--limit {limit}, --seed {run.seed})"
              if report.num_images < len(test) else f"all {report.num_images}")
    table = Table(title=f"robustness · {test.name} ({test.split}, {subset} images) · {backbone.model_id}"
                  + (f" · OOD {ood_data.name} ({report.num_ood} images, MCM)" if ood_data is not None else ""))
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
