"""AMU-Tuning: a feature-initialised linear classifier on auxiliary features as a logit bias to CLIP
(Tang et al., "AMU-Tuning: Effective Logit Bias for CLIP-based Few-shot Learning", CVPR 2024)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.utils.multiclass import check_classification_targets

from ..errors import CliplabError, DimensionMismatchError, FeatureError
from ..models.backbone import Backbone
from .base import FEWSHOT_SKIPS, FIXED_WIDTH, ClipHead, ZeroShotLogitsMixin, accuracy, best_on_validation
from .registry import register

ALPHAS = (0.1, 0.25, 0.5, 1.0, 2.0)  # fusion weights tried on validation (the code has no search; see below)
UNCERTAINTIES = ("none", "moment")
WEIGHT_DECAY = 0.01  # train.py: AdamW(weight_decay=0.01, eps=1e-4)
ADAM_EPS = 1e-4
KURTOSIS_SCALE = 250.0  # clip/amu.py, uncertainty 'moment': 1 / ((kappa / 250) ** power)
_ROWS = 8192  # rows per chunk at prediction (bounds the (rows, C) float64 temporaries)
MAX_BATCHES_PER_EPOCH = 250  # above n = 250 x batch_size items the batch grows (see the docstring)
_CLIP_CACHE_BYTES = 1 << 29  # clip logits of the training views kept for the whole training up to 512 MiB


def _split_blocks(X: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The CLIP block ``X[:, :d]`` and auxiliary block ``X[:, d:]``, each L2-normalised per row as the code's
    forward does (a no-op for the cache's features; an all-zero row stays zero)."""
    blocks = []
    for block in (X[:, :d], X[:, d:]):
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        blocks.append(block / np.where(norms > 0, norms, 1).astype(block.dtype))
    return blocks[0], blocks[1]


def zscore_over_classes(logits: np.ndarray) -> np.ndarray:
    """The code's ``logit_normalize``: ``(l - mean) / std`` over the classes of each row, std unbiased (C - 1).
    A row of equal values (std 0, or a single class) gives zeros instead of the code's NaN."""
    logits = np.asarray(logits, dtype=np.float64)
    centred = logits - logits.mean(axis=1, keepdims=True)
    if logits.shape[1] < 2:
        return np.zeros_like(logits)
    std = logits.std(axis=1, ddof=1, keepdims=True)
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


