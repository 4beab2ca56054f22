"""OOD scores on logits and on features: one value per row, higher = more in-distribution.

The functions take arrays: logit scores (n, C) logits (``ClipHead.logits`` of any head); MCM image features and
class text weights. The classes below register them as plugins (``msp``, ``max-logit``, ``energy``, ``mcm``).
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
from scipy.special import logsumexp, softmax

from ..errors import CliplabError, DimensionMismatchError, FeatureError
from .base import OODScore, ScoreInputs
from .registry import register_score


def _matrix(name: str, values) -> np.ndarray:
    """``values`` as a finite, non-empty 2-D float64 array, else a FeatureError naming ``name``."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise FeatureError(f"{name} must be a non-empty 2-D array (n, C), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise FeatureError(f"{name} holds NaN or infinite values")
    return array


def _temperature(temperature: float) -> float:
    if not (isinstance(temperature, Real) and math.isfinite(temperature) and temperature > 0):
        raise CliplabError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def msp(logits) -> np.ndarray:
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017): ``max_c softmax(logits)_c``, shape (n,)."""
    return softmax(_matrix("logits", logits), axis=1).max(axis=1)


def max_logit(logits) -> np.ndarray:
    """Maximum logit (Hendrycks et al., "Scaling OOD detection to real-world settings", ICML 2022), shape (n,)."""
    return _matrix("logits", logits).max(axis=1)


def energy(logits, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy (Liu et al., "Energy-based OOD detection", NeurIPS 2020; the energy negated):
    ``T * logsumexp(logits / T)``, shape (n,)."""
    t = _temperature(temperature)
    return t * logsumexp(_matrix("logits", logits) / t, axis=1)


def mcm(features, text_weights, temperature: float = 1.0) -> np.ndarray:
    """Maximum concept matching (Ming et al., "Delving into OOD detection with vision-language representations",
    NeurIPS 2022; not in papers.md): ``max_c softmax(cos(x, t_c) / T)`` over L2-normalised image features
    (n, d) and L2-normalised class text weights (d, C). T = 1 by default, as in the authors' code
    (``args.T``); the paper's larger-T analysis is a choice of ``temperature``. Shape (n,)."""
    t = _temperature(temperature)
    x = _matrix("features", features)
    w = _matrix("text_weights", text_weights)
    if x.shape[1] != w.shape[0]:
        raise DimensionMismatchError(
            f"features have {x.shape[1]} dimensions but text_weights (d, C) have {w.shape[0]} "
            "(text weights from another model, or transposed?)")
    x_norm = np.linalg.norm(x, axis=1, keepdims=True)
    w_norm = np.linalg.norm(w, axis=0, keepdims=True)
    if (x_norm == 0).any():
        raise FeatureError(f"features row {int(np.argmin(x_norm[:, 0]))} is all zeros (no direction)")
    if (w_norm == 0).any():
        raise FeatureError(f"text_weights column {int(np.argmin(w_norm[0]))} is all zeros (no direction)")
    cosine = (x / x_norm) @ (w / w_norm)
    return softmax(cosine / t, axis=1).max(axis=1)



# -- the registered plugins (cliplab.ood.registry): the functions above on what an evaluation gives ------------
@register_score("msp", paper="Hendrycks & Gimpel 2017", needs=("logits",))
class MSP(OODScore):
    """maximum softmax probability of any head's logits"""

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        return msp(self._needs(inputs.logits, "logits"))


@register_score("max-logit", paper="Hendrycks et al. 2022", needs=("logits",))
class MaxLogit(OODScore):
    """largest logit of any head"""

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        return max_logit(self._needs(inputs.logits, "logits"))


@register_score("energy", paper="Liu et al. 2020", needs=("logits",))
class Energy(OODScore):
    """T * logsumexp(logits / T) of any head's logits"""

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        return energy(self._needs(inputs.logits, "logits"), self.temperature)


@register_score("mcm", paper="Ming et al. 2022", needs=("features", "text_weights"))
class MCM(OODScore):
    """max softmax of cosine similarities to the class prompts / T"""

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def score(self, inputs: ScoreInputs) -> np.ndarray:
        return mcm(inputs.features, self._needs(self.context_.text_weights, "text_weights"), self.temperature)
