"""GL-MCM (papers.md, Miyai et al.): a hand-computed case and the authors' formula written out."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import softmax

from cliplab.errors import DimensionMismatchError, FeatureError
from cliplab.ood import glmcm, local_mcm, mcm

E = math.e
TEXT = np.array([[3.0, 0.0], [0.0, 2.0]])  # (d, C): class 0 = x axis, class 1 = y axis (unnormalised on purpose)


def test_hand_computed_case():
    g = np.array([[2.0, 0.0]])  # cos = (1, 0) -> MCM = e / (e + 1)
    local = np.array([[[0.0, 5.0], [1.0, 1.0]]])  # cos (0, 1) -> e / (e + 1); cos (.71, .71) -> 1/2
    assert local_mcm(local, TEXT)[0] == pytest.approx(E / (E + 1))
    assert glmcm(g, local, TEXT)[0] == pytest.approx(2 * E / (E + 1))
    # T = 0.5, lambda = 0.5: each term is e^2 / (e^2 + 1)
    assert glmcm(g, local, TEXT, temperature=0.5, lambda_local=0.5)[0] == pytest.approx(1.5 * E**2 / (E**2 + 1))
    assert glmcm(g, local, TEXT, lambda_local=0.0)[0] == pytest.approx(mcm(g, TEXT)[0])


def _authors(global_features, local_grid, text, T, lambda_local):
    """get_ood_scores_clip of github.com/AtsuMiyai/GL-MCM (utils/detection_util.py), score='GL-MCM', in numpy:
    text_features is (C, d); local features are (batch, grid, grid, d)."""
    global_features = global_features / np.linalg.norm(global_features, axis=-1, keepdims=True)
    local_grid = local_grid / np.linalg.norm(local_grid, axis=-1, keepdims=True)
    text_features = text / np.linalg.norm(text, axis=-1, keepdims=True)
    smax_global = softmax(global_features @ text_features.T / T, axis=1)
    smax_local = softmax(local_grid @ text_features.T / T, axis=-1)
    mcm_global_score = -np.max(smax_global, axis=1)
    mcm_local_score = -np.max(smax_local, axis=(1, 2, 3))
    return mcm_global_score + lambda_local * mcm_local_score  # lower = ID in their code


@pytest.mark.parametrize(("T", "lam"), [(1.0, 1.0), (0.1, 0.5), (2.0, 3.0)])
def test_matches_the_authors_formula(T, lam):
    rng = np.random.default_rng(0)
    n, grid, d, c = 7, 3, 8, 5
    g = rng.normal(size=(n, d))
    local = rng.normal(size=(n, grid, grid, d))
    text = rng.normal(size=(c, d))
    ours = glmcm(g, local.reshape(n, grid * grid, d), text.T, temperature=T, lambda_local=lam)
    np.testing.assert_allclose(ours, -_authors(g, local, text, T, lam), rtol=1e-12)


def test_local_max_is_over_patches_and_classes_not_a_patch_average():
    local = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # two confident patches, one ambiguous
    assert local_mcm(local, TEXT)[0] == pytest.approx(E / (E + 1))


def test_errors_name_the_argument():
    with pytest.raises(FeatureError, match="local_features"):
        glmcm(np.ones((2, 2)), np.ones((2, 2)), TEXT)
    with pytest.raises(DimensionMismatchError, match="rows"):
        glmcm(np.ones((2, 2)), np.ones((3, 4, 2)), TEXT)
    with pytest.raises(DimensionMismatchError, match="text_weights"):
        local_mcm(np.ones((2, 4, 3)), TEXT)
    with pytest.raises(FeatureError, match="all-zero"):
        local_mcm(np.zeros((1, 2, 2)), TEXT)
