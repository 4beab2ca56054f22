"""PNG plots for reports: confusion matrix and reliability diagram."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import calibration_bins, expected_calibration_error, normalized_confusion  # noqa: E402

MARGIN_PX = 4  # a title keeps this far from the figure's edges


def _titles(fig) -> list:
    """The figure's title texts, the non-empty ones: its suptitle (in ``fig.texts``) and every axes' title."""
    return [t for t in [*fig.texts, *(ax.title for ax in fig.axes)] if t.get_text()]


def _rewrap(text, width: int, lines: list[str]) -> None:
    text.set_text("\n".join(textwrap.fill(line, width, break_long_words=True, break_on_hyphens=False) or line
                             for line in lines))


def _save(fig, path: Path) -> Path:
    """Lay the figure out with every title wrapped to fit inside it (a long model path or run name is never
    clipped at the figure's edge), then write the PNG and close the figure."""
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    right = fig.bbox.width - MARGIN_PX
    for text in _titles(fig):
        lines = text.get_text().split("\n")
        width = max(len(line) for line in lines)
        for _ in range(20):  # shrink the wrap width in proportion to the overflow until the title fits
            box = text.get_window_extent(renderer)
            if (box.x0 >= MARGIN_PX and box.x1 <= right) or width <= 8:
                break
            centre = (box.x0 + box.x1) / 2
            room = 2 * min(centre - MARGIN_PX, right - centre)  # the title stays centred where it is
            width = max(8, min(width - 1, int(width * room / box.width)))
            _rewrap(text, width, lines)
            fig.tight_layout()  # room for the added lines
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(y_true, y_pred, class_names: Sequence[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix; cell values printed when there are at most 20 classes."""
    n = len(class_names)
    matrix = normalized_confusion(np.asarray(y_true), np.asarray(y_pred), n)
    size = min(18, max(5, 0.45 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if n <= 50:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def plot_reliability(y_true, probs, path: Path, title: str, n_bins: int = 15) -> Path:
    """Accuracy per confidence bin against the diagonal, with the gap shaded and ECE in the legend."""
    bins = calibration_bins(np.asarray(y_true), np.asarray(probs), n_bins)
    ece = expected_calibration_error(np.asarray(y_true), np.asarray(probs), n_bins)
    centers = (bins["edges"][:-1] + bins["edges"][1:]) / 2
    width = 1.0 / n_bins
    filled = bins["count"] > 0
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.bar(centers[filled], bins["accuracy"][filled], width=width, edgecolor="black", label="accuracy")
    ax.bar(centers[filled], bins["confidence"][filled] - bins["accuracy"][filled], bottom=bins["accuracy"][filled],
           width=width, color="red", alpha=0.3, edgecolor="red", label=f"gap (ECE {100 * ece:.2f}%)")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(title)
    hist.bar(centers, bins["count"], width=width, color="gray", edgecolor="black")
    hist.set_xlabel("confidence (max probability)")
    hist.set_ylabel("images")
    hist.set_xlim(0, 1)
    return _save(fig, path)


def plot_fewshot_curve(table: dict[str, dict[int, tuple[float, float]]], path: Path, title: str) -> Path:
    """Top-1 against shots per class (log scale), one line per method with ± std over seeds."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, by_k in table.items():
        ks = sorted(by_k)
        means = np.array([by_k[k][0] for k in ks]) * 100
        stds = np.array([by_k[k][1] for k in ks]) * 100
        ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    all_k = sorted({k for by_k in table.values() for k in by_k})
    ax.set_xticks(all_k, [str(k) for k in all_k])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_ood_roc(scores: dict[str, dict[str, np.ndarray]], id_name: str, path: Path, title: str) -> Path:
    """ROC curves (ID positive; true-positive rate of ID against false-positive rate of OOD), one per score per OOD
    set; ``scores`` maps score name -> dataset name -> scores (higher = more in-distribution), ``id_name`` the ID
    set."""
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(6, 5.5))
    for score_name, per_set in scores.items():
        for set_name, values in per_set.items():
            if set_name == id_name:
                continue
            labels = np.r_[np.ones(len(per_set[id_name])), np.zeros(len(values))]
            fpr, tpr, _ = roc_curve(labels, np.r_[per_set[id_name], values], drop_intermediate=False)
            ax.plot(fpr, tpr, label=f"{score_name} · {set_name}")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.axhline(0.95, color="gray", linestyle="--", linewidth=0.8, label="TPR 95%")
    ax.set_xlabel("false-positive rate (OOD accepted)")
    ax.set_ylabel(f"true-positive rate ({id_name} accepted)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title)
    return _save(fig, path)


def plot_ood_histograms(scores: dict[str, dict[str, np.ndarray]], id_name: str, path: Path, title: str,
                        bins: int = 40) -> Path:
    """One panel per score: density histograms of the ID scores and of each OOD set's scores."""
    fig, axes = plt.subplots(len(scores), 1, figsize=(6.5, 2.6 * len(scores) + 0.6), squeeze=False)
    for ax, (score_name, per_set) in zip(axes[:, 0], scores.items()):
        everything = np.concatenate(list(per_set.values()))
        edges = np.histogram_bin_edges(everything, bins=bins)
        for set_name, values in per_set.items():
            ax.hist(values, bins=edges, density=True, alpha=0.45 if set_name != id_name else 0.6,
                    label=f"{set_name} (ID)" if set_name == id_name else set_name)
        ax.set_title(score_name, fontsize=9)
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("score (higher = more in-distribution)")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_robustness(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Top-1 and ECE (and OOD AUROC when measured) against corruption severity, one line per corruption.

    ``rows`` are :func:`cliplab.eval.robustness.evaluate_robustness` cells; the clean cell (severity 0) starts
    every line.
    """
    clean = next((r for r in rows if r["corruption"] == "clean"), None)
    names = list(dict.fromkeys(r["corruption"] for r in rows if r["corruption"] != "clean"))
    keys = [("acc1", "top-1 accuracy (%)"), ("ece", "ECE (%)")]
    if any(r.get("auroc") is not None for r in rows):
        keys.append(("auroc", "OOD AUROC, MCM (%)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.8 * len(keys), 4.2))
    for ax, (key, label) in zip(np.atleast_1d(axes), keys, strict=True):
        for name in names:
            cells = sorted((r for r in rows if r["corruption"] == name), key=lambda r: r["severity"])
            if clean is not None:
                cells = [clean, *cells]
            ax.plot([r["severity"] for r in cells], [100 * r[key] for r in cells], marker="o", label=name)
        ax.set_xlabel("severity (0 = clean)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
