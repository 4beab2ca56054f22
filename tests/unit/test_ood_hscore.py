"""H-score and open-set accuracies (cliplab.ood.metrics), against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.errors import CliplabError, FeatureError
from cliplab.ood.metrics import h_score, open_set_metrics


def test_h_score_is_the_harmonic_mean():
    assert h_score(0.8, 0.5) == pytest.approx(2 * 0.8 * 0.5 / 1.3)  # 0.615384...
    assert h_score(0.8, 0.5) == pytest.approx(0.6153846153846154)
    assert h_score(1.0, 1.0) == 1.0
    assert h_score(0.0, 0.9) == 0.0 and h_score(0.0, 0.0) == 0.0
    with pytest.raises(CliplabError, match="in \\[0, 1\\]"):
        h_score(1.5, 0.5)


def test_open_set_metrics_on_a_hand_computed_case():
    # ID: 5 samples; accepted where score >= 0 (rows 0, 1, 3, 4); right where prediction == label (rows 0, 2, 3)
    # -> accepted and right: rows 0 and 3 -> known accuracy 2/5. The score at the threshold itself is accepted (row 4).
    id_predictions = np.array([0, 1, 2, 1, 0])
    id_labels = np.array([0, 0, 2, 1, 1])
    id_scores = np.array([1.0, 0.5, -0.2, 2.0, 0.0])
    # OOD: 4 samples, rejected where score < 0: rows 0 and 2 -> unknown accuracy 2/4
    ood_scores = np.array([-1.0, 0.3, -0.01, 0.0])
    got = open_set_metrics(id_predictions, id_labels, id_scores, ood_scores)
    assert got["acc_known"] == pytest.approx(0.4) and got["acc_unknown"] == pytest.approx(0.5)
    assert got["h_score"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    assert got["threshold"] == 0.0 and got["n_id"] == 5 and got["n_ood"] == 4
    shifted = open_set_metrics(id_predictions, id_labels, id_scores, ood_scores, threshold=0.6)
    # at 0.6 rows 0 and 3 are still accepted (both right); all four OOD scores are below it
    assert shifted["acc_known"] == pytest.approx(2 / 5) and shifted["acc_unknown"] == 1.0


def test_open_set_metrics_refuse_mismatched_input():
    with pytest.raises(FeatureError, match="must match id_scores"):
        open_set_metrics([0, 1], [0, 1, 1], [0.1, 0.2, 0.3], [0.0])
    with pytest.raises(FeatureError, match="NaN"):
        open_set_metrics([0], [0], [np.nan], [0.0])
