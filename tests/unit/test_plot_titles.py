"""Plot titles are wrapped to fit the figure: a long model path or run name is never clipped at the edge."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cliplab.eval import plots

LONG_MODEL = "/home/someone/experiments/2026-12-07/checkpoints/clip_vit_b32_laion2b_finetuned_on_cifar10_epoch_32"
TITLE = (f"Reliability · zeroshot · cifar10 (test) · {LONG_MODEL}\n"
         "random weights: numbers say nothing about real accuracy")


@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting functions close, kept open for inspection."""
    kept = []
    monkeypatch.setattr(plots.plt, "close", kept.append)
    yield kept
    monkeypatch.undo()
    for fig in kept:
        plots.plt.close(fig)


def _inside(fig, text) -> bool:
    box = text.get_window_extent(fig.canvas.get_renderer())
    return box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y0 >= 0 and box.y1 <= fig.bbox.height


def _words(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_reliability_title_fits_and_keeps_every_character(figures, tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=200)
    labels = rng.integers(0, 10, 200)
    path = plots.plot_reliability(labels, probs, tmp_path / "r.png", TITLE)
    assert path.is_file()
    (fig,) = figures
    titles = [t for t in fig.texts + [ax.title for ax in fig.axes] if t.get_text()]
    assert len(titles) == 1
    assert _inside(fig, titles[0]), titles[0].get_text()
    assert _words(titles[0].get_text()) == _words(TITLE)  # wrapped, nothing dropped or elided


def test_every_plot_title_fits(figures, tmp_path):
    rng = np.random.default_rng(1)
    scores = {"mcm": {"cifar10": rng.normal(1, 1, 50), "svhn": rng.normal(0, 1, 50)}}
    plots.plot_confusion(rng.integers(0, 3, 30), rng.integers(0, 3, 30), ["a", "b", "c"], tmp_path / "c.png", TITLE)
    plots.plot_ood_roc(scores, "cifar10", tmp_path / "roc.png", TITLE)
    plots.plot_ood_histograms(scores, "cifar10", tmp_path / "h.png", TITLE)
    plots.plot_fewshot_curve({"linear-probe": {1: (0.3, 0.01), 2: (0.4, 0.02)}}, tmp_path / "f.png", TITLE)
    assert len(figures) == 4
    for fig in figures:
        for text in fig.texts + [ax.title for ax in fig.axes]:
            if text.get_text():
                assert _inside(fig, text), text.get_text()


def test_a_short_title_is_left_as_it_is(figures, tmp_path):
    plots.plot_reliability(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), tmp_path / "r.png", "short title")
    assert figures[0].axes[0].title.get_text() == "short title"