def uncertainty_factor(clip_logits: np.ndarray, kind: str, power: float) -> np.ndarray:
    """The fusion factor of each row (n, 1): 1 for ``"none"``; for ``"moment"`` with p = softmax(clip logits) and
    z its z-score over the classes (unbiased std), kappa = mean(z^4), factor = 1 / (kappa / 250)^power.
    Where all p are equal (std 0) kappa is taken as its infimum ((C - 1) / C)^2, the largest finite factor;
    with a single class the factor is 1."""
    n, n_classes = clip_logits.shape
    if kind == "none" or n_classes < 2:
        return np.ones((n, 1))
    logits = np.asarray(clip_logits, dtype=np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    z = zscore_over_classes(p)
    std = p.std(axis=1, ddof=1, keepdims=True)
    kappa = np.where(std > 0, np.mean(z ** 4, axis=1, keepdims=True), ((n_classes - 1) / n_classes) ** 2)
    return 1.0 / (kappa / KURTOSIS_SCALE) ** float(power)


def _loss_and_gradient(aux, weights, clip_logits, gain, onehot, lam: float):
    """The code's loss on one batch and its gradient in W, written out (no autograd: the same values, faster).

    l = aux Wᵀ, z = (l - mean) / s (s the unbiased std; 1 where s = 0), logits = clip + gain · z,
    loss = lam · CE(logits) + (1 - lam) · CE(z). With G = dloss/dz = [lam · gain · (softmax(logits) - Y)
    + (1 - lam) · (softmax(z) - Y)] / B, the z-score's backward is dl = (G - mean(G) - z · sum(G z) / (C - 1)) / s
    (as sum(z²) = C - 1), and dW = dlᵀ aux.
    """
    import torch

    batch, n_classes = onehot.shape
    raw = aux @ weights.T
    centred = raw - raw.mean(dim=1, keepdim=True)
    std = (centred.square().sum(dim=1, keepdim=True) / max(n_classes - 1, 1)).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # equal logits: z = 0, not the code's NaN
    z = centred / std
    logits = clip_logits + gain * z
    log_p_merge = torch.log_softmax(logits, dim=1)
    log_p_aux = torch.log_softmax(z, dim=1)
    loss = -(lam * (onehot * log_p_merge).sum() + (1 - lam) * (onehot * log_p_aux).sum()) / batch
    g = (lam * gain * (log_p_merge.exp() - onehot) + (1 - lam) * (log_p_aux.exp() - onehot)) / batch
    g_raw = (g - g.mean(dim=1, keepdim=True) - z * ((g * z).sum(dim=1, keepdim=True) / max(n_classes - 1, 1))) / std
    return loss, g_raw.T @ aux


@register("amu", family="fewshot", paper=4, needs_train=True, needs=("val", "views", "aux_features"),
          default_templates="dataset")
class AMUTuning(ZeroShotLogitsMixin, ClipHead):
    """AMU-Tuning: zero-shot logits plus an uncertainty-weighted, z-scored linear classifier on auxiliary features.

    Paper 4 in ../shared/papers.md ("AMU-Tuning: Effective Logit Bias for CLIP-based Few-shot Learning", Tang et
    al., CVPR 2024), following the authors' code (github.com/TJU-sjyj/AMU-Tuning @ f96f335: ``clip/amu.py``,
    ``train.py``, ``utils.py``; hyperparameters of ``run.sh``).

    Input: ``X = [f_clip | f_aux]``, the CLIP image features (width d = ``backbone.embed_dim``) concatenated with
    the features of an auxiliary backbone (width d_aux > 0; the paper's MoCo-v3 ResNet-50), each block
    L2-normalised per row. ``aux_model`` only records which model made the auxiliary block (a ``load_model`` name
    or a timm name, read by the pipeline that embeds it); the head never loads it. The head splits ``X`` at d.
    Labels are class indices into ``class_names``; ``classes_ = arange(C)``.

    With T the (d, C) zero-shot text weights and W (C, d_aux) the auxiliary linear classifier
    (``nn.Linear(d_aux, C, bias=False)``):

    - clip logits     c = logit_scale · f_clip T                            (logit_scale 100, as the code)
    - aux logits      a = zscore(f_aux Wᵀ), zscore over the C classes of each row: (l - mean) / std, std
      unbiased (divides by C - 1, ``torch.std``)
    - fusion factor   u = 1 (``uncertainty="none"``, the released script's setting: ``run.sh`` leaves
      ``parse_args``' default 'none'), or for ``"moment"`` u = 1 / (kappa / 250)^power with p = softmax(c),
      z = zscore(p), kappa = mean_c z^4 (power 0.4)
    - logits          c + u · a · alpha
    - initialisation  W_k = mean of the L2-normalised auxiliary features of class k (not re-normalised)
    - training loss   lambda_merge · CE(logits, y) + (1 - lambda_merge) · CE(a, y); only W is trained, with
      AdamW(lr=1e-3, weight_decay=0.01, eps=1e-4) and CosineAnnealingLR(T_max = epochs · ceil(n / batch_size))
      stepped every batch; ``epochs`` (50) passes over the training items in batches of ``batch_size`` (8),
      shuffled by a ``torch.randperm`` per epoch from a ``torch.Generator`` seeded with ``random_state``
      (as a DataLoader with ``shuffle=True``). Defaults are ``run.sh``'s: alpha 0.5, lambda_merge 0.35, lr 1e-3,
      batch 8, 50 epochs.

    State: ``text_weights_`` (d, C), ``aux_weights_`` (C, d_aux) the trained W and ``initial_weights_`` the class
    means it started from (float32), ``alpha_`` the fusion weight used by ``logits``, ``training_loss_`` the mean
    batch loss of each epoch (what the code logs), ``clip_dim_`` = d, ``batch_size_`` the batch used.
    ``aux_logits(X)`` gives the auxiliary branch alone (the code's "Aux branch" accuracy).

    Departures from the authors' code, and why:

    - Features, not images: cliplab trains on cached features. The code re-augments every training image each
      epoch (random resized crop + flip through both backbones); here epoch e uses view ``e mod V`` of ``views``
      (V, n, d + d_aux) (V augmentations cycled; both blocks of a view come from the same augmented image), or
      ``X`` every epoch without views. The initial weights come, as in ``utils.load_aux_weight``, from the
      L2-normalised mean over the views of each item's auxiliary block (the code: ``augment_epoch`` augmented
      passes, 1 in ``run.sh``), or from ``X`` without views (unaugmented features; the code's one pass is
      augmented).
    - Class means divide by each class's own count; the code divides every class sum by n / C, which is the same
      for the balanced few-shot draw. A class without training items starts from a zero row (as in the code).
    - The code keeps the epoch with the best accuracy on the TEST set ("Best Test Acc"); here the weights of the
      last epoch are kept, and test features never reach ``fit``.
    - Fusion weight search: the code has none (alpha 0.5 fixed, run.sh) and the paper gives no range. Here, when
      ``X_val``/``y_val`` are given, the adapter is trained once with ``alpha`` and the fusion weight used at
      prediction, ``alpha_``, is chosen by validation accuracy over ``alpha`` followed by ``ALPHAS`` (0.1, 0.25,
      0.5, 1, 2: a small grid around the paper's 0.5, our choice); ties keep the earlier candidate, so ``alpha``
      itself on ties. The candidates are not retrained (a fusion weight at prediction, as Tip-Adapter-F's search).
      Without validation features ``alpha_ = alpha``.
    - Only the ``"none"`` and ``"moment"`` uncertainties (the paper's fusion) are offered; the code's other
      experimental types (entropy, energy, max, ...) are not.
    - Degenerate rows: a z-score over equal values (std 0) is taken as 0 instead of NaN (in training too); for
      ``"moment"`` an exactly uniform p gets kappa = ((C-1)/C)^2 (see ``uncertainty_factor``).
    - Larger batches for large training sets: at most ``MAX_BATCHES_PER_EPOCH`` = 250 batches per epoch, so for
      n > 250 · batch_size items the batch grows to ceil(n / 250) (lr, epochs and the schedule's form unchanged;
      ``batch_size_`` records the batch used, also in ``fit_summary``). The code's ImageNet run (16 000 items,
      batch 8) is 100 000 AdamW steps over the (1000, d_aux) adapter, about 3 minutes on a busy 2-core machine
      (measured, 512 + 512-d); with batch 64 it is 12 500 steps, about 50 s. 16-shot sets of up to 125 classes
      (n <= 2000) train exactly as the code.
    - The batch loss and its gradient in W are written out (``_loss_and_gradient``; the same values as autograd,
      checked against an autograd re-implementation of the code in the tests) and training runs on one CPU thread
      (steps of a few rows gain nothing from intra-op threads, and on a busy machine lose 10x or more); the
      previous thread count is restored afterwards.
    - Float32 on the CPU (the code: float32 adapter on the GPU, fp16 CLIP features); AdamW runs torch's fused CPU
      kernel where available (the same update rule). Prediction computes the z-scores and kurtosis in float64.
    """

    # The scikit-learn estimator checks this head cannot pass, with the reason (heads/base.py, end): the few-shot
    # heads' skips, its features being [CLIP | auxiliary] (the CLIP block fixed by the text weights).
    _contract_skips = {name: "features are [CLIP | auxiliary]: wider than the model's embeddings; the check feeds "
                       "1-10 features" if reason == FIXED_WIDTH else reason for name, reason in FEWSHOT_SKIPS.items()}

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        templates: str | Sequence[str] | Mapping[str, Sequence[str]] = "generic",
        cache_dir: str | Path | None = None,
        aux_model: str | None = None,
        alpha: float = 0.5,
        lambda_merge: float = 0.35,
        epochs: int = 50,
        lr: float = 1e-3,
        batch_size: int = 8,
        uncertainty: str = "none",
        power: float = 0.4,
        logit_scale: float = 100.0,
        random_state: int = 1,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.templates = templates
        self.cache_dir = cache_dir
        self.aux_model = aux_model
        self.alpha = alpha
        self.lambda_merge = lambda_merge
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.uncertainty = uncertainty
        self.power = power
        self.logit_scale = logit_scale
        self.random_state = random_state

    # ------------------------------------------------------------------ fitting

    def fit(self, X, y, X_val=None, y_val=None, views=None):
        """Initialise the auxiliary classifier with class means, train it on the training items (``views`` if
        given, else ``X``), and pick the fusion weight on (``X_val``, ``y_val``) when given."""
        self._check_hyperparameters()
        X, y = self._validate(X, y, reset=True)
        check_classification_targets(y)
        y = self._check_labels(y)
        d = self._clip_dim(X.shape[1])
        text = np.asarray(self._zeroshot_weights(), dtype=np.float32)
        if text.shape[0] != d:
            raise DimensionMismatchError(f"{type(self).__name__}: backbone.embed_dim is {d} but the text weights are "
                                         f"{text.shape[0]}-d")
        n_classes = text.shape[1]
        self.classes_ = np.arange(n_classes)
        self.clip_dim_ = d
        self.text_weights_ = np.ascontiguousarray(text)
        samples = self._samples(X, views)  # (V, n, d + d_aux), blocks normalised
        init_features = samples[:, :, d:].mean(axis=0)
        norms = np.linalg.norm(init_features, axis=1, keepdims=True)
        init_features = init_features / np.where(norms > 0, norms, 1)
        counts = np.bincount(y, minlength=n_classes)
        sums = np.zeros((n_classes, X.shape[1] - d))
        np.add.at(sums, y, init_features.astype(np.float64))
        self.initial_weights_ = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        self.batch_size_ = max(int(self.batch_size), math.ceil(len(y) / MAX_BATCHES_PER_EPOCH))
        self.aux_weights_, self.training_loss_ = self._train(self.initial_weights_, samples, y)
        self.alpha_, self.searched_ = float(self.alpha), False
        if X_val is not None:
            X_val, y_val = self._validation_set(X_val, y_val)
            self.alpha_ = self._search_alpha(X_val, y_val)
            self.searched_ = True
        return self

    def _check_hyperparameters(self) -> None:
        name = type(self).__name__
        if self.uncertainty not in UNCERTAINTIES:
            raise CliplabError(f"{name}: uncertainty must be one of {', '.join(UNCERTAINTIES)}, got "
                               f"{self.uncertainty!r}")
        if int(self.epochs) != self.epochs or self.epochs < 0:
            raise CliplabError(f"{name}: epochs must be a non-negative integer, got {self.epochs}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise CliplabError(f"{name}: batch_size must be a positive integer, got {self.batch_size}")

    def _clip_dim(self, width: int) -> int:
        """d = backbone.embed_dim, checking that ``X`` has an auxiliary block after the CLIP block."""
        d = int(self.backbone.embed_dim)
        if width <= d:
            raise DimensionMismatchError(
                f"{type(self).__name__}: X has {width} features, no auxiliary block after the {d} CLIP features: "
                f"AMU-Tuning needs [CLIP | auxiliary] features concatenated (aux_model={self.aux_model!r})")
        return d

    def _samples(self, X: np.ndarray, views) -> np.ndarray:
        """The training views (V, n, d + d_aux) float32 with both blocks normalised; ``X[None]`` without views."""
        if views is None:
            stacked = X[None]
        else:
            stacked = np.asarray(views)
            if stacked.ndim != 3 or stacked.shape[1:] != X.shape:
                raise FeatureError(f"{type(self).__name__}: views must have shape (V, {X.shape[0]}, {X.shape[1]}) "
                                   f"like X ([CLIP | auxiliary] features of the same items), got {stacked.shape}")
            if stacked.shape[0] == 0:
                raise FeatureError(f"{type(self).__name__}: views has no view")
            stacked = self._validate(stacked.reshape(-1, X.shape[1])).reshape(stacked.shape)
        d = self.clip_dim_
        out = np.empty(stacked.shape, np.float32)
        for v, view in enumerate(stacked):
            out[v, :, :d], out[v, :, d:] = _split_blocks(np.asarray(view, np.float32), d)
        return out

    def _train(self, weights: np.ndarray, samples: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, list[float]]:
        """The code's training loop (``train.py``); returns the trained W (C, d_aux) float32 and each epoch's loss."""
        import torch

        n_views, n, _ = samples.shape
        d, epochs, batch = self.clip_dim_, int(self.epochs), self.batch_size_
        alpha, lam = float(self.alpha), float(self.lambda_merge)
        adapter = torch.nn.Parameter(torch.from_numpy(weights.copy()), requires_grad=False)
        try:
            optimizer = torch.optim.AdamW([adapter], lr=float(self.lr), weight_decay=WEIGHT_DECAY, eps=ADAM_EPS,
                                          fused=True)
        except (RuntimeError, TypeError, ValueError):  # an older torch without the fused CPU kernel
            optimizer = torch.optim.AdamW([adapter], lr=float(self.lr), weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs * math.ceil(n / batch), 1))
        generator = torch.Generator().manual_seed(int(self.random_state))
        targets = torch.from_numpy(y.astype(np.int64))
        losses = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # steps of batch_size rows gain nothing from intra-op threads (see the docstring)
        try:
            # The CLIP branch and the fusion factor do not depend on W: computed once per view used, or per batch
            # where all of them would not fit in _CLIP_CACHE_BYTES
            used = min(n_views, epochs)
            fixed = ([self._fixed_part(samples[v]) for v in range(used)]
                     if used * n * len(self.classes_) * 4 <= _CLIP_CACHE_BYTES else None)
            for epoch in range(epochs):
                view = samples[epoch % n_views]
                aux_features = torch.from_numpy(np.ascontiguousarray(view[:, d:]))
                order = torch.randperm(n, generator=generator)
                epoch_losses = []
                for start in range(0, n, batch):
                    rows = order[start:start + batch]
                    if fixed is not None:
                        clip_logits, factor = (part[rows] for part in fixed[epoch % n_views])
                    else:
                        clip_logits, factor = self._fixed_part(view[rows.numpy()])
                    onehot = torch.zeros(len(rows), len(self.classes_)).scatter_(1, targets[rows, None], 1.0)
                    loss, grad = _loss_and_gradient(aux_features[rows], adapter, clip_logits, factor * alpha,
                                                    onehot, lam)
                    adapter.grad = grad
                    optimizer.step()
                    scheduler.step()
                    epoch_losses.append(float(loss.item()))
                losses.append(float(np.mean(epoch_losses)))
        finally:
            torch.set_num_threads(threads)
        return adapter.detach().numpy().astype(np.float32, copy=True), losses

    def _fixed_part(self, view: np.ndarray):
        """Clip logits (n, C) and fusion factors (n, 1) of one view's rows, float32 torch tensors."""
        import torch

        clip = torch.from_numpy(np.ascontiguousarray(view[:, :self.clip_dim_]))
        clip_logits = self.logit_scale * (clip @ torch.from_numpy(self.text_weights_))
        factor = uncertainty_factor(clip_logits.numpy(), self.uncertainty, self.power)
        return clip_logits, torch.from_numpy(factor.astype(np.float32))

    def _search_alpha(self, X_val: np.ndarray, y_val: np.ndarray) -> float:
        """Validation accuracy over ``alpha`` then ``ALPHAS`` with the trained W; ties keep the earlier candidate."""
        clip_logits, bias = self._parts(X_val)
        candidates = [float(self.alpha)] + [a for a in ALPHAS if a != float(self.alpha)]
        best, _ = best_on_validation(candidates, lambda a: accuracy(clip_logits + a * bias, y_val))
        return float(best)

    # ------------------------------------------------------------------ prediction

    def _parts(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The clip logits c and the logit bias u · a (before alpha), float64 (n, C), in row chunks."""
        n_classes = len(self.classes_)
        clip_logits, bias = np.empty((len(X), n_classes)), np.empty((len(X), n_classes))
        for start in range(0, len(X), _ROWS):
            clip, aux = _split_blocks(X[start:start + _ROWS], self.clip_dim_)
            c = self.logit_scale * (clip @ self.text_weights_).astype(np.float64)
            a = zscore_over_classes(aux @ self.aux_weights_.T)
            clip_logits[start:start + _ROWS] = c
            bias[start:start + _ROWS] = uncertainty_factor(c, self.uncertainty, self.power) * a
        return clip_logits, bias

    def aux_logits(self, X) -> np.ndarray:
        """The auxiliary branch alone: the z-scored ``f_aux Wᵀ`` (n, C) (what the code reports as "Aux branch")."""
        X = self._checked(X)
        _, aux = _split_blocks(X, self.clip_dim_)
        return zscore_over_classes(aux @ self.aux_weights_.T)

    def logits(self, X) -> np.ndarray:
        """``logit_scale · f_clip T + u · zscore(f_aux Wᵀ) · alpha_`` (n, C)."""
        X = self._checked(X)
        clip_logits, bias = self._parts(X)
        return clip_logits + self.alpha_ * bias

    def fit_summary(self) -> dict:
        return {"alpha": self.alpha_, "uncertainty": self.uncertainty, "epochs": int(self.epochs),
                "searched": self.searched_, "batch_size": self.batch_size_}
