"""SCE (paper 20): the Schur-complement split of kernel covariances, its entropy and the embedding correction,
checked against closed forms and formulas written out here from the paper's definitions."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.analysis.sce import (
    correct_embeddings,
    correction_matrix,
    feature_maps,
    read_pairs_npz,
    rff_frequencies,
    sce_score,
    schur_decomposition,
    schur_vendi,
)
from cliplab.errors import CliplabError


def unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_y_linear_in_x_leaves_no_complement():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6))
    y = x @ rng.standard_normal((6, 6))  # invertible mixing: y is a linear function of x
    parts = schur_decomposition(x, y, kernel="cosine")
    assert np.abs(parts.complement).max() < 1e-9
    np.testing.assert_allclose(parts.explained, parts.cov_yy, atol=1e-9)
    result = sce_score(x, y, kernel="cosine")
    assert result.complement_share < 1e-9 and result.explained_share == pytest.approx(1.0, abs=1e-9)


def test_identical_pairs_leave_no_complement_under_the_gaussian_kernel():
    x = unit_rows(np.random.default_rng(1).standard_normal((600, 5)))
    parts = schur_decomposition(x, x, kernel="gaussian", sigma=0.8, rff_dim=40)
    assert np.abs(parts.complement).max() < 1e-8


def test_independent_y_keeps_its_covariance():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((40000, 3)), rng.standard_normal((40000, 3))  # zero-mean and independent
    parts = schur_decomposition(x, y, kernel="cosine")
    np.testing.assert_allclose(parts.complement, parts.cov_yy, atol=2e-3)
    assert np.trace(parts.explained) < 1e-3


def test_complement_is_positive_semidefinite():
    rng = np.random.default_rng(3)
    x = unit_rows(rng.standard_normal((500, 8)))
    y = unit_rows(x + 0.7 * rng.standard_normal((500, 8)))
    for kernel in ("gaussian", "cosine"):
        parts = schur_decomposition(x, y, kernel=kernel, sigma=1.0, rff_dim=60)
        eigenvalues = np.linalg.eigvalsh((parts.complement + parts.complement.T) / 2)
        assert eigenvalues.min() > -1e-10 * eigenvalues.max()
        assert eigenvalues.max() > 1e-3  # and not trivially zero


def test_gaussian_parts_equal_the_projection_written_out():
    """With more pairs than features, C_yx C_xx^-1 C_xy = phi_y^T P_x phi_y / n, P_x projecting onto phi_x's
    columns (least squares); the features written out as cos/sin of x W over sqrt(D)."""
    rng = np.random.default_rng(4)
    x = unit_rows(rng.standard_normal((300, 4)))
    y = unit_rows(x + 0.5 * rng.standard_normal((300, 4)))
    omegas = rng.standard_normal((4, 10)) / 1.5
    phi_x = np.concatenate([np.cos(x @ omegas), np.sin(x @ omegas)], axis=1) / np.sqrt(10)
    phi_y = np.concatenate([np.cos(y @ omegas), np.sin(y @ omegas)], axis=1) / np.sqrt(10)
    projected = phi_x @ np.linalg.lstsq(phi_x, phi_y, rcond=None)[0]
    parts = schur_decomposition(x, y, kernel="gaussian", omegas=omegas)
    np.testing.assert_allclose(parts.cov_yy, phi_y.T @ phi_y / 300, atol=1e-12)
    np.testing.assert_allclose(parts.explained, phi_y.T @ projected / 300, atol=1e-8)
    np.testing.assert_allclose(parts.complement, phi_y.T @ (phi_y - projected) / 300, atol=1e-8)
    assert np.trace(parts.cov_yy) == pytest.approx(1.0)  # unit-norm random Fourier features


def test_cosine_kernel_written_out():
    """The authors' cosine kernel of x.T and y.T: cosine similarity of feature columns over the samples, / d."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((50, 4)), rng.standard_normal((50, 4)) + 0.3
    expected = np.array([[x[:, i] @ y[:, j] / np.linalg.norm(x[:, i]) / np.linalg.norm(y[:, j]) / 4
                          for j in range(4)] for i in range(4)])
    parts = schur_decomposition(x, y, kernel="cosine")
    np.testing.assert_allclose(parts.cov_xy, expected, atol=1e-12)


def test_gaussian_features_approximate_the_gaussian_kernel():
    rng = np.random.default_rng(6)
    a = unit_rows(rng.standard_normal((6, 5)))
    phi_a, _ = feature_maps(a, a, kernel="gaussian", sigma=0.9, rff_dim=40000, seed=0)
    kernel = np.exp(-((a[:, None] - a[None]) ** 2).sum(-1) / (2 * 0.9 ** 2))
    np.testing.assert_allclose(phi_a @ phi_a.T, kernel, atol=0.02)


def test_schur_vendi_hand_computed():
    assert schur_vendi([0.5, 0.25, 0.25]) == pytest.approx(2 ** 1.5)  # exp(0.5 ln 2 + 0.5 ln 4)
    assert schur_vendi([0.2, 0.2]) == pytest.approx(2 ** 0.4)  # weights are the eigenvalues: exp(0.4 ln 2)
    assert schur_vendi([0.5, 0.5, -1e-14]) == pytest.approx(2.0, rel=1e-8)  # clamped at 1e-10


def test_score_matches_its_parts():
    rng = np.random.default_rng(7)
    x = unit_rows(rng.standard_normal((400, 6)))
    y = unit_rows(x + rng.standard_normal((400, 6)))
    result = sce_score(x, y, sigma=1.0, rff_dim=50, seed=3)
    parts = schur_decomposition(x, y, sigma=1.0, rff_dim=50, seed=3)
    assert result.sce == pytest.approx(schur_vendi(np.linalg.eigvalsh(parts.complement)))
    assert result.prompt_diversity == pytest.approx(schur_vendi(np.linalg.eigvalsh(parts.explained)))
    assert result.complement_share + result.explained_share == pytest.approx(1.0)
    assert 0 < result.complement_share < 1 and result.rff_dim == 50 and result.n == 400
    np.testing.assert_array_equal(rff_frequencies(6, 50, 1.0, 3), rff_frequencies(6, 50, 1.0, 3))


def test_correction_matrix_is_least_squares_of_normalised_columns():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((200, 5))
    y = x @ rng.standard_normal((5, 5)) + 0.1 * rng.standard_normal((200, 5))
    gamma = correction_matrix(x, y)
    x_n, y_n = x / np.linalg.norm(x, axis=0), y / np.linalg.norm(y, axis=0)
    np.testing.assert_allclose(gamma, np.linalg.lstsq(x_n, y_n, rcond=None)[0], atol=1e-9)
    np.testing.assert_allclose(correct_embeddings(y, x, gamma), y - x @ gamma)
    with pytest.raises(CliplabError):
        correct_embeddings(y, x[:, :3], gamma)


def test_refusals(tmp_path):
    x = np.zeros((5, 3))
    with pytest.raises(CliplabError, match="paired"):
        sce_score(x, np.zeros((4, 3)))
    with pytest.raises(CliplabError, match="kernel"):
        sce_score(x, x, kernel="laplace")
    np.savez(tmp_path / "bad.npz", a=x)
    with pytest.raises(CliplabError, match="'x' and 'y'"):
        read_pairs_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "ok.npz", x=x, y=x + 1)
    read_x, read_y = read_pairs_npz(tmp_path / "ok.npz")
    np.testing.assert_array_equal(read_y, x + 1)
