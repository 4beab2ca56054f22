"""``cliplab robustness-fit``: the logit-linear OOD-vs-ID trend over runs and each run's effective robustness
(paper 22)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from .common import console, friendly_errors


@friendly_errors
def robustness_fit(
    results: list[Path] = typer.Argument(..., help="cliplab robustness JSON files (one run each: ID = clean top-1, "
                                         "OOD = mean corrupted top-1) and/or CSV files with columns name,id,ood."),
    shift: str = typer.Option(None, "--shift", help="OOD = this cell of the robustness JSONs instead of the mean "
                              "of the corrupted ones: NAME:SEVERITY (e.g. gaussian_blur:3) or NAME (its severities' "
                              "mean)."),
    fit_on: str = typer.Option(None, "--fit-on", help="Comma-separated run names that fit the trend (default: all "
                               "runs); the others are measured against it."),
    output_dir: Path = typer.Option(Path("results"), "--output-dir", "-o", help="Where the JSON and the plot go."),
    name: str = typer.Option("effective_robustness", "--name", help="File stem of the JSON and PNG written."),
):
    """Fit the logit-scaled OOD-vs-ID accuracy trend over runs; each run's effective robustness; JSON + plot."""
    import json

    from ..analysis.effective_robustness import effective_robustness, plot_effective_robustness, read_runs
    from ..fileio import atomic_write_text

    missing = [str(p) for p in results if not p.is_file()]
    if missing:
        raise CliplabError(f"no such file: {missing[0]}")
    runs = read_runs(results, shift)
    baseline = [part.strip() for part in fit_on.split(",") if part.strip()] if fit_on else None
    result = effective_robustness(runs, baseline)
    result["paper"] = 22
    result["shift"] = shift or "mean of the corrupted cells"
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_text(output_dir / f"{name}.json", json.dumps(result, indent=2))
    fit = result["fit"]
    title = (f"effective robustness · {len(runs)} runs · OOD: {result['shift']} · trend fitted on "
             f"{len(fit['baseline'])}")
    plot_path = plot_effective_robustness(result, output_dir / f"{name}.png", title)
    table = Table(title=f"{title} · logit(OOD) = {fit['slope']:.3f} logit(ID) {fit['intercept']:+.3f}")
    for column in ("run", "ID top-1", "OOD top-1", "trend OOD", "effective robustness", "logit residual", "fit"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in result["runs"]:
        table.add_row(row["name"], f"{100 * row['id_acc']:.2f}%", f"{100 * row['ood_acc']:.2f}%",
                      f"{100 * row['predicted_ood']:.2f}%", f"{100 * row['effective_robustness']:+.2f} pt",
                      f"{row['logit_residual']:+.3f}", "yes" if row["baseline"] else "no")
    console.print(table)
    console.print(f"json: {json_path}")
    console.print(f"plot: {plot_path}")
