"""Pseudolabel selection (paper 23): class-balanced top-K by confidence, the fill of short classes, GRIP's schedule."""

import numpy as np
import pytest

from cliplab.errors import CliplabError
from cliplab.train.pseudolabels import grip_schedule, rounds_for, select_top_k

# 7 rows x 3 classes; argmax: rows 0,1,2,3 -> class 0, rows 4,5 -> class 1, row 6 -> class 2
PROBS = np.array([
    [0.90, 0.05, 0.05],  # 0
    [0.60, 0.30, 0.10],  # 1
    [0.80, 0.15, 0.05],  # 2
    [0.50, 0.10, 0.40],  # 3
    [0.20, 0.70, 0.10],  # 4
    [0.10, 0.85, 0.05],  # 5
    [0.30, 0.20, 0.50],  # 6
])


def test_top_k_per_predicted_class_by_confidence_hand_computed():
    """k=2 without fill: class 0 keeps its two most confident predictions (rows 0: .90, 2: .80; not 1: .60, 3: .50),
    class 1 both of its (5: .85 first, then 4: .70), class 2 its only one (6)."""
    rows, labels = select_top_k(PROBS, 2, fill=False)
    assert rows.tolist() == [0, 2, 5, 4, 6]
    assert labels.tolist() == [0, 0, 1, 1, 2]


def test_a_short_class_is_filled_from_the_rows_no_class_kept():
    """k=2 with fill: class 2 has one prediction; the free rows are 1 (p2=.10) and 3 (p2=.40): row 3 joins class 2."""
    rows, labels = select_top_k(PROBS, 2)
    assert rows.tolist() == [0, 2, 5, 4, 6, 3]  # within class 2 by decreasing p2: row 6 (.50), then row 3 (.40)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_fill_is_greedy_by_probability_and_each_row_at_most_once():
    """k=3: class 0 keeps 0, 2, 1 (3 left over); classes 1 and 2 each need more and row 3 is the only free row:
    its p2 = .40 beats its p1 = .10, so class 2 gets it and class 1 stays at 2."""
    rows, labels = select_top_k(PROBS, 3)
    assert sorted(zip(labels.tolist(), rows.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 4), (1, 5), (2, 3), (2, 6)]
    assert len(set(rows.tolist())) == len(rows)


def test_balanced_on_random_probabilities_against_the_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 5)) * 2
    logits[:, 0] += 1.5  # class 0 predicted far more often than the others
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    k = 40
    rows, labels = select_top_k(probs, k)
    counts = np.bincount(labels, minlength=5)
    assert (counts == k).all()  # 300 rows: every class can be filled to k
    assert len(np.unique(rows)) == len(rows)
    predicted = probs.argmax(axis=1)
    for c in range(5):
        own = np.flatnonzero(predicted == c)
        best_own = own[np.argsort(-probs[own, c], kind="stable")][:k]
        kept = set(rows[labels == c].tolist())
        assert set(best_own.tolist()) <= kept  # its own most confident predictions are all kept
        if len(own) >= k:
            assert kept == set(best_own.tolist())
        ordered = probs[rows[labels == c], c]
        assert (np.diff(ordered) <= 0).all()  # within a class: decreasing confidence


def test_edge_cases_and_bad_input():
    assert [len(a) for a in select_top_k(PROBS, 0)] == [0, 0]
    assert [len(a) for a in select_top_k(np.zeros((0, 3)), 4)] == [0, 0]
    rows, _ = select_top_k(PROBS, 100)
    assert sorted(rows.tolist()) == list(range(7))  # every row, once
    for bad in (-1, 1.5, True):
        with pytest.raises(CliplabError, match="k must be"):
            select_top_k(PROBS, bad)
    with pytest.raises(CliplabError, match="finite"):
        select_top_k(np.full((2, 2), np.nan), 1)
    with pytest.raises(CliplabError, match="shape"):
        select_top_k(np.ones(3), 1)


def test_grip_schedule_hand_computed():
    assert rounds_for(10) == 10 and rounds_for(25) == 4 and rounds_for(30) == 3
    assert grip_schedule(1000, 10, 10) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    # 95 rows, 4 classes, 4 rounds: 23 rows a round; K_r = floor(23 r / 4)
    assert grip_schedule(95, 4, 25) == [5, 11, 17, 23]
    assert grip_schedule(5, 10, 10) == [0] * 10
    with pytest.raises(CliplabError, match="step_quantile"):
        grip_schedule(100, 2, 0)


def test_the_authors_leaderboard_restated_hand_computed():
    """Rows a, b, c in that order, k=2. Their board for class 0 fills with a (.5) and b (.9) unsorted; c (.7) is
    compared with the last entry (.9), refused, and offered to classes 1 (.2) and 2 (.1), which both take it.
    The default rule keeps b and c for class 0 (the two most confident) and gives a to class 1 (its .3 beats .2)."""
    probs = np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.7, 0.2, 0.1]])
    rows, labels = select_top_k(probs, 2, rule="authors")
    assert rows.tolist() == [0, 1, 2, 2] and labels.tolist() == [0, 0, 1, 2]
    rows, labels = select_top_k(probs, 2)
    assert rows.tolist() == [1, 2, 0] and labels.tolist() == [0, 0, 1]
    with pytest.raises(CliplabError, match="rule must be"):
        select_top_k(probs, 2, rule="other")
