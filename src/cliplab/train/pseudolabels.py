"""Pseudolabels for unlabelled data (paper 23, Menghini et al., NeurIPS 2023): class-balanced top-K selection
from a model's class probabilities, and GRIP's schedule of how many per class each round takes.

Only probabilities go in: nothing here can see a true label.

:func:`select_top_k` (the authors' ``compute_pseudo_labels`` / ``assign_pseudo_labels``, read in
BatsResearch/menghini-enhanceCLIPwithCLIP-code ``utils/clip_pseudolabels.py``): every row goes to its predicted
class, and each class keeps its K most confident rows (probability of that class, ties to the lower row index).
A class left with fewer than K (few rows predicted as it) is filled from the rows no class kept, best first by
their probability of that class, each row at most once (``fill=True``); so every class ends with K rows where the
pool has enough. Departure from the authors' code: theirs is one pass over the rows in file order with a
"leaderboard" per class whose last entry is compared before it is sorted, and a row that misses its predicted
class is offered to every other class in order of probability without stopping at the first that takes it, so a
row can be kept by two classes and the result depends on the order of the files. Here the result depends only
on the probabilities (a row is kept by at most one class). ``benchmarks``/the outside comparison report how often
the two differ on the same probabilities.

:func:`grip_schedule`: GRIP (their ``grip_train``) runs ``R = 100 // step_quantile`` rounds; with ``m`` pool rows
and ``C`` classes to pseudolabel, round ``r`` takes ``K_r = floor(r * floor(m / R) / C)`` per class (at most
``floor(m / C)``), so the last round uses about all of the pool.
"""

from __future__ import annotations

import numpy as np

from ..errors import CliplabError


def select_top_k(probs, k: int, *, fill: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced pseudolabels: ``(rows, labels)``, at most ``k`` rows per class of ``probs`` (m, C), grouped
    by class (0..C-1) and within a class by decreasing probability of it (ties: lower row first)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise CliplabError(f"pseudolabels: probabilities must be (rows, classes), got shape {probs.shape}")
    if not np.isfinite(probs).all():
        raise CliplabError("pseudolabels: probabilities must be finite")
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise CliplabError(f"pseudolabels: k must be an integer >= 0, got {k!r}")
    k = int(k)
    m, n_classes = probs.shape
    owner = np.full(m, -1, dtype=np.int64)
    if m == 0 or k == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    predicted = probs.argmax(axis=1)
    rows = np.arange(m)
    for c in range(n_classes):
        mine = rows[predicted == c]
        best = mine[np.lexsort((mine, -probs[mine, c]))][:k]
        owner[best] = c
    if fill:
        counts = np.bincount(owner[owner >= 0], minlength=n_classes)
        short = np.flatnonzero(counts < k)
        free = rows[owner < 0]
        if len(short) and len(free):
            cand_rows = np.repeat(free, len(short))
            cand_classes = np.tile(short, len(free))
            order = np.lexsort((cand_classes, cand_rows, -probs[cand_rows, cand_classes]))
            missing = int((k - counts[short]).sum())
            for row, c in zip(cand_rows[order].tolist(), cand_classes[order].tolist()):
                if owner[row] < 0 and counts[c] < k:
                    owner[row] = c
                    counts[c] += 1
                    missing -= 1
                    if missing == 0:
                        break
    kept = rows[owner >= 0]
    labels = owner[kept]
    order = np.lexsort((kept, -probs[kept, labels], labels))
    return kept[order], labels[order]


def rounds_for(step_quantile: int) -> int:
    """GRIP's number of rounds, ``100 // step_quantile`` (their ``int(100 / STEP_QUANTILE)``)."""
    if isinstance(step_quantile, bool) or int(step_quantile) != step_quantile or not 1 <= step_quantile <= 100:
        raise CliplabError(f"GRIP: step_quantile must be an integer percentage 1..100, got {step_quantile!r}")
    return 100 // int(step_quantile)


def grip_schedule(n_pool: int, n_classes: int, step_quantile: int = 10) -> list[int]:
    """Pseudolabels per class of each round, ``K_1..K_R`` (see the module docstring)."""
    rounds = rounds_for(step_quantile)
    if n_classes < 1:
        raise CliplabError("GRIP: no class to pseudolabel")
    per_round = int(n_pool) // rounds
    cap = int(n_pool) // n_classes
    return [min(r * per_round // n_classes, cap) for r in range(1, rounds + 1)]
