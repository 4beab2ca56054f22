"""Effective robustness (paper 22, "Quality Not Quantity"; the measure of Taori et al. 2020).

Over a set of runs (models), out-of-distribution accuracy follows in-distribution accuracy along a line once both are
logit-scaled: ``logit(ood) = slope * logit(id) + intercept``, fitted by least squares over the baseline runs (all runs
unless some are named). A run's effective robustness is how far its OOD accuracy lies above that line at its own ID
accuracy, in accuracy: ``ood - sigmoid(slope * logit(id) + intercept)`` (Taori et al.'s definition, what paper 22
plots); the residual on the logit scale is reported beside it. A run on the line has effective robustness 0.

Runs are read from ``cliplab robustness`` JSON files (ID = the clean cell's top-1, OOD = the mean over the corrupted
cells, or one cell with ``shift="NAME:SEVERITY"``), or from a CSV with columns ``name,id,ood`` (accuracies in [0, 1]
or percentages). mlfoundations/clip_quality_not_quantity publishes only its data download scripts, so this follows
the paper's text and Taori et al.'s definition.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import CliplabError
from .registry import register_analysis

CLIP = 1e-6  # accuracies are clipped to [CLIP, 1 - CLIP] before the logit (0 % and 100 % have no logit)


@dataclass(frozen=True)
class Run:
    """One model's ID and OOD top-1 (fractions) and where they came from."""

    name: str
    id_acc: float
    ood_acc: float
    source: str = ""


@dataclass(frozen=True)
class TrendFit:
    """``logit(ood) = slope * logit(id) + intercept``, fitted on ``baseline`` runs."""

    slope: float
    intercept: float
    baseline: tuple[str, ...]

    def predict(self, id_acc) -> np.ndarray:
        """OOD accuracy the trend expects at ``id_acc``."""
        return sigmoid(self.slope * logit(id_acc) + self.intercept)


def logit(p) -> np.ndarray:
    """``log(p / (1 - p))`` of ``p`` clipped to [1e-6, 1 - 1e-6]."""
    p = np.clip(np.asarray(p, dtype=np.float64), CLIP, 1 - CLIP)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def fit_trend(runs: Sequence[Run], baseline: Sequence[str] | None = None) -> TrendFit:
    """Least-squares line through the baseline runs' (logit ID, logit OOD) points (all runs when ``baseline`` is
    None); needs two runs of different ID accuracy."""
    chosen = list(runs) if not baseline else [r for r in runs if r.name in set(baseline)]
    if baseline:
        unknown = sorted(set(baseline) - {r.name for r in runs})
        if unknown:
            raise CliplabError(f"--fit-on names no run: {', '.join(unknown)}; runs: {', '.join(r.name for r in runs)}")
    u = logit([r.id_acc for r in chosen])
    v = logit([r.ood_acc for r in chosen])
    if len(chosen) < 2 or np.ptp(u) < 1e-12:
        raise CliplabError(f"the trend needs at least 2 runs of different ID accuracy to fit, got {len(chosen)}")
    u_mean, v_mean = u.mean(), v.mean()
    slope = float(((u - u_mean) * (v - v_mean)).sum() / ((u - u_mean) ** 2).sum())
    return TrendFit(slope, float(v_mean - slope * u_mean), tuple(r.name for r in chosen))


@register_analysis("effective-robustness", paper=22, command="cliplab robustness-fit")
def effective_robustness(runs: Sequence[Run], baseline: Sequence[str] | None = None) -> dict:
    """Logit-linear trend of OOD vs ID accuracy over runs and each run's effective robustness (its residual).

    Returns ``{"fit": {...}, "runs": [{name, id_acc, ood_acc, predicted_ood, effective_robustness,
    logit_residual, baseline}, ...]}``."""
    fit = fit_trend(runs, baseline)
    rows = []
    for run in runs:
        predicted = float(fit.predict(run.id_acc))
        rows.append({**asdict(run), "predicted_ood": predicted, "effective_robustness": run.ood_acc - predicted,
                     "logit_residual": float(logit(run.ood_acc) - (fit.slope * logit(run.id_acc) + fit.intercept)),
                     "baseline": run.name in fit.baseline})
    return {"fit": {"slope": fit.slope, "intercept": fit.intercept, "baseline": list(fit.baseline),
                    "scale": "logit", "clip": CLIP}, "runs": rows}


