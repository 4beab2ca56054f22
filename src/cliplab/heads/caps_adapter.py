"""CapS-Adapter: a Tip-Adapter cache over image and caption features of the support set, plus SuS-X's KL term."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.special import log_softmax
from sklearn.utils.multiclass import check_classification_targets

from ..errors import CliplabError, DimensionMismatchError
from ..models.backbone import Backbone
from .base import FEWSHOT_SKIPS, ClipHead, ZeroShotLogitsMixin
from .registry import register

# The authors' search lists (madapter.py, hparam_search: search_scale [50, 50, 30, 10], search_step [200, 20, 50, 11]).
ALPHAS = tuple(i * (50 - 0.1) / 20 + 0.1 for i in range(20))
BETAS = tuple(i * (50 - 1) / 200 + 1 for i in range(200))
GAMMAS = tuple(i * (30 - 0.1) / 50 + 0.1 for i in range(50))
DELTAS = tuple(i / 10 for i in range(11))
# The coarse grid: members of the authors' lists, spaced about geometrically (alpha, beta, gamma) where the lists are
# linear, since small values matter most (Tip-Adapter's beta is mostly 1-10); 6 x 6 x 7 x 6 = 1512 candidates.
_COARSE_INDEX = {"alpha": (0, 1, 2, 4, 8, 16), "beta": (0, 8, 20, 40, 80, 160), "gamma": (0, 1, 2, 4, 8, 16, 32),
                 "delta": (0, 2, 4, 6, 8, 10)}
_FULL = {"alpha": ALPHAS, "beta": BETAS, "gamma": GAMMAS, "delta": DELTAS}
GRIDS = {
    "full": _FULL,
    "coarse": {key: tuple(_FULL[key][i] for i in index) for key, index in _COARSE_INDEX.items()},
}
# Used without validation features (the authors always search; these are ours): Tip-Adapter's initial alpha = beta = 1,
# the weakest KL weight of the authors' list, and an even mix of image and caption similarities.
DEFAULTS = {"alpha": 1.0, "beta": 1.0, "gamma": 0.1, "delta": 0.5}
KL_SPACES = ("features", "classes")
SCALINGS = ("batch", "fit")
_CHUNK_ELEMENTS = 1 << 22  # rows per chunk x support items: bounds the (rows, support) temporaries (~16 MB float32)
_KEEP_BYTES = 1 << 29  # similarities of the first pass are kept for the second when they fit in 512 MB
_SCORE_ELEMENTS = 1 << 21  # (gammas x rows x classes) float64 logits scored at once in the search (16 MB)


@register("caps-adapter", family="fewshot", paper=13, needs_train=True, needs=("val", "views", "caption_features"),
          default_templates="dataset", per_image={"scaling": "fit"})
class CapSAdapter(ZeroShotLogitsMixin, ClipHead):
    """CapS-Adapter: zero-shot logits + a cache over image and caption features of the shots + a KL term.

    Paper 13 in ../shared/papers.md ("CapS-Adapter: Caption-based MultiModal Adapter in Zero-Shot
    Classification"), following the authors' code (github.com/WLuLi/CapS-Adapter @ bb2182a, ``madapter.py``),
    which builds on SuS-X's TIP-X (``tipx.py``) and Tip-Adapter.

    Support set: the n few-shot training items (the code's ``sus_type='fewshot'``). Image keys S_img (n, d) are
    the rows of ``X``, or with ``views`` (V, n, d) the L2-normalised mean of the views (Tip-Adapter's cache keys);
    caption keys S_cap (n, d) are ``caption_features``, the CLIP text embeddings of each item's caption (computed
    by the pipeline, used as given: L2-normalised like the code's); L (n, C) is the one-hot label matrix and
    W (d, C) the zero-shot text weights. For test features f (m, d):

    - new knowledge   N = (1 - delta) f S_imgᵀ + delta f S_capᵀ                                  (m, n)
    - cache logits    H = exp(-beta (1 - N)) L                                                   (Tip-Adapter)
    - CLIP logits     Z = logit_scale f W                                  (the code: 100; here the model's own)
    - KL divergences  KL_ij = KL(p_i || q_j) = sum_k p_ik (log p_ik - log q_jk), p_i = softmax(f_i / T),
      q_j = softmax(s_j / T) over the feature dimension (``kl_space="features"``, the code), s_j the image keys;
      ``kl_space="classes"`` takes SuS-X's softmax over classes of f W / T and s_j W / T instead; T = temperature
    - KL logits       G = -scale(KL, N) L, scale(x, t) = (x - min x) / (max x - min x) (max t - min t) + min t,
      min and max over the whole matrices (the code's ``scale_``)
    - logits          Z + gamma G + alpha H

    Two modes for the min-max rescaling of G (``scaling``):

    - ``"batch"`` (default; evaluation, the authors' behaviour): min and max over all rows scored together, so a
      row's logits depend on the other rows scored with it (the method is transductive). ``cliplab evaluate`` and
      ``cliplab fewshot`` score the whole test split this way; the published numbers were made so.
    - ``"fit"`` (classifying single images): min and max fixed at fit time, over the validation rows (else the
      training rows) with the chosen delta, stored as ``kl_scale_`` (a, b of ``scale(KL) = a KL + b``); a row's
      logits are then its own. ``cliplab classify`` and the service use it (the method's declared ``per_image``),
      so an image's label never depends on the other images in the folder. With the validation rows as the batch
      both modes give them the same logits.

    With ``gamma = 0`` and ``delta = 0`` this is Tip-Adapter; with ``alpha = gamma = 0`` zero-shot CLIP.
    ``kl_divergences(X)`` gives the KL matrix alone (columns in the order of ``keys_``).

    Search (the code's ``hparam_search``): on the validation features only, over alpha in 0.1 + i 49.9/20
    (20 values), beta in 1 + i 49/200 (200), gamma in 0.1 + i 29.9/50 (50), delta in i/10 (11), in the loop order
    alpha -> beta -> delta -> gamma, a candidate replacing the best only with strictly higher accuracy (ties keep
    the first). A hyperparameter given a value is fixed at that value; one left at None is searched, or without
    validation features takes its default (alpha 1, beta 1, gamma 0.1, delta 0.5: ours, the code always searches).
    Without ``caption_features`` delta is 0 (a non-zero delta is an error).

    Departures from the authors' code, and why:

    - ``search="coarse"`` (default) tries 6 x 6 x 7 x 6 = 1512 of the code's 2.2 million candidates, members of its
      lists spaced about geometrically: alpha 0.1, 2.595, 5.09, 10.08, 20.06, 40.02; beta 1, 2.96, 5.9, 10.8,
      20.6, 40.2; gamma 0.1, 0.698, 1.296, 2.492, 4.884, 9.668, 19.236; delta 0, 0.2, ..., 1. The full grid costs
      an exp over the (validation x support) matrix per (beta, delta) pair (2200) and 1000 logit matrices per pair:
      hours for 1000 classes on a CPU (the code runs it on a GPU). ``search="full"`` is the code's grid. Either
      search gives the choice the code's loop would make on its grid: it is only vectorised (the KL logits are
      computed once per delta, the cache logits once per (beta, delta), and every (alpha, gamma) is scored from
      them, rounded as ``logits`` rounds).
    - ``scale`` runs over all rows given at once (the whole validation set in the search, all of ``X`` in
      ``logits``), as SuS-X does; the code rescales each 8192-row chunk separately. Either way the method is
      transductive: a row's logits depend on the other rows scored with it (min and max of KL and N).
    - The code's KL loop (``get_kl_divergence_sims``, batches of 10) leaves the last (m mod 10) rows of the KL
      matrix at zero, a slip: every row is computed here.
    - The code rounds the rescaled KL matrix to float16 (``affinities.half()``), a precision artefact: float32 and
      float64 here (KL as c_i - r_i s_jᵀ + e_j with the entropy-like terms c, e in float64; its class sums KL L
      in closed form without the (m, n) matrix). ``logits`` computes N as f ((1 - delta) S_img + delta S_cap)ᵀ,
      one product instead of two, equal up to float32 rounding.
    - The code's softmax over the feature dimension (``compute_image_text_distributions`` computes f W, then
      overwrites it with softmax(f / T)) is kept as the default, being what the published numbers used; SuS-X's
      softmax over classes is ``kl_space="classes"``.
    - ``logit_scale`` (the zero-shot term's scale) defaults to the model's own (``Backbone.logit_scale``, fitted as
      ``logit_scale_``), as Tip-Adapter's here. The code's 100 is CLIP's learned logit scale, so CLIP models are
      unchanged; on a model trained to another scale (recipe:cifar10-signal: 12.35) the constant would weigh the
      zero-shot term eightfold against the cache and KL terms. ``logit_scale=100`` restores the constant.
    - If max KL = min KL (one support item), ``scale`` would divide 0 by 0; the rescaled matrix is min N then.
    - The code starts from accuracy 0 with all hyperparameters 0, so if no candidate gets a validation row right it
      keeps 0, 0, 0, 0; here the first candidate is kept (as ``best_on_validation``). Accuracy ties between classes
      go to the lower class index (``argmax``; the code's ``topk`` leaves them unspecified).
    """

    # The scikit-learn estimator checks this head cannot pass, with the reason (heads/base.py, end), and its
    # waiver of the cliplab contract's subset invariance (tests/unit/test_cliplab_contract.py).
    _contract_skips = FEWSHOT_SKIPS | {
        "check_classifiers_one_label": "classes_ are all of class_names (the zero-shot logits score every class)",
        "check_methods_subset_invariance": "the KL term is min-max rescaled over all rows scored together (the "
                                           "method's transductive scaling, as in the authors' code)",
        "cliplab_subset_invariance": "the KL term is min-max rescaled over all rows scored together (the "
                                     "method's transductive scaling, as in the authors' code)",
    }

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        templates: str | Sequence[str] | Mapping[str, Sequence[str]] = "generic",
        cache_dir: str | Path | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        gamma: float | None = None,
        delta: float | None = None,
        temperature: float = 0.5,
        kl_space: str = "features",
        search: str = "coarse",
        logit_scale: float | None = None,
        scaling: str = "batch",
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.templates = templates
        self.cache_dir = cache_dir
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.delta = delta
        self.temperature = temperature
        self.kl_space = kl_space
        self.search = search
        self.logit_scale = logit_scale
        self.scaling = scaling

    # ------------------------------------------------------------------ fitting

    def fit(self, X, y, X_val=None, y_val=None, views=None, caption_features=None):
        """Build the support set (image keys from ``X`` or ``views``, caption keys from ``caption_features``) and
        choose alpha, beta, gamma, delta on (``X_val``, ``y_val``) when given."""
        name = type(self).__name__
        if self.kl_space not in KL_SPACES:
            raise CliplabError(f"{name}: kl_space must be one of {', '.join(KL_SPACES)}, not {self.kl_space!r}")
        if self.search not in GRIDS:
            raise CliplabError(f"{name}: search must be one of {', '.join(GRIDS)}, not {self.search!r}")
        if not self.temperature > 0:
            raise CliplabError(f"{name}: temperature must be positive, not {self.temperature!r}")
        self._fit_logit_scale()  # checks it: one line for a value that is not a finite number
        self._check_scaling()
        X, y = self._validate(X, y, reset=True)
        check_classification_targets(y)
        y = self._check_labels(y)
        n, d = X.shape
        text = np.asarray(self._zeroshot_weights(), dtype=np.float32)
        if text.shape[0] != d:
            raise DimensionMismatchError(f"{name}: features have width {d} but the text weights are "
                                         f"{text.shape[0]}-d (features from another model?)")
        keys = self._view_mean_keys(X, views)
        captions = self._caption_keys(caption_features, n, d)
        if captions is None and self.delta not in (None, 0, 0.0):
            raise CliplabError(f"{name}: delta={self.delta} weighs caption similarities but no caption_features were "
                               "given; pass caption_features (n, d) or delta=0")
        order = np.argsort(y, kind="stable")  # support grouped by class: class sums are contiguous reductions
        self.keys_ = np.ascontiguousarray(keys[order])
        self.caption_keys_ = (np.zeros((0, d), np.float32) if captions is None
                              else np.ascontiguousarray(captions[order]))
        self.support_labels_ = y[order]
        self.text_weights_ = np.ascontiguousarray(text)
        self.classes_ = np.arange(text.shape[1])

        grids = self._grids(X_val is not None)
        searched = X_val is not None and any(len(values) > 1 for values in grids.values())
        if X_val is not None:
            X_val, y_val = self._validation_set(X_val, y_val)
        chosen = self._search(X_val, y_val, grids) if searched else {k: v[0] for k, v in grids.items()}
        self.alpha_, self.beta_, self.gamma_, self.delta_ = (float(chosen[k]) for k in ("alpha", "beta", "gamma",
                                                                                         "delta"))
        self.searched_ = bool(searched)
        reference = X_val if X_val is not None else X  # the rows whose KL range "fit" scaling keeps
        terms = _Terms(self, reference, np.array([self.delta_]))
        self.kl_scale_ = [float(terms.a[0]), float(terms.b[0])]
        return self

    def _check_scaling(self) -> None:
        if self.scaling not in SCALINGS:
            raise CliplabError(f"{type(self).__name__}: scaling must be one of {', '.join(SCALINGS)}, not "
                               f"{self.scaling!r}")

    def _caption_keys(self, caption_features, n: int, d: int) -> np.ndarray | None:
        if caption_features is None:
            return None
        captions = self._validate(caption_features)  # 2-D, finite, float32, width d
        if captions.shape != (n, d):
            raise DimensionMismatchError(f"{type(self).__name__}: caption_features must have shape ({n}, {d}), one "
                                         f"caption embedding per training item, got {captions.shape}")
        return captions

    def _grids(self, with_validation: bool) -> dict[str, tuple[float, ...]]:
        """The values tried per hyperparameter: the given one, else the search list (defaults without validation)."""
        grids = {}
        for key in ("alpha", "beta", "gamma", "delta"):
            value = getattr(self, key)
            if key == "delta" and len(self.caption_keys_) == 0:
                value = 0.0
            if value is not None:
                grids[key] = (float(value),)
            else:
                grids[key] = GRIDS[self.search][key] if with_validation else (DEFAULTS[key],)
        return grids

    # ------------------------------------------------------------------ search

    def _search(self, X_val: np.ndarray, y_val: np.ndarray, grids: dict) -> dict:
        """The code's grid search, vectorised: correct-prediction counts for every (alpha, beta, delta, gamma)."""
        alphas, betas, gammas, deltas = (np.asarray(grids[k], np.float64) for k in ("alpha", "beta", "gamma", "delta"))
        counts = np.zeros((len(alphas), len(betas), len(deltas), len(gammas)), np.int64)
        terms = _Terms(self, X_val, deltas)
        for rows, clip, kl_per_delta, sims in terms.chunks():
            truth = y_val[rows]
            for di, delta in enumerate(deltas):
                kl, knowledge = kl_per_delta[di], terms.knowledge(sims, delta)
                for bi, beta in enumerate(betas):
                    cache = terms.cache_logits(knowledge, beta)
                    counts[:, bi, di, :] += _count_correct(clip, kl, cache, truth, alphas, gammas)
        # the first maximum in C order is the first in the code's loop order alpha -> beta -> delta -> gamma
        ai, bi, di, gi = np.unravel_index(int(np.argmax(counts)), counts.shape)
        return {"alpha": alphas[ai], "beta": betas[bi], "gamma": gammas[gi], "delta": deltas[di]}

    # ------------------------------------------------------------------ prediction

    def kl_divergences(self, X) -> np.ndarray:
        """KL(p_i || q_j) (m, n) between each row of ``X`` and each image key (columns in ``keys_`` order)."""
        X = self._checked(X)
        rows, const = _kl_rows(X, self.text_weights_, self.temperature, self.kl_space)
        support, support_const = _kl_support(self.keys_, self.text_weights_, self.temperature, self.kl_space)
        return _kl_block(rows, const, support, support_const)

    def logits(self, X) -> np.ndarray:
        """``logit_scale f W + gamma_ (KL logits) + alpha_ (cache logits)`` (m, C), the min-max rescaling of the KL
        term over all rows of ``X`` at once (``scaling="batch"``) or as fixed at fit (``"fit"``: rows independent)."""
        X = self._checked(X)
        self._check_scaling()
        terms = _Terms(self, X, np.array([self.delta_]), fixed=self.kl_scale_ if self.scaling == "fit" else None)
        out = np.empty((len(X), len(self.classes_)), np.float64)
        for rows, clip, kl_per_delta, sims in terms.chunks():
            cache = terms.cache_logits(terms.knowledge(sims, self.delta_), self.beta_)
            out[rows] = clip + self.gamma_ * kl_per_delta[0] + self.alpha_ * cache
        return out

    def fit_summary(self) -> dict:
        return {"alpha": self.alpha_, "beta": self.beta_, "gamma": self.gamma_, "delta": self.delta_,
                "searched": self.searched_}


# ---------------------------------------------------------------------- the terms, chunked over query rows

def _kl_rows(F: np.ndarray, W: np.ndarray, temperature: float, space: str) -> tuple[np.ndarray, np.ndarray]:
    """For query rows: r (m, d) and c (m,), float64, such that KL_ij = c_i - r_i . s_j + e_j.

    With u_i the softmax input of row i (f_i / T, or f_i W / T over classes) and p_i = softmax(u_i):
    KL_ij = sum p_i log p_i - p_i . v_j + lse(v_j), and p_i . v_j = r_i . s_j with r_i = p_i / T (features) or
    p_i Wᵀ / T (classes). c_i = sum p_i log p_i (float64)."""
    u = F.astype(np.float64) / temperature if space == "features" else (F.astype(np.float64) @ W) / temperature
    log_p = log_softmax(u, axis=1)
    p = np.exp(log_p)
    const = np.einsum("ij,ij->i", p, log_p)
    r = p / temperature if space == "features" else (p @ W.T.astype(np.float64)) / temperature
    return r, const


def _kl_support(S: np.ndarray, W: np.ndarray, temperature: float, space: str) -> tuple[np.ndarray, np.ndarray]:
    """For the keys: sᵀ (d, n) float64 and e_j = logsumexp(v_j), v_j = s_j / T or s_j W / T."""
    v = S.astype(np.float64) / temperature if space == "features" else (S.astype(np.float64) @ W) / temperature
    peak = v.max(axis=1)
    lse = peak + np.log(np.exp(v - peak[:, None]).sum(axis=1))
    return np.ascontiguousarray(S.T, dtype=np.float64), lse


def _kl_block(rows: np.ndarray, const: np.ndarray, support_t: np.ndarray, support_const: np.ndarray) -> np.ndarray:
    """KL_ij = c_i - r_i . s_j + e_j (float64), c_i + e_j first (both ~ -+log d, their sum small)."""
    return (const[:, None] + support_const[None, :]) - rows @ support_t


class _Terms:
    """CLIP logits, rescaled KL logits (per delta) and similarities (new knowledge per delta) of query rows, by chunk.

    The min-max rescaling needs min and max over all rows first, so this makes two passes; the similarities of
    the first pass are kept for the second when they fit in ``_KEEP_BYTES``. With ``fixed`` = (a, b) (one delta)
    the rescaling is ``a KL + b`` as given and there is one pass."""

    def __init__(self, head: CapSAdapter, X: np.ndarray, deltas: np.ndarray, fixed=None):
        self.head, self.X, self.deltas = head, X, deltas
        labels, n_classes = head.support_labels_, len(head.classes_)
        self.shots = np.bincount(labels, minlength=n_classes).astype(np.float64)  # 1ᵀ L
        self.present, self.starts = np.unique(labels, return_index=True)
        self.n_classes = n_classes
        self.has_captions = len(head.caption_keys_) > 0
        # one delta (logits): N = f ((1 - delta) S_img + delta S_cap)ᵀ, one product instead of two (same up to
        # float rounding); several (the search): f S_imgᵀ and f S_capᵀ, mixed per delta
        self.mixed = None
        if self.has_captions and len(deltas) == 1:
            delta = np.float32(deltas[0])
            self.mixed = (np.float32(1) - delta) * head.keys_ + delta * head.caption_keys_
        n = len(labels)
        self.step = max(1, _CHUNK_ELEMENTS // max(n, 1))
        self.support_t, self.support_const = _kl_support(head.keys_, head.text_weights_, head.temperature,
                                                         head.kl_space)
        self.support_t32 = self.support_t.astype(np.float32)
        # sum_{j in c} s_j and sum_{j in c} e_j: the class sums of KL in closed form
        self.class_keys = self._class_sums(self.support_t)  # (d, C)
        self.class_const = self._class_sums(self.support_const[None, :])[0]  # (C,)
        if fixed is not None:
            self.kept = None
            self.a, self.b = np.array([fixed[0]], np.float64), np.array([fixed[1]], np.float64)
            return
        keep = len(X) * n * 4 * (2 if self.has_captions and self.mixed is None else 1) <= _KEEP_BYTES
        self.kept: list | None = [] if keep else None
        kl_min, kl_max = np.inf, -np.inf
        n_min, n_max = np.full(len(deltas), np.inf), np.full(len(deltas), -np.inf)
        for start in range(0, len(X), self.step):
            rows = slice(start, start + self.step)
            sims = self._similarities(rows)
            if self.kept is not None:
                self.kept.append(sims)
            r, c = _kl_rows(X[rows], head.text_weights_, head.temperature, head.kl_space)
            kl = (c[:, None] + self.support_const[None, :]) - (r.astype(np.float32) @ self.support_t32)
            kl_min, kl_max = min(kl_min, float(kl.min())), max(kl_max, float(kl.max()))
            for di, delta in enumerate(deltas):
                knowledge = self.knowledge(sims, delta)
                n_min[di] = min(n_min[di], float(knowledge.min()))
                n_max[di] = max(n_max[di], float(knowledge.max()))
        # scale(KL, N) = a KL + b; -(a KL + b) L = -a (KL L) - b 1ᵀL
        spread = kl_max - kl_min
        self.a = (n_max - n_min) / spread if spread > 0 else np.zeros(len(deltas))
        self.b = n_min - kl_min * self.a

    def _class_sums(self, E: np.ndarray) -> np.ndarray:
        """E L for E (rows, n) with columns grouped by class: (rows, C), zero for classes without support."""
        sums = np.add.reduceat(E, self.starts, axis=1)
        if len(self.present) == self.n_classes:
            return sums
        out = np.zeros((E.shape[0], self.n_classes), sums.dtype)
        out[:, self.present] = sums
        return out

    def _similarities(self, rows: slice):
        f = self.X[rows]
        if self.mixed is not None:
            return f @ self.mixed.T, None
        image = f @ self.head.keys_.T
        return (image, f @ self.head.caption_keys_.T) if self.has_captions else (image, None)

    @staticmethod
    def knowledge(sims, delta: float) -> np.ndarray:
        image, caption = sims
        if caption is None:
            return image
        return np.float32(1 - delta) * image + np.float32(delta) * caption

    def chunks(self):
        """(rows, CLIP logits (r, C), [KL logits (r, C) per delta], similarities for ``knowledge``)."""
        head = self.head
        for index, start in enumerate(range(0, len(self.X), self.step)):
            rows = slice(start, start + self.step)
            f = self.X[rows]
            sims = self.kept[index] if self.kept is not None else self._similarities(rows)
            clip = head._zero_shot_scale() * (f @ head.text_weights_).astype(np.float64)
            r, c = _kl_rows(f, head.text_weights_, head.temperature, head.kl_space)
            kl_sums = c[:, None] * self.shots[None, :] - r @ self.class_keys + self.class_const[None, :]  # KL L
            kls = [-a * kl_sums - b * self.shots[None, :] for a, b in zip(self.a, self.b)]
            yield rows, clip, kls, sims

    def cache_logits(self, knowledge: np.ndarray, beta: float) -> np.ndarray:
        """exp(-beta (1 - N)) L (float64 class sums of float32 terms)."""
        beta32 = np.float32(beta)
        terms = np.multiply(knowledge, beta32)
        terms -= beta32  # beta N - beta = -(beta - beta N) exactly (IEEE subtraction is sign-symmetric)
        return self._class_sums(np.exp(terms, out=terms)).astype(np.float64)


def _count_correct(clip, kl, cache, truth, alphas, gammas) -> np.ndarray:
    """Correct predictions (len(alphas), len(gammas)) of ``clip + gamma kl + alpha cache`` over the rows: the
    logits of every (alpha, gamma) at once, rounded exactly as ``logits`` rounds them (argmax ties: lower class)."""
    out = np.zeros((len(alphas), len(gammas)), np.int64)
    step = max(1, _SCORE_ELEMENTS // (len(gammas) * clip.shape[1]))
    for start in range(0, len(truth), step):
        rows = slice(start, start + step)
        with_kl = clip[rows][None] + gammas[:, None, None] * kl[rows][None]  # (gammas, rows, C)
        scores = np.empty_like(with_kl)
        for ai, alpha in enumerate(alphas):
            np.add(with_kl, alpha * cache[rows], out=scores)
            out[ai] += (scores.argmax(axis=2) == truth[rows][None]).sum(axis=1)
    return out
