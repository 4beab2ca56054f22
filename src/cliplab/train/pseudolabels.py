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
on the probabilities (a row is kept by at most one class); ``rule="authors"`` restates their leaderboard (rows in
pool order) for exact reproduction. The outside comparison (their functions on the same logits) finds their
selection equal to ``rule="authors"`` and differing from the default in part of the rows.

:func:`grip_schedule`: GRIP (their ``grip_train``) runs ``R = 100 // step_quantile`` rounds; with ``m`` pool rows
and ``C`` classes to pseudolabel, round ``r`` takes ``K_r = floor(r * floor(m / R) / C)`` per class (at most
``floor(m / C)``), so the last round uses about all of the pool.
"""

from __future__ import annotations

import numpy as np

from ..errors import CliplabError

RULES = ("balanced", "authors")


def select_top_k(probs, k: int, *, fill: bool = True, rule: str = "balanced") -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced pseudolabels: ``(rows, labels)``, at most ``k`` rows per class of ``probs`` (m, C), grouped
    by class (0..C-1) and within a class by decreasing probability of it (ties: lower row first).

    ``rule="authors"`` is the authors' one-pass leaderboard instead (see the module docstring; ``fill`` does not
    apply): rows in their order of arrival, a row may come twice (under two classes)."""
    if rule not in RULES:
        raise CliplabError(f"pseudolabels: rule must be one of {', '.join(RULES)}, got {rule!r}")
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
    if rule == "authors":
        return _leaderboards(probs, k)
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


def _leaderboards(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The authors' selection, restated: one pass over the rows in order; a row is offered to its predicted class,
    which takes it while it holds fewer than k, or when it beats the board's last entry (then the board is sorted
    by decreasing probability and cut to k); a row its predicted class refuses is offered to every other class in
    decreasing order of probability by the same rule, without stopping at the first that takes it. Exact ties in
    probability sort by row index here (by file path there)."""
    boards: list[list[tuple[float, int]]] = [[] for _ in range(probs.shape[1])]

    def offer(c: int, p: float, row: int) -> bool:
        board = boards[c]
        if len(board) < k:
            board.append((p, row))
            return True
        if board[-1][0] < p:
            boards[c] = sorted([*board, (p, row)], reverse=True)[:k]
            return True
        return False

    for row, p in enumerate(probs.tolist()):
        c = max(range(len(p)), key=lambda j: (p[j], -j))  # argmax, first of ties
        if not offer(c, p[c], row):
            for _, j in sorted(((p[j], j) for j in range(len(p)) if j != c), reverse=True):
                offer(j, p[j], row)
    rows = [row for board in boards for _, row in board]
    labels = [c for c, board in enumerate(boards) for _ in board]
    return np.asarray(rows, dtype=np.int64), np.asarray(labels, dtype=np.int64)
