"""GL-MCM: global and local maximum concept matching (Miyai et al., "GL-MCM: Global and Local Maximum Concept
Matching for Zero-Shot Out-of-Distribution Detection", IJCV 2025 / arXiv 2304.04521; ../shared/papers.md).

Following the authors' code (github.com/AtsuMiyai/GL-MCM, ``utils/detection_util.py::get_ood_scores_clip``):

- global, local (per token) and text features are each L2-normalised;
- ``S_MCM = max_c softmax_c(cos(x, t_c) / T)`` on the global feature (paper eq. 2);
- ``S_L-MCM = max_{p, c} softmax_c(cos(x_p, t_c) / T)``: a softmax over classes for every local token, then the
  maximum over tokens and classes (paper eq. 4, ``np.max(smax_local, axis=(1, 2, 3))`` in the code);
- ``S_GL-MCM = S_MCM + lambda * S_L-MCM`` (eq. 5; ``--lambda_local`` default 1.0, ``--T`` default 1).

The code negates the sum (lower = ID for its metric helpers); here higher = more in-distribution, as for every
score in :mod:`cliplab.ood.scores`. Registered as the OOD score ``glmcm`` (needs features, text weights and patch
grids; parameters ``temperature``, ``lambda_local``, ``local_path``).

Departures from the authors' code:
- Local tokens: the authors take the last block's *value* path (MaskCLIP-style: ``out_proj(v)`` + residual +
  MLP, without query-key attention), then ``ln_post`` and ``proj``. The registered score reads its local
  features from the dense-feature cache (``cliplab.features.dense``); its default ``local_path="final"`` takes
  the ordinary final patch tokens after ``ln_post`` and ``proj`` (what cliplab computed before the cache, kept
  so that no number changed), ``local_path="value"`` the authors' value path.
- Text weights: the code uses one prompt, ``"a photo of a {c}"``; cliplab passes any (ensembled) class weights.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
from scipy.special import softmax

from ..errors import CliplabError, DimensionMismatchError, FeatureError
from .base import OODScore, ScoreInputs
from .registry import register_score


def _array(name: str, values, ndim: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim or 0 in array.shape:
        raise FeatureError(f"{name} must be a non-empty {ndim}-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise FeatureError(f"{name} holds NaN or infinite values")
    return array


def _unit(name: str, array: np.ndarray, axis: int) -> np.ndarray:
    norm = np.linalg.norm(array, axis=axis, keepdims=True)
    if (norm == 0).any():
        raise FeatureError(f"{name} holds an all-zero vector (no direction)")
    return array / norm


def _positive(name: str, value: float, allow_zero: bool = False) -> float:
    ok = isinstance(value, Real) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise CliplabError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def local_mcm(local_features, text_weights, temperature: float = 1.0) -> np.ndarray:
    """L-MCM (paper eq. 4): ``max_{p, c} softmax_c(cos(x_p, t_c) / T)`` over local features (n, P, d) and text
    weights (d, C). Shape (n,)."""
    t = _positive("temperature", temperature)
    local = _array("local_features", local_features, 3)
    w = _array("text_weights", text_weights, 2)
    if local.shape[2] != w.shape[0]:
        raise DimensionMismatchError(f"local_features have {local.shape[2]} dimensions but text_weights (d, C) "
                                     f"have {w.shape[0]} (another model's text weights, or transposed?)")
    cosine = _unit("local_features", local, 2) @ _unit("text_weights", w, 0)  # (n, P, C)
    return softmax(cosine / t, axis=2).max(axis=(1, 2))


def glmcm(global_features, local_features, text_weights, temperature: float = 1.0,
          lambda_local: float = 1.0) -> np.ndarray:
    """GL-MCM (paper eq. 5): ``MCM(global) + lambda_local * L-MCM(local)``; global features (n, d), local
    features (n, P, d), text weights (d, C). Higher = more in-distribution. Shape (n,)."""
    from .scores import mcm

    lam = _positive("lambda_local", lambda_local, allow_zero=True)
    x = _array("global_features", global_features, 2)
    local = _array("local_features", local_features, 3)
    if local.shape[0] != x.shape[0]:
        raise DimensionMismatchError(f"global_features have {x.shape[0]} rows but local_features have "
                                     f"{local.shape[0]}")
    return mcm(x, text_weights, temperature) + lam * local_mcm(local, text_weights, temperature)


@register_score("glmcm", paper="Miyai et al. 2023", needs=("features", "text_weights", "patch_grids"))
class GLMCM(OODScore):
    """MCM plus lambda times local MCM over ViT patch tokens"""

    def __init__(self, temperature: float = 1.0, lambda_local: float = 1.0, local_path: str = "final"):
        self.temperature = temperature
        self.lambda_local = lambda_local
        self.local_path = local_path

    def dense_spec(self) -> dict:
        """The patch tokens of ``local_path``: "final" (the last block's output tokens) or "value" (the authors'
        MaskCLIP-style value path of the last block), read from the dense-feature cache."""
        return {"path": self.local_path}

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        return glmcm(inputs.features, self._needs(inputs.local_features, "patch grids"),
                     self._needs(self.context_.text_weights, "text_weights"), self.temperature, self.lambda_local)