def _fraction(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CliplabError(f"{where}: {value!r} is not a number") from None
    if 1 < number <= 100:
        number /= 100  # a percentage
    if not 0 <= number <= 1:
        raise CliplabError(f"{where}: accuracy {value!r} lies outside [0, 1] (or 0-100 %)")
    return number


def read_robustness_json(path: str | Path, shift: str | None = None) -> Run:
    """A run from a ``cliplab robustness`` JSON: ID = the clean top-1, OOD = the corrupted cells' mean top-1, or the
    cell ``shift`` ("NAME:SEVERITY", or "NAME" for the mean over its severities). Named after the model and
    method."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CliplabError(f"{path}: not a readable JSON file ({exc})") from None
    extra = record.get("cliplab", {}) if isinstance(record, dict) else {}
    cells = extra.get("cells") if isinstance(extra, dict) else None
    if record.get("task") != "robustness_corruptions" or not isinstance(cells, list):
        raise CliplabError(f"{path}: not a cliplab robustness result (task robustness_corruptions with cells)")
    clean = [c for c in cells if c.get("corruption") == "clean"]
    shifted = [c for c in cells if c.get("corruption") != "clean"]
    if shift is not None:
        name, _, severity = shift.partition(":")
        shifted = [c for c in shifted if c.get("corruption") == name
                   and (not severity or str(c.get("severity")) == severity)]
    if not clean or not shifted:
        what = f"no cell {shift!r}" if shift and clean else "no clean cell" if not clean else "no corrupted cell"
        raise CliplabError(f"{path}: {what}")
    id_acc = _fraction(clean[0].get("acc1"), f"{path} clean top-1")
    ood_acc = float(np.mean([_fraction(c.get("acc1"), f"{path} top-1") for c in shifted]))
    method = extra.get("method", "")
    name = f"{record.get('model', path.stem)}" + (f" ({method})" if method and method != "zeroshot" else "")
    return Run(name, id_acc, ood_acc, str(path))


def read_runs_csv(path: str | Path) -> list[Run]:
    """Runs from a CSV with a header naming ``name``, ``id`` and ``ood`` columns."""
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CliplabError(f"{path}: not a readable CSV file ({exc})") from None
    if not rows or not {"name", "id", "ood"} <= set(rows[0]):
        raise CliplabError(f"{path}: needs a header with columns name,id,ood and at least one row")
    return [Run(row["name"], _fraction(row["id"], f"{path} row {i + 2} id"),
                _fraction(row["ood"], f"{path} row {i + 2} ood"), str(path)) for i, row in enumerate(rows)]


def read_runs(paths: Sequence[str | Path], shift: str | None = None) -> list[Run]:
    """Runs from robustness JSON files and CSV tables; names made unique (``name #2``) where they repeat."""
    runs: list[Run] = []
    for path in paths:
        if Path(path).suffix.lower() == ".csv":
            runs += read_runs_csv(path)
        else:
            runs.append(read_robustness_json(path, shift))
    seen: dict[str, int] = {}
    unique = []
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        unique.append(run if seen[run.name] == 1 else Run(f"{run.name} #{seen[run.name]}", run.id_acc, run.ood_acc,
                                                          run.source))
    return unique


def plot_effective_robustness(result: dict, path: str | Path, title: str) -> Path:
    """OOD vs ID top-1 on logit axes (ticks in %), the fitted trend and each run labelled with its effective
    robustness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["runs"]
    fit = result["fit"]
    u = logit([r["id_acc"] for r in rows])
    v = logit([r["ood_acc"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    span = np.linspace(u.min() - 0.3, u.max() + 0.3, 50)
    ax.plot(span, fit["slope"] * span + fit["intercept"], color="tab:gray", lw=1.5,
            label=f"trend: logit(OOD) = {fit['slope']:.2f} logit(ID) {fit['intercept']:+.2f}")
    ax.plot(span, span, color="tab:gray", lw=0.8, ls=":", label="OOD = ID")
    for row, x, y in zip(rows, u, v, strict=True):
        ax.scatter([x], [y], color="tab:blue" if row["baseline"] else "tab:orange", zorder=3)
        ax.annotate(f"{row['name']} ({100 * row['effective_robustness']:+.1f})", (x, y), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ticks = np.array([0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    for axis, values in ((ax.xaxis, u), (ax.yaxis, v)):
        low, high = min(values.min(), span.min()) - 0.2, max(values.max(), span.max()) + 0.2
        shown = ticks[(logit(ticks) >= low) & (logit(ticks) <= high)]
        axis.set_ticks(logit(shown), labels=[f"{100 * t:g}%" for t in shown])
    ax.set_xlabel("ID top-1 (logit scale)")
    ax.set_ylabel("OOD top-1 (logit scale)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
