"""PNG plots for reports: confusion matrix and reliability diagram."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import calibration_bins, expected_calibration_error, normalized_confusion  # noqa: E402


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
