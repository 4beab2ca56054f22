"""Schur Complement Entropy (SCE) and the Schur-complement correction of embeddings (paper 20, "Dissecting CLIP").

Paired features ``x`` (the conditioning side: the prompts' text features, or a second image set) and ``y`` (the
images), n rows each, are mapped to kernel feature maps ``phi`` with ``C_ab = phi(a)^T phi(b) / n``. The image
covariance splits into the part the text explains and the Schur complement, the part it does not::

    C_yy = C_yx C_xx^-1 C_xy  +  (C_yy - C_yx C_xx^-1 C_xy)

SCE is the entropy of the complement's eigenvalues ("image generator diversity"); the same entropy of the explained
part is the prompts' diversity. The correction ``y' = y - x C_xx^-1 C_xy`` removes from an embedding what its
prompt predicts of it.

Following the authors' code (aziksh-ospanov/CLIP-DISSECTION, ``SCE/metric/algorithm_utils.py``: ``cov_rff``,
``rff_schur_complement``, ``schur_vendi_from_eigs``, ``get_corrected_embedding``):

- kernels: ``"gaussian"`` (their ``sce_score`` default): random Fourier features ``[cos(xW), sin(xW)] / sqrt(D)``,
  ``W ~ N(0, 1/sigma^2)`` of shape (d, D), the same ``W`` for x and y, so ``phi(a).phi(b)`` approximates
  ``exp(-|a-b|^2 / (2 sigma^2))`` and ``trace C_yy = 1``; ``"cosine"`` (their correction's default): the cosine
  similarity of feature *columns* over the samples divided by the dimension, ``C_ab = A~^T B~ / d`` with each
  column of ``A~`` of unit norm;
- regularisation: ``C_xx + 1e-12 I`` then the pseudo-inverse with torch's default cut-off (singular values below
  ``max(m, n) * eps * s_max`` dropped);
- entropy: their ``schur_vendi_from_eigs``: eigenvalues clamped at 1e-10, ``exp(-sum_i l_i log(l_i / sum_j l_j))``
  (order 1; the weights are the eigenvalues themselves, not normalised, so the score is ``exp(s H(l / s))`` with
  ``s`` the part's share of the variance).

Departures: float64 numpy on the CPU instead of float32 torch on the GPU (in float32 the pseudo-inverse cut-off,
about 6e-4 instead of 1e-12, drops most of ``C_xx``'s spectrum and the numbers change); the frequencies ``W`` come
from ``numpy.random.default_rng(seed)`` (theirs from torch's global generator; ``omegas=`` takes any); the default
``rff_dim`` is 500 (their demo: 2500; matrices are 2 rff_dim square); their exact-kernel variant (a Cholesky of
the joint 2n x 2n Gram matrix, used for their mode pictures) and the Gaussian correction (which draws fresh
frequencies for the corrected feature) are not offered. Note that with ``2 rff_dim >= n`` the feature map of x
has full row rank and the complement is close to zero for any y: use more pairs than features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CliplabError
from .registry import register_analysis

KERNELS = ("gaussian", "cosine")
DEFAULT_SIGMA = 3.5  # the authors' demo.py
DEFAULT_RFF_DIM = 500
RIDGE = 1e-12  # added to C_xx before the pseudo-inverse, as their code
EIGEN_FLOOR = 1e-10  # schur_vendi_from_eigs clamps the eigenvalues here


@dataclass(frozen=True)
class SchurDecomposition:
    """The kernel covariances (m x m) of x and y, the part of ``cov_yy`` that x explains and the Schur complement."""

    cov_xx: np.ndarray
    cov_xy: np.ndarray
    cov_yy: np.ndarray
    explained: np.ndarray  # C_yx C_xx^+ C_xy
    complement: np.ndarray  # C_yy - C_yx C_xx^+ C_xy


@dataclass(frozen=True)
class SCEResult:
    """SCE of the complement (``sce``: what the prompts do not explain) and of the explained part
    (``prompt_diversity``), each part's share of ``trace C_yy``, and the settings that produced them."""

    sce: float
    prompt_diversity: float
    complement_share: float
    explained_share: float
    n: int
    kernel: str
    sigma: float | None
    rff_dim: int | None
    seed: int | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _pair(x, y, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    if kernel not in KERNELS:
        raise CliplabError(f"kernel {kernel!r}: use one of {', '.join(KERNELS)}")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2:
        raise CliplabError(f"SCE takes two 2-D feature arrays, got shapes {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise CliplabError(f"SCE takes paired features: {len(x)} rows of x but {len(y)} of y")
    if kernel == "gaussian" and x.shape[1] != y.shape[1]:
        raise CliplabError(f"the gaussian kernel shares its frequencies between x and y: both need the same width, "
                           f"got {x.shape[1]} and {y.shape[1]}")
    if len(x) < 2:
        raise CliplabError("SCE needs at least 2 pairs")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise CliplabError("SCE features hold NaN or infinite values")
    return x, y


def rff_frequencies(dim: int, rff_dim: int, sigma: float, seed: int = 0) -> np.ndarray:
    """Random Fourier frequencies (dim, rff_dim), N(0, 1/sigma^2): the Gaussian kernel of bandwidth ``sigma``."""
    if sigma <= 0 or rff_dim < 1:
        raise CliplabError(f"the gaussian kernel needs sigma > 0 and rff_dim >= 1, got {sigma} and {rff_dim}")
    return np.random.default_rng(seed).standard_normal((dim, rff_dim)) / sigma


def rff_features(x: np.ndarray, omegas: np.ndarray) -> np.ndarray:
    """``[cos(x W), sin(x W)] / sqrt(D)`` (n, 2D): every row has unit norm; ``phi(a).phi(b) ~ k(a, b)``."""
    product = np.asarray(x, dtype=np.float64) @ np.asarray(omegas, dtype=np.float64)
    return np.hstack([np.cos(product), np.sin(product)]) / np.sqrt(omegas.shape[1])


def cosine_feature_map(x: np.ndarray) -> np.ndarray:
    """Columns scaled to unit norm over the samples, times ``sqrt(n / d)``: ``phi(a)^T phi(b) / n`` is the cosine
    similarity of the columns of a and b divided by the dimension (the authors' ``cosine_kernel(a.T, b.T)``)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(x, axis=0), 1e-8)
    return x / norms * np.sqrt(len(x) / x.shape[1])


def feature_maps(x, y, *, kernel: str = "gaussian", sigma: float = DEFAULT_SIGMA, rff_dim: int = DEFAULT_RFF_DIM,
                 seed: int = 0, omegas: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(phi(x), phi(y))``, each (n, m), with ``C_ab = phi(a)^T phi(b) / n``."""
    x, y = _pair(x, y, kernel)
    if kernel == "cosine":
        return cosine_feature_map(x), cosine_feature_map(y)
    if omegas is None:
        omegas = rff_frequencies(x.shape[1], rff_dim, sigma, seed)
    omegas = np.asarray(omegas, dtype=np.float64)
    if omegas.shape[0] != x.shape[1]:
        raise CliplabError(f"omegas have {omegas.shape[0]} rows for {x.shape[1]}-wide features")
    return rff_features(x, omegas), rff_features(y, omegas)


def regularised_pinv(matrix: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """``pinv(matrix + ridge I)`` for a symmetric matrix, with torch.linalg.pinv's default cut-off: eigenvalues of
    magnitude at most ``size * eps * largest`` are dropped (the singular values of a symmetric matrix are the
    magnitudes of its eigenvalues)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    shifted = matrix + ridge * np.eye(len(matrix))
    values, vectors = np.linalg.eigh(shifted)
    magnitudes = np.abs(values)
    keep = magnitudes > len(matrix) * np.finfo(np.float64).eps * magnitudes.max()
    return (vectors[:, keep] / values[keep]) @ vectors[:, keep].T


def schur_decomposition(x, y, *, kernel: str = "gaussian", sigma: float = DEFAULT_SIGMA,
                        rff_dim: int = DEFAULT_RFF_DIM, seed: int = 0, omegas: np.ndarray | None = None,
                        ridge: float = RIDGE) -> SchurDecomposition:
    """The kernel covariances of paired ``x`` (conditioning) and ``y``, and ``C_yy``'s split by the Schur complement.

    The complement is positive semi-definite up to rounding (it is a covariance of residuals)."""
    phi_x, phi_y = feature_maps(x, y, kernel=kernel, sigma=sigma, rff_dim=rff_dim, seed=seed, omegas=omegas)
    n = len(phi_x)
    cov_xx = phi_x.T @ phi_x / n
    cov_xy = phi_x.T @ phi_y / n
    cov_yy = phi_y.T @ phi_y / n
    explained = cov_xy.T @ regularised_pinv(cov_xx, ridge) @ cov_xy
    return SchurDecomposition(cov_xx, cov_xy, cov_yy, explained, cov_yy - explained)


def schur_vendi(eigenvalues) -> float:
    """``exp(-sum_i l_i log(l_i / sum_j l_j))`` over the eigenvalues clamped at 1e-10 (the authors'
    ``schur_vendi_from_eigs``)."""
    values = np.maximum(np.asarray(eigenvalues, dtype=np.float64), EIGEN_FLOOR)
    return float(np.exp(-np.sum(values * np.log(values / values.sum()))))


def part_eigenvalues(matrix: np.ndarray) -> np.ndarray:
    """Eigenvalues of a part of the decomposition (``eigh`` reads its lower triangle, as torch's does)."""
    return np.linalg.eigvalsh(matrix)


@register_analysis("sce", paper=20, command="cliplab analyse sce")
def sce_score(x, y, *, kernel: str = "gaussian", sigma: float = DEFAULT_SIGMA, rff_dim: int = DEFAULT_RFF_DIM,
              seed: int = 0, omegas: np.ndarray | None = None, ridge: float = RIDGE) -> SCEResult:
    """Schur complement entropy of paired image/text (or image/image) features: diversity the prompts do not explain.

    ``x`` is the conditioning side (text features of each image's prompt), ``y`` the images' features, row i of
    each a pair. Returns the SCE of the complement and of the explained part, with their shares of ``trace C_yy``.
    """
    parts = schur_decomposition(x, y, kernel=kernel, sigma=sigma, rff_dim=rff_dim, seed=seed, omegas=omegas,
                                ridge=ridge)
    total = float(np.trace(parts.cov_yy))
    gaussian = kernel == "gaussian"
    return SCEResult(
        sce=schur_vendi(part_eigenvalues(parts.complement)),
        prompt_diversity=schur_vendi(part_eigenvalues(parts.explained)),
        complement_share=float(np.trace(parts.complement)) / total,
        explained_share=float(np.trace(parts.explained)) / total,
        n=len(np.asarray(x)),
        kernel=kernel,
        sigma=float(sigma) if gaussian else None,
        rff_dim=int(rff_dim if omegas is None else np.asarray(omegas).shape[1]) if gaussian else None,
        seed=int(seed) if gaussian and omegas is None else None,
    )


def correction_matrix(x_ref, y_ref, *, ridge: float = RIDGE) -> np.ndarray:
    """``Gamma* = C_xx^+ C_xy`` (d_x, d_y) of reference pairs under the cosine kernel (the authors' correction)."""
    parts = schur_decomposition(x_ref, y_ref, kernel="cosine", ridge=ridge)
    return regularised_pinv(parts.cov_xx, ridge) @ parts.cov_xy


def correct_embeddings(y, x, gamma: np.ndarray) -> np.ndarray:
    """``y' = y - x Gamma*``: the embeddings ``y`` with what their paired ``x`` (e.g. a prompt) predicts removed."""
    y, x = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    if y.shape[0] != x.shape[0] or x.shape[1] != gamma.shape[0] or y.shape[1] != gamma.shape[1]:
        raise CliplabError(f"correction: y {y.shape}, x {x.shape} and Gamma {gamma.shape} do not fit together")
    return y - x @ gamma


def read_pairs_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` from an .npz holding arrays ``x`` (the conditioning side) and ``y`` (n rows each)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("x", "y") if key not in data.files]
            if missing:
                raise CliplabError(f"{path}: needs arrays 'x' and 'y' (paired rows), lacks {', '.join(missing)}; "
                                   f"has {', '.join(data.files) or 'none'}")
            return np.asarray(data["x"]), np.asarray(data["y"])
    except (OSError, ValueError) as exc:
        raise CliplabError(f"{path}: not a readable .npz ({exc})") from None


def paired_features(backbone, dataset, *, templates: str | list[str] | None = None, limit: int | None = None,
                    seed: int = 0, cache_dir=None, batch_size: int = 64, num_workers: int | None = None,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(text, image, info)`` features of a dataset's image/text pairs: each image with its first caption where the
    dataset has captions, else with one template (drawn with ``seed``) filled with its class name. ``limit``: a
    seeded subset of the images. Images that cannot be read are left out with their texts."""
    from ..data.base import NO_LABEL, Subset
    from ..data.prompts import fill_template, load_templates
    from ..features.embed import embed_images
    from ..features.text import embed_texts

    rng = np.random.default_rng(seed)
    if limit is not None and len(dataset) > limit:
        dataset = Subset(dataset, np.sort(rng.choice(len(dataset), size=int(limit), replace=False)))
    if dataset.captions is not None:
        texts = [captions[0] if captions else None for captions in dataset.captions]
        source = "captions (the first of each image)"
    else:
        if templates is None:
            raise CliplabError(f"{dataset.name}: has no captions; give templates to pair each image with a prompt")
        chosen = load_templates(templates)
        draw = rng.integers(0, len(chosen), size=len(dataset))
        names = dataset.class_names
        texts = [fill_template(chosen[t], names[label]) if label != NO_LABEL else None
                 for t, label in zip(draw, dataset.labels, strict=True)]
        source = f"one seeded template of {len(chosen)} per image, filled with its class name"
    images = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=num_workers,
                          progress=progress)
    rows = {int(index): k for k, index in enumerate(images.indices)}
    keep = [i for i in range(len(dataset)) if i in rows and texts[i] is not None]
    if len(keep) < 2:
        raise CliplabError(f"{dataset.name}: fewer than 2 images with a text to pair")
    image = np.asarray(images.features)[[rows[i] for i in keep]]
    text = embed_texts(backbone, [texts[i] for i in keep], cache_dir)
    info = {"dataset": dataset.name, "split": dataset.split, "pairs": len(keep), "texts": source,
            "skipped": len(dataset) - len(keep), "model": images.model}
    return text, image, info


def write_sce_results(result: SCEResult, info: dict, output_dir: str | Path) -> Path:
    """``sce_<dataset>_<split>_<model>_<hash>.json`` under ``output_dir``: CLIP_benchmark's keys (metrics: the SCE,
    the prompt diversity and the shares) and a ``cliplab`` block with the settings and where the pairs came from."""
    from ..eval.naming import run_stem
    from ..eval.results import results_record, write_json

    metrics = {"sce": result.sce, "prompt_diversity": result.prompt_diversity,
               "complement_share": result.complement_share, "explained_share": result.explained_share}
    settings = {key: value for key, value in result.as_dict().items() if key not in metrics}
    extra = {"paper": 20, **settings, **{key: value for key, value in info.items() if key != "model"}}
    record = results_record(dataset=str(info.get("dataset", "pairs")), model=info.get("model") or {"model": "none"},
                            task="sce", metrics=metrics, extra=extra)
    stem = run_stem("sce", record, dataset=str(info.get("dataset", "pairs")), split=info.get("split"))
    return write_json(record, Path(output_dir) / f"{stem}.json")
