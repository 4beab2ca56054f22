"""Tip-Adapter and Tip-Adapter-F: a key-value cache of the few shots added to CLIP's zero-shot logits
(Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification", ECCV 2022)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.utils.multiclass import check_classification_targets

from ..errors import CliplabError, DimensionMismatchError
from ..models.backbone import Backbone
from .base import FEWSHOT_SKIPS, ClipHead, ZeroShotLogitsMixin
from .registry import register

_ROWS = 1024  # rows of X per chunk when computing affinities (bounds memory to rows x cache size)
_SEARCH_ROWS = 256  # validation rows per chunk in the hyperparameter search
_PAIRS = 2048  # (row, class) pairs per chunk when summing their exact cache values
_BLOCK = 5  # consecutive betas sharing one bound in the pruned search
_TOP = 4  # classes per row (by zero-shot logit and by best affinity) bounding where the row can be right


def search_values(scale: float, steps: int) -> list[float]:
    """The authors' grid: ``[i * (scale - 0.1) / steps + 0.1 for i in range(steps)]`` (``utils.search_hp``)."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def _exp_affinity(affinity: np.ndarray, beta: float) -> np.ndarray:
    """``exp(-(beta - beta * affinity))``, written as the authors' code writes it."""
    return np.exp(-(beta - beta * affinity))


class _KeyLayout:
    """Where each class's cache keys are: ``index`` (S, C) holds the key rows of each class (S = the most keys
    of any class), padded with ``n_keys`` (a sentinel column: affinity -inf, value 0).

    Affinities to the keys are arranged shot-major, (n, S, C), so per-class sums and extremes reduce over a
    short axis of contiguous class rows. With the same number of keys in every class (the few-shot case)
    the keys themselves are permuted into that order (``arrange``) and the arrangement is a reshape.
    """

    def __init__(self, labels: np.ndarray, n_classes: int):
        labels = np.asarray(labels, dtype=np.int64)
        self.n_keys = len(labels)
        self.counts = np.bincount(labels, minlength=n_classes)
        width = max(int(self.counts.max(initial=0)), 1)
        self.index = np.full((width, n_classes), self.n_keys, dtype=np.int64)
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        slot = np.arange(self.n_keys) - np.repeat(starts, self.counts)
        self.index[slot, labels[order]] = order
        self.valid = self.index < self.n_keys
        self.balanced = bool((self.counts == width).all())
        self.perm = self.index.ravel() if self.balanced else np.arange(self.n_keys)

    def arrange(self, keys: np.ndarray) -> np.ndarray:
        """The keys (N, d) in the order ``group`` expects."""
        return np.ascontiguousarray(keys[self.perm]) if self.balanced else keys

    def group(self, arranged: np.ndarray, fill: float) -> np.ndarray:
        """Values (n, N) against ``arrange``d keys -> (n, S, C), padding slots set to ``fill``."""
        if self.balanced:
            return arranged.reshape(len(arranged), *self.index.shape)
        padded = np.concatenate([arranged, np.full((len(arranged), 1), fill, arranged.dtype)], axis=1)
        return padded[:, self.index]

    def class_sums(self, arranged: np.ndarray) -> np.ndarray:
        """(n, N) -> (n, C): the sum over each class's keys, i.e. ``values @ one_hot(labels)``."""
        return self.group(arranged, 0.0).sum(axis=1)


def _exact_sums(affinity: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """sum_s exp(-(beta - beta * a_s)) for every beta: (P, S) affinities (-inf padding) -> (P, B) float64."""
    out = np.empty((len(affinity), len(betas)))
    for start in range(0, len(affinity), _PAIRS):
        block = affinity[start:start + _PAIRS, :, None].astype(np.float64)
        out[start:start + _PAIRS] = np.exp(-(betas - betas * block)).sum(axis=1)
    return out


def accuracy_counts_bruteforce(zeroshot, affinity, y, labels, n_classes, betas, alphas) -> np.ndarray:
    """Correct validation rows (B, A) at every (beta, alpha), by the formula itself (the authors' loop).

    ``zeroshot`` (m, C) and ``affinity`` (m, N) are computed by the caller; ``labels`` (N,) are the cache values.
    """
    layout = _KeyLayout(labels, n_classes)
    zeroshot = np.asarray(zeroshot, np.float64)
    affinity = np.asarray(affinity, np.float64)[:, layout.perm]
    counts = np.zeros((len(betas), len(alphas)), np.int64)
    for b, beta in enumerate(betas):
        cache = layout.class_sums(_exp_affinity(affinity, float(beta)))
        for a, alpha in enumerate(alphas):
            counts[b, a] = int(np.sum(np.argmax(zeroshot + cache * float(alpha), axis=1) == y))
    return counts


def _upper_exp(amax: np.ndarray, span_lo: np.ndarray, span_hi: np.ndarray) -> np.ndarray:
    """The largest exp(-(beta - beta a)) over beta in [span_lo, span_hi] (per block) for each a <= a_max:
    at the low end for a_max <= 1, where it decreases with beta, else at the high end. (k, 1) -> (k, blocks)."""
    beta = np.where(amax > 1.0, span_hi, span_lo)
    return np.exp(-(beta - beta * amax))


def _row_max(values: np.ndarray, rows: np.ndarray, out: np.ndarray, reduce) -> None:
    """``out[r] = reduce(out[r], values[i])`` over the i with ``rows[i] == r`` (``rows`` sorted)."""
    unique, first = np.unique(rows, return_index=True)
    out[unique] = reduce(out[unique], reduce.reduceat(values, first, axis=0))


def accuracy_counts(zeroshot, X, keys, y, labels, n_classes, betas, alphas, workers: int | None = None) -> np.ndarray:
    """Correct validation rows (B, A) at every (beta, alpha) of the grid, the same counts as
    :func:`accuracy_counts_bruteforce` (up to float64 rounding of exact near-ties), without computing
    the cache logits of every (row, class, beta).

    A row i of class y is right at (beta, alpha) when z_y + alpha k_y > z_c + alpha k_c for every class
    c < y and >= for c > y (argmax keeps the first maximum), with z the zero-shot logits and
    k_c(beta) = sum over class c's keys of e(a) = exp(-(beta - beta a)). For alpha >= 0 and beta > 0, k_c is
    at least n_c e(mean a) (e is convex in a: Jensen) and at most n_c e(a_max), and e(a) is monotone in
    beta; so:

    1. k_y is computed exactly for every beta;
    2. lower bounds of a few strong rivals (top zero-shot logits, top affinities) give, per beta, an interval
       of alpha outside which the row is certainly wrong;
    3. per block of 5 betas, upper bounds discard every class that cannot beat y anywhere in those
       intervals (first one test per row, then one per remaining class);
    4. the remaining (row, class) pairs get their exact k_c for the betas of the blocks where they may
       matter, and each gives an exact half-line of alpha where y beats c; the row is right on the
       intersection.

    Outside alpha >= 0 and beta > 0 it falls back to the brute force. Bounds carry a margin of 1e-9 of the
    largest logit, far above float64 round-off, so no decision depends on rounding.

    Chunks of 256 validation rows are independent (their counts add up): ``workers`` threads (default: the
    usable CPUs, at most 4) work on them at once, each with single-threaded BLAS; ``workers=1`` is the serial
    loop. The counts are the same either way (integers summed; each chunk's arithmetic is unchanged).
    """
    if workers is None:
        workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    betas = np.asarray(betas, np.float64)
    alphas = np.asarray(alphas, np.float64)
    y = np.asarray(y)
    labels = np.asarray(labels)
    m, n_b, n_a = len(y), len(betas), len(alphas)
    counts = np.zeros((n_b, n_a), np.int64)
    if m == 0 or n_b == 0 or n_a == 0:
        return counts
    if n_classes == 1:
        counts[:] = m
        return counts
    if betas.min() <= 0 or alphas.min() < 0:
        affinity = np.concatenate([X[i:i + _ROWS] @ keys.T for i in range(0, m, _ROWS)])
        return accuracy_counts_bruteforce(zeroshot, affinity, y, labels, n_classes, betas, alphas)
    layout = _KeyLayout(labels, n_classes)
    arranged = layout.arrange(keys)
    n_per_class = layout.counts.astype(np.float64)
    starts = np.arange(0, n_b, _BLOCK)
    # betas spanned by each block: its own and the first of the next (neighbouring blocks share an end)
    ends = np.minimum(starts + _BLOCK, n_b - 1)
    span_lo = np.array([betas[s:e + 1].min() for s, e in zip(starts, ends)])
    span_hi = np.array([betas[s:e + 1].max() for s, e in zip(starts, ends)])
    top = min(_TOP, n_classes - 1)
    def chunk_counts(start: int) -> np.ndarray:
        """Counts (B, A) of the validation rows start:start + _SEARCH_ROWS."""
        z = np.asarray(zeroshot[start:start + _SEARCH_ROWS], np.float64)
        yc = y[start:start + _SEARCH_ROWS]
        n = len(yc)
        rows = np.arange(n)
        affinity = X[start:start + _SEARCH_ROWS] @ arranged.T  # (n, N) float32
        grouped = layout.group(affinity, -np.inf)  # (n, S, C)
        amax = grouped.max(axis=1)  # (n, C) float32, -inf for a class without keys
        k_y = _exact_sums(grouped[rows, :, yc], betas)  # (n, B)
        z_y = z[rows, yc]
        d0 = z_y[:, None] - z  # (n, C)
        top_e = float(np.exp(-(span_lo - span_lo * float(amax.max()))).max())
        top_e = max(top_e, float(np.exp(-(span_hi - span_hi * float(amax.max()))).max()))
        biggest = max(float(np.abs(z).max()), 1.0) + float(alphas.max()) * float(n_per_class.max()) * top_e
        tol = 1e-9 * biggest

        # 2. where the row can be right at all: the rivals' lower bounds (y is not its own rival)
        rivals = []
        for score in (z, amax):
            masked = np.array(score, np.float64)
            masked[rows, yc] = -np.inf
            rivals.append(np.argpartition(-masked, top - 1, axis=1)[:, :top])
        rivals = np.concatenate(rivals, axis=1)  # (n, R)
        r_rows = rows[:, None]
        r_keys = grouped[r_rows, :, rivals].astype(np.float64)  # (n, R, S)
        r_count = n_per_class[rivals]
        with np.errstate(invalid="ignore", divide="ignore"):
            r_mean = np.where(r_count > 0, np.where(np.isfinite(r_keys), r_keys, 0.0).sum(axis=2) / r_count, -np.inf)
        lower = r_count[..., None] * np.exp(-(betas - betas * r_mean[..., None]))  # (n, R, B), Jensen
        slope = k_y[:, None, :] - lower  # y beats rival c at alpha  =>  d0 + alpha * slope > -tol
        offset = d0[r_rows, rivals][..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            cut = (-tol - offset) / slope
        open_lo = np.where(slope > 0, cut, -np.inf).max(axis=1)  # (n, B)
        open_hi = np.where(slope < 0, cut, np.inf).min(axis=1)
        open_lo[((slope == 0) & (offset <= -tol)).any(axis=1)] = np.inf
        inside = (alphas > open_lo[..., None]) & (alphas < open_hi[..., None])  # (n, B, A)

        # 3. classes that may beat y somewhere in the open part of a block of betas: margins of y over c
        #    throughout block j are at least k_y_min_j - upper_c,j; first with the row's largest affinity to
        #    another class's key (one test per class), then each remaining class's own largest affinity
        in_block = np.logical_or.reduceat(inside, starts, axis=1)  # (n, blocks, A)
        nonempty = in_block.any(axis=2)
        hull_lo = np.where(in_block, alphas, np.inf).min(axis=2)
        hull_hi = np.where(in_block, alphas, -np.inf).max(axis=2)
        hull_lo[~nonempty] = 0.0
        hull_hi[~nonempty] = 0.0
        k_y_min = np.minimum.reduceat(k_y, starts, axis=1)  # (n, blocks)
        others = amax.astype(np.float64)
        others[rows, yc] = -np.inf
        margin = k_y_min - n_per_class.max() * _upper_exp(others.max(axis=1)[:, None], span_lo, span_hi)
        worst = np.minimum(hull_lo * margin, hull_hi * margin)
        reach = np.where(nonempty, tol - worst, -np.inf).max(axis=1)  # no class with d0 above this can matter
        cand_row, cand_class = np.nonzero(d0 <= reach[:, None])
        keep = cand_class != yc[cand_row]
        cand_row, cand_class = cand_row[keep], cand_class[keep]
        upper = n_per_class[cand_class, None] * _upper_exp(
            amax[cand_row, cand_class].astype(np.float64)[:, None], span_lo, span_hi)  # (P, blocks)
        margin = k_y_min[cand_row] - upper
        worst = d0[cand_row, cand_class][:, None] + np.minimum(hull_lo[cand_row] * margin, hull_hi[cand_row] * margin)
        relevant = (worst <= tol) & nonempty[cand_row]  # (P, blocks)

        # 4. exact half-lines of the relevant (row, class) pairs, block by block
        lo, hi = open_lo, open_hi
        for block, (first, last) in enumerate(zip(starts, np.append(starts[1:], n_b))):
            pair_row, pair_class = cand_row[relevant[:, block]], cand_class[relevant[:, block]]
            if not len(pair_row):
                continue
            k_c = _exact_sums(grouped[pair_row, :, pair_class], betas[first:last])  # (P, L)
            slope = k_y[pair_row, first:last] - k_c
            offset = d0[pair_row, pair_class][:, None]
            before = (pair_class < yc[pair_row])[:, None]  # a class before y must be strictly beaten
            with np.errstate(divide="ignore", invalid="ignore"):
                cut = -offset / slope
            pair_lo = np.where(slope > 0, np.where(before, cut, np.nextafter(cut, -np.inf)), -np.inf)
            pair_hi = np.where(slope < 0, np.where(before, cut, np.nextafter(cut, np.inf)), np.inf)
            pair_lo[(slope == 0) & np.where(before, offset <= 0, offset < 0)] = np.inf
            _row_max(pair_lo, pair_row, lo[:, first:last], np.maximum)
            _row_max(pair_hi, pair_row, hi[:, first:last], np.minimum)
        return ((alphas > lo[..., None]) & (alphas < hi[..., None])).sum(axis=0)

    chunks = range(0, m, _SEARCH_ROWS)
    if workers > 1 and len(chunks) > 1:  # NumPy releases the GIL: chunks on parallel threads, BLAS on one each
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            for part in pool.map(chunk_counts, chunks):
                counts += part
    else:
        for start in chunks:
            counts += chunk_counts(start)
    return counts


class _TipBase(ZeroShotLogitsMixin, ClipHead):
    """What Tip-Adapter and Tip-Adapter-F share: the cache, the logits and the search (not registered)."""

    def _check_params(self):
        name = type(self).__name__
        scale, step = tuple(self.search_scale), tuple(self.search_step)
        if len(scale) != 2 or len(step) != 2:
            raise CliplabError(f"{name}: search_scale and search_step are [beta, alpha] pairs")
        if any(int(s) != s or s < 1 for s in step):
            raise CliplabError(f"{name}: search_step must hold two positive integers, got {list(step)}")
        for key in ("init_alpha", "init_beta"):
            value = getattr(self, key)
            try:
                finite = math.isfinite(float(value))
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise CliplabError(f"{name}: {key} must be a finite number, not {value!r}")
        self._fit_logit_scale()  # checks logit_scale the same way

    def _prepare(self, X, y, views):
        """Validated X, labels, text weights and the initial cache (keys sorted by class, stable)."""
        self._check_params()
        X, y = self._validate(X, y, reset=True)
        check_classification_targets(y)  # a continuous target gets scikit-learn's error
        y = self._check_labels(y)
        n_classes, d = len(self.class_names), X.shape[1]
        text = np.ascontiguousarray(self._zeroshot_weights(), dtype=np.float32)
        if text.shape != (d, n_classes):
            raise DimensionMismatchError(f"{type(self).__name__}: features have width {d} but the text weights are "
                                         f"{text.shape[0]}-d (features from another model?)")
        keys = self._view_mean_keys(X, views)
        order = np.argsort(y, kind="stable")
        self.text_weights_ = text
        self.classes_ = np.arange(n_classes)
        return X, y, np.ascontiguousarray(keys[order], dtype=np.float32), y[order]

    def _search(self, X_val, y_val):
        """The authors' search on validation: beta outer, alpha inner, strictly better accuracy replaces,
        starting from accuracy 0 at (beta, alpha) = (0, 0)."""
        self._check_params()
        betas = search_values(float(self.search_scale[0]), int(self.search_step[0]))
        alphas = search_values(float(self.search_scale[1]), int(self.search_step[1]))
        zeroshot = self._zero_shot_scale() * (X_val @ self.text_weights_)
        counts = accuracy_counts(zeroshot, X_val, self.cache_keys_, y_val, self.cache_labels_, len(self.classes_),
                                 betas, alphas)
        self.search_accuracy_ = counts / max(len(y_val), 1)
        best = int(np.argmax(counts))  # first maximum in row-major order = the authors' loop order
        if counts.flat[best] <= 0:
            return 0.0, 0.0  # no setting beats the code's starting accuracy 0: its (0, 0) stays
        b, a = divmod(best, len(alphas))
        return float(alphas[a]), float(betas[b])

    def _set_hyperparameters(self, X_val, y_val):
        self.alpha_, self.beta_, self.searched_ = float(self.init_alpha), float(self.init_beta), False
        self.search_accuracy_ = np.zeros((0, 0))
        if X_val is not None and self.search_hp:
            X_val, y_val = self._validation_set(X_val, y_val)
            self.alpha_, self.beta_ = self._search(X_val, y_val)
            self.searched_ = True

    # ------------------------------------------------------------------ prediction

    def cache_logits(self, X) -> np.ndarray:
        """The cache term alone (n, C): ``exp(-(beta - beta * X @ cache_keys_.T)) @ one_hot(cache_labels_)``."""
        X = self._checked(X)
        return self._cache_logits(X)

    def _cache_logits(self, X: np.ndarray) -> np.ndarray:
        layout = _KeyLayout(self.cache_labels_, len(self.classes_))
        keys = layout.arrange(self.cache_keys_)
        out = np.empty((len(X), len(self.classes_)), np.float32)
        for start in range(0, len(X), _ROWS):
            affinity = X[start:start + _ROWS] @ keys.T
            out[start:start + _ROWS] = layout.class_sums(_exp_affinity(affinity, self.beta_))
        return out

    def logits(self, X) -> np.ndarray:
        """``logit_scale_ * X @ text_weights_ + alpha_ * exp(-(beta_ - beta_ * X @ cache_keys_.T)) @ L`` (n, C)."""
        X = self._checked(X)
        return self._zero_shot_scale() * (X @ self.text_weights_) + self.alpha_ * self._cache_logits(X)

    def fit_summary(self) -> dict:
        return {"alpha": self.alpha_, "beta": self.beta_, "searched": self.searched_}


@register("tip-adapter", family="fewshot", paper=None, needs_train=True, needs=("val", "views"),
          default_templates="dataset")
class TipAdapter(_TipBase):
    """Tip-Adapter: zero-shot logits plus alpha times a training-free cache of the few-shot features.

    Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification" (ECCV 2022);
    not in ../shared/papers.md (paper None). Follows the authors' code, github.com/gaopengcuhk/Tip-Adapter
    @ d0e2d6f (``main.py`` ``run_tip_adapter``, ``utils.py`` ``build_cache_model`` and ``search_hp``).

    With f the (L2-normalised) image feature, W the (d, C) zero-shot text weights, K the cache keys (one row
    per training item, N·K rows for N classes x K shots) and L the one-hot cache values (NK, C):

        logits = logit_scale · f W + alpha · exp(-beta (1 - f Kᵀ)) L

    written as the code: ``100. * f @ W + alpha * ((-1) * (beta - beta * f @ K)).exp() @ L``; logit_scale
    scales only the zero-shot term: ``logit_scale`` if given, else the model's own (``Backbone.logit_scale``,
    fitted as ``logit_scale_``). The code's 100 is CLIP's learned logit scale (exp of the temperature, 100 for
    OpenAI's and most open_clip models), so ``100. * f @ W`` is CLIP's zero-shot logits; for those models the
    default is the code's constant. ``cache_logits(X)`` gives the second term without alpha.

    Names: alpha is the residual ratio (weight of the cache term) and beta the sharpness, as in the paper
    and the current code (``init_alpha``, ``init_beta``, ``search_scale = [beta, alpha]``); the 2021 release
    of the code had the two names swapped.

    Cache keys: with ``views`` (V, n, d), the L2-normalised mean over the V views of each training item;
    without, the rows of ``X``. Stored sorted by class (stable) as ``cache_keys_`` (float32) with their
    labels ``cache_labels_`` (the order of the keys does not change the sum over them).

    Search (``search_hp``, on ``X_val``/``y_val`` only): beta over ``search_values(search_scale[0],
    search_step[0])`` = [i (beta_max - 0.1) / steps + 0.1 for i < steps] in the outer loop, alpha likewise
    in the inner loop; a setting replaces the best one only with strictly higher validation accuracy, starting
    from accuracy 0 at (beta, alpha) = (0, 0) as the code does, so ties keep the first setting in loop order
    and a validation set that no setting classifies at all leaves (0, 0), i.e. the zero-shot logits. The
    accuracy of every setting is kept in ``search_accuracy_`` (beta rows, alpha columns; empty without a
    search). Without validation features (or ``search_hp=False``), alpha = ``init_alpha`` and beta =
    ``init_beta``.
    Defaults are the ImageNet config: search_scale [7, 3], search_step [200, 20], init_beta 1, init_alpha 1.17.

    Departures from the authors' code, and why:

    - Cache keys from views: the code averages the raw (un-normalised) encoder outputs r_v of its
      ``augment_epoch`` (10) augmentations, then normalises; cliplab caches only L2-normalised embeddings
      u_v = r_v / |r_v|, so here the normalised views are averaged, then normalised again. The code's key is
      the direction of sum_v |r_v| u_v, this one of sum_v u_v: the same unit vectors, weighted by their raw
      norms there and equally here. They agree when an item's views have equal raw norms and differ
      otherwise (CLIP's raw feature norms vary from image to image), so the keys are close to, not equal to,
      the authors'.
    - Float32/float64 NumPy on the CPU instead of float16 cache values on the GPU.
    - The search computes the same accuracies as the authors' loop without evaluating every
      (beta, alpha) on every class: bounds on the cache term prune the classes that cannot change a row's
      outcome and the rest are solved exactly (``accuracy_counts``; equal to the brute force
      ``accuracy_counts_bruteforce`` up to exact float64 ties). Ties between logits go to the lower class
      index (argmax) where the code's ``topk`` leaves them unspecified.
    - The authors' ImageNet script (``main_imagenet.py``) searches on the test set; here only ``X_val`` is used.
    - Zero-shot logit scale: the code multiplies by the constant 100, CLIP's logit scale; here by the model's own
      scale (the same 100 for CLIP). A model trained with another temperature (cliplab's 32-px recipe models:
      about 12-14) would otherwise get zero-shot logits 100 / scale times sharper than its own, so the searched
      alpha range (relative to those logits) would weigh the cache 100 / scale times less than the authors' grid
      does for CLIP: on recipe:cifar10-signal (scale 12.3) the CIFAR-10 search always picked the grid's smallest
      alpha and the Fashion-MNIST search its largest. ``logit_scale=100`` restores the constant.
    - A class of ``class_names`` without training items gets a zero cache column (the code's
      ``F.one_hot`` would give a narrower or misaligned matrix).
    """

    # The scikit-learn estimator checks this head cannot pass, with the reason (heads/base.py, end).
    _contract_skips = FEWSHOT_SKIPS

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        templates: str | Sequence[str] | Mapping[str, Sequence[str]] = "generic",
        cache_dir: str | Path | None = None,
        init_alpha: float = 1.17,
        init_beta: float = 1.0,
        search_hp: bool = True,
        search_scale: Sequence[float] = (7.0, 3.0),
        search_step: Sequence[int] = (200, 20),
        logit_scale: float | None = None,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.templates = templates
        self.cache_dir = cache_dir
        self.init_alpha = init_alpha
        self.init_beta = init_beta
        self.search_hp = search_hp
        self.search_scale = search_scale
        self.search_step = search_step
        self.logit_scale = logit_scale

    def fit(self, X, y, X_val=None, y_val=None, views=None):
        """Build the cache from the training features (``views`` if given) and search alpha, beta on validation."""
        X, y, keys, labels = self._prepare(X, y, views)
        self.cache_keys_, self.cache_labels_ = keys, labels
        self._set_hyperparameters(X_val, y_val)
        return self


@register("tip-adapter-f", family="fewshot", paper=None, needs_train=True, needs=("val", "views"),
          default_templates="dataset")
class TipAdapterF(_TipBase):
    """Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned by cross-entropy on the few shots.

    Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification" (ECCV 2022);
    not in ../shared/papers.md (paper None). Follows the authors' code, github.com/gaopengcuhk/Tip-Adapter
    @ d0e2d6f (``main.py`` ``run_tip_adapter_F``). Logits, cache and search are Tip-Adapter's (see
    ``TipAdapter``: logit_scale · f W + alpha · exp(-beta (1 - f Kᵀ)) L, alpha = residual ratio, beta =
    sharpness, as the paper and current code name them; the 2021 code had them swapped; the zero-shot term uses the
    model's own logit scale by default, as Tip-Adapter).

    Training (torch, CPU): the keys K (initialised as Tip-Adapter's) are the weight of an
    ``nn.Linear(d, NK, bias=False)``, so the affinity is ``adapter(f) = f Kᵀ``; AdamW(lr=``lr``, eps=1e-4,
    weight_decay=``weight_decay`` (torch's default 0.01)); CosineAnnealingLR with T_max = epochs x batches,
    stepped every batch; ``epochs`` passes over the training items in batches of ``batch_size`` (256),
    shuffled by a ``torch.Generator`` seeded with ``random_state``; loss = cross-entropy of the Tip logits
    with alpha = ``init_alpha`` and beta = ``init_beta`` held fixed. Keys are not re-normalised after
    training (as the code). Then alpha and beta are searched on validation with the trained keys, as in
    Tip-Adapter. ``cache_keys_`` holds the trained keys (float32), ``training_loss_`` the mean batch loss of
    each epoch (what the code prints).

    Departures from the authors' code, and why:

    - Training features: the code re-encodes a fresh random augmentation of every training image each
      epoch; cliplab trains on cached features, so epoch e uses view ``e mod V`` of ``views`` (V, n, d)
      (V augmentations cycled), or ``X`` every epoch without views. Keys from views: the mean of the
      normalised views (see ``TipAdapter``).
    - The released code keeps the epoch with the best accuracy on the TEST set (its issue 11); here the keys
      of the last epoch are kept, and test features never reach ``fit``.
    - Float32 training on the CPU instead of the float16 adapter on the GPU (eps=1e-4 is kept; torch's
      fused AdamW kernel where available, the same update); the cache term is summed per class (a reshape
      of the keys arranged shot-major, or ``index_add``) instead of a matrix product with the one-hot values
      (the same sum), and the keys' order inside training does not change the update.
    - Tip-Adapter's departures apply (search exactness, test-set search on ImageNet, empty classes).
    """

    # The scikit-learn estimator checks this head cannot pass, with the reason (heads/base.py, end).
    _contract_skips = FEWSHOT_SKIPS

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        templates: str | Sequence[str] | Mapping[str, Sequence[str]] = "generic",
        cache_dir: str | Path | None = None,
        init_alpha: float = 1.17,
        init_beta: float = 1.0,
        search_hp: bool = True,
        search_scale: Sequence[float] = (7.0, 3.0),
        search_step: Sequence[int] = (200, 20),
        logit_scale: float | None = None,
        epochs: int = 20,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        batch_size: int = 256,
        random_state: int = 1,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.templates = templates
        self.cache_dir = cache_dir
        self.init_alpha = init_alpha
        self.init_beta = init_beta
        self.search_hp = search_hp
        self.search_scale = search_scale
        self.search_step = search_step
        self.logit_scale = logit_scale
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.random_state = random_state

    def fit(self, X, y, X_val=None, y_val=None, views=None):
        """Build the cache, fine-tune its keys on the training views, then search alpha, beta on validation."""
        X, y, keys, labels = self._prepare(X, y, views)
        if int(self.epochs) != self.epochs or self.epochs < 0:
            raise CliplabError(f"{type(self).__name__}: epochs must be a non-negative integer, got {self.epochs}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise CliplabError(f"{type(self).__name__}: batch_size must be a positive integer, got {self.batch_size}")
        samples = np.asarray(views, dtype=np.float32) if views is not None else X[None]
        keys, losses = self._train(keys, labels, samples, y)
        self.cache_keys_, self.cache_labels_ = keys, labels
        self.training_loss_ = losses
        self._set_hyperparameters(X_val, y_val)
        return self

    def _train(self, keys: np.ndarray, labels: np.ndarray, samples: np.ndarray, y: np.ndarray):
        """The code's training loop; returns the trained keys (NK, d) float32 and the loss of each epoch."""
        import torch
        import torch.nn.functional as F

        n_classes, (n_views, n, d) = len(self.classes_), samples.shape
        epochs, batch = int(self.epochs), int(self.batch_size)
        alpha, beta = float(self.init_alpha), float(self.init_beta)
        layout = _KeyLayout(labels, n_classes)  # keys shot-major when balanced: the class sums are a reshape
        adapter = torch.nn.Linear(d, len(keys), bias=False)
        adapter.weight = torch.nn.Parameter(torch.from_numpy(np.array(layout.arrange(keys), np.float32)))
        values = torch.from_numpy(labels.astype(np.int64))
        text = torch.tensor(self.text_weights_)  # a copy: the fitted array may be read-only
        targets = torch.from_numpy(y.astype(np.int64))
        options = {"lr": float(self.lr), "eps": 1e-4, "weight_decay": float(self.weight_decay)}
        try:  # the fused kernel is the same update in one pass over the keys
            optimizer = torch.optim.AdamW(adapter.parameters(), fused=True, **options)
        except (RuntimeError, TypeError, ValueError):  # pragma: no cover - older torch without fused CPU AdamW
            optimizer = torch.optim.AdamW(adapter.parameters(), **options)
        batches = math.ceil(n / batch)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs * batches, 1))
        generator = torch.Generator().manual_seed(int(self.random_state))
        losses = []
        for epoch in range(epochs):
            features = torch.tensor(samples[epoch % n_views])  # a copy: views may be read-only
            order = torch.randperm(n, generator=generator)
            epoch_losses = []
            for start in range(0, n, batch):
                rows = order[start:start + batch]
                feature, target = features[rows], targets[rows]
                affinity = adapter(feature)
                weights = (beta * affinity - beta).exp()  # = ((-1) * (beta - beta * affinity)).exp(), bit for bit
                if layout.balanced:
                    cache = weights.view(len(rows), *layout.index.shape).sum(dim=1)
                else:
                    cache = torch.zeros(len(rows), n_classes).index_add_(1, values, weights)
                tip = self.logit_scale_ * (feature @ text) + cache * alpha
                loss = F.cross_entropy(tip, target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                epoch_losses.append(float(loss.item()))
            losses.append(float(np.mean(epoch_losses)))
        trained = np.empty_like(keys)
        trained[layout.perm] = adapter.weight.detach().numpy()
        return trained, losses

    def fit_summary(self) -> dict:
        return {**super().fit_summary(), "epochs": int(self.epochs)}
