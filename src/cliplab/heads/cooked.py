"""COOkeD: a heterogeneous ensemble of a closed-world classifier, zero-shot CLIP and a linear probe on CLIP image
features, for classification and OOD detection (paper 1, "COOkeD: Ensemble-based OOD detection in the era of
zero-shot CLIP"; authors' code github.com/glhr/COOkeD @217223b, ``eval.py:ood_eval``)."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from scipy.special import softmax
from sklearn.utils.multiclass import check_classification_targets

from ..errors import FeatureError, LabelError
from ..models.backbone import Backbone
from .base import (
    COOP_SEARCH_LIST,
    FEWSHOT_SKIPS,
    FIXED_WIDTH,
    ClipHead,
    ZeroShotLogitsMixin,
    coop_c_search,
    logistic_fits,
)
from .registry import register

#: CoOp's coarse sweep of C, as cliplab's linear probe (heads/linear_probe.py) searches it.
SEARCH_LIST = COOP_SEARCH_LIST
#: The authors' CLIP temperature: ``logits_clip_t100 = 100 * text_sim`` (eval.py), whatever the model's scale.
AUTHORS_CLIP_SCALE = 100.0
_TINY = 1e-12  # floor of the ensemble probability before its log (a class no member gives any mass)


def _entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row (natural log, 0 log 0 = 0): ``torch.special.entr(p).sum(-1)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=1)


@register("cooked", family="ood", paper=1, needs_train=True, needs=("val",), default_templates=("a photo of a {c}.",))
class COOkeD(ZeroShotLogitsMixin, ClipHead):
    """COOkeD: mean of the softmax probabilities of a closed-world classifier, zero-shot CLIP and a linear probe.

    Per image (paper 1, sec. 3; ``eval.py:ood_eval``):
        p_clip  = softmax(clip_scale * x . w_c)         (w_c: unit text embedding of class c; clip_scale 100)
        p_probe = softmax(x W^T + b)                     (linear probe on CLIP image features)
        p_cw    = softmax(closed-world classifier logits)
        p       = (p_cw + p_probe + p_clip) / 3          (``torch.stack([...]).mean(0)``)
    ``logits(X) = log p`` (so ``predict_proba`` is p and ``predict`` its argmax); the OOD scores are
    ``cooked_scores``: MSP ``max_c p`` and the entropy of p (the authors' headline score; negated here so that
    higher = more in-distribution). No weights or temperatures are tuned in the ensemble itself.

    Closed-world classifier: it sees images, not CLIP features, so its probabilities come from outside as
    ``closed_world_probs`` (n, C) given to ``logits``/``predict_proba``/``predict``/``cooked_scores`` (for a
    torchvision checkpoint, ``closed_world_probs_from_checkpoint``). Without them the closed-world member is the
    linear probe itself (cliplab's fallback when no end-to-end classifier is given; the probe then counts twice).

    Hyperparameters: ``templates`` (the authors' one prompt "a photo of a {c}."), ``clip_scale`` (100, the
    authors' fixed temperature; None = the model's learned ``logit_scale``, their second reported variant),
    ``C`` (0.316, the probe's inverse L2 strength when no validation data is given), ``num_steps`` (8),
    ``search`` (True), ``max_iter`` (1000), ``tol`` (None: 1e-4 / n_train). With ``X_val, y_val`` the probe's C is
    chosen by CoOp's search on validation accuracy of the probe alone (cliplab's linear-probe protocol); the
    probe is fitted on the training rows only. Labels are class indices into ``class_names``.

    Departures from the authors' code:
    - The probe: the authors train ``nn.Linear`` on raw (unnormalised) CLIP features with SGD (lr 0.1, 20 epochs,
      from their checkpoint names; the training script is not released). Here it is an L2-regularised logistic
      regression (L-BFGS) on cliplab's L2-normalised features, C searched on validation as cliplab's linear
      probe does (reimplemented: heads do not import each other).
    - The probe gives probability 0 to classes absent from the training labels (it has no column for them).
    - ``logits`` are ``log max(p, 1e-12)``: an ensemble has probabilities, not logits.
    """

    # The scikit-learn estimator checks this head cannot pass, with the reason (heads/base.py, end).
    _contract_skips = FEWSHOT_SKIPS | {"check_non_transformer_estimators_n_iter": FIXED_WIDTH}

    def __init__(self, backbone: Backbone, class_names: Sequence[str], templates=("a photo of a {c}.",),
                 clip_scale: float | None = AUTHORS_CLIP_SCALE, C: float = 0.316, num_steps: int = 8,
                 search: bool = True, max_iter: int = 1000, tol: float | None = None,
                 cache_dir: str | Path | None = None):
        self.backbone = backbone
        self.class_names = class_names
        self.templates = templates
        self.clip_scale = clip_scale
        self.C = C
        self.num_steps = num_steps
        self.search = search
        self.max_iter = max_iter
        self.tol = tol
        self.cache_dir = cache_dir

    def _check_params(self) -> None:
        def positive(value) -> bool:
            return isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(value) and value > 0

        if not positive(self.C):
            raise ValueError(f"COOkeD: C must be a positive finite number, got {self.C!r}")
        if self.clip_scale is not None and not positive(self.clip_scale):
            raise ValueError(f"COOkeD: clip_scale must be a positive number or None, got {self.clip_scale!r}")
        if self.tol is not None and not positive(self.tol):
            raise ValueError(f"COOkeD: tol must be a positive number or None, got {self.tol!r}")
        for name, low in (("num_steps", 0), ("max_iter", 1)):
            value = getattr(self, name)
            if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
                raise ValueError(f"COOkeD: {name} must be an integer >= {low}, got {value!r}")

    def fit(self, X, y, X_val=None, y_val=None):
        """Embed the prompts and fit the probe on ``X, y``; with ``X_val, y_val`` choose its C on them first."""
        self._check_params()
        X, y = self._validate(X, y, reset=True)
        check_classification_targets(y)
        y = self._check_labels(y)
        if (X_val is None) != (y_val is None):
            raise LabelError("COOkeD: pass both X_val and y_val, or neither")
        self.text_weights_ = np.asarray(self._zeroshot_weights(), dtype=np.float32)
        if self.text_weights_.shape[0] != X.shape[1]:
            raise FeatureError(f"COOkeD: features have {X.shape[1]} dimensions but the model's text embeddings "
                               f"{self.text_weights_.shape[0]} (features from another model?)")
        self.classes_ = np.arange(len(self.class_names))
        self.probe_classes_ = np.unique(y)
        if len(self.probe_classes_) < 2:
            raise LabelError("COOkeD: the linear probe needs at least two classes in y")
        self.clip_scale_ = float(self.clip_scale if self.clip_scale is not None else self.backbone.logit_scale)
        self.tol_ = float(1e-4 / len(X) if self.tol is None else self.tol)
        fit_at = logistic_fits(X, y, self.max_iter, self.tol_)

        searched = bool(self.search) and X_val is not None
        if searched:
            X_val, y_val = self._validation_set(X_val, y_val)
            X_val = X_val.astype(np.float64)

            def val_accuracy(c: float) -> float:
                coef, intercept, _ = fit_at(c)
                pred = self.probe_classes_[np.argmax(self._probe_logits(X_val, coef, intercept), axis=1)]
                return float(np.mean(pred == y_val))

            chosen, self.search_path_ = coop_c_search(val_accuracy, self.num_steps)
        else:
            chosen, self.search_path_ = float(self.C), []
        self.C_ = float(chosen)
        self.coef_, self.intercept_, self.n_iter_ = fit_at(self.C_)
        self.searched_ = searched
        return self

    @staticmethod
    def _probe_logits(X: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
        z = X @ coef.T + intercept
        return np.hstack([-z / 2, z / 2]) if z.shape[1] == 1 else z  # binary: softmax = sklearn's sigmoid

    def member_probs(self, X, closed_world_probs=None) -> dict[str, np.ndarray]:
        """The members' probabilities (n, C) over ``classes_``: ``clip``, ``probe`` and ``classifier``."""
        X = self._checked(X)
        p_clip = softmax(self.clip_scale_ * (X.astype(np.float64) @ self.text_weights_.astype(np.float64)), axis=1)
        p_probe = np.zeros((len(X), len(self.classes_)))
        p_probe[:, self.probe_classes_] = softmax(self._probe_logits(X.astype(np.float64), self.coef_,
                                                                     self.intercept_), axis=1)
        if closed_world_probs is None:
            p_cw = p_probe
        else:
            p_cw = np.asarray(closed_world_probs, dtype=np.float64)
            if p_cw.shape != p_probe.shape or not np.isfinite(p_cw).all() or (p_cw < 0).any() or \
                    not np.allclose(p_cw.sum(axis=1), 1.0, atol=1e-3):
                raise FeatureError(f"COOkeD: closed_world_probs must be probabilities of shape {p_probe.shape} "
                                   f"(rows summing to 1), got shape {p_cw.shape}")
        return {"clip": p_clip, "probe": p_probe, "classifier": p_cw}

    def ensemble_proba(self, X, closed_world_probs=None) -> np.ndarray:
        """COOkeD's probabilities (n, C): the mean of the three members' softmax probabilities."""
        members = self.member_probs(X, closed_world_probs)
        return (members["classifier"] + members["probe"] + members["clip"]) / 3.0

    def logits(self, X, closed_world_probs=None) -> np.ndarray:
        """``log`` of the ensemble probabilities (floored at 1e-12), so that their softmax is the ensemble."""
        return np.log(np.maximum(self.ensemble_proba(X, closed_world_probs), _TINY))

    def predict_proba(self, X, closed_world_probs=None) -> np.ndarray:
        return softmax(self.logits(X, closed_world_probs), axis=1)

    def predict(self, X, closed_world_probs=None) -> np.ndarray:
        scores = self.logits(X, closed_world_probs)
        return self.classes_[np.argmax(scores, axis=1)]

    def fit_summary(self) -> dict:
        return {"C": self.C_, "searched": self.searched_, "clip_scale": self.clip_scale_, "n_iter": self.n_iter_}


def cooked_scores(head: COOkeD, X, closed_world_probs=None, members: bool = False) -> dict[str, np.ndarray]:
    """COOkeD's OOD scores (n,), higher = more in-distribution, as the authors' ``eval.py`` reports them:
    ``msp`` (max ensemble probability) and ``entropy`` (minus the ensemble's entropy; the paper's headline
    score). ``members=True`` adds each member's own ``msp_<m>`` and ``entropy_<m>`` (m: clip, probe,
    classifier), the authors' ablation rows."""
    parts = head.member_probs(X, closed_world_probs)
    ensemble = (parts["classifier"] + parts["probe"] + parts["clip"]) / 3.0
    scores = {"msp": ensemble.max(axis=1), "entropy": -_entropy(ensemble)}
    if members:
        for name, p in parts.items():
            scores[f"msp_{name}"] = p.max(axis=1)
            scores[f"entropy_{name}"] = -_entropy(p)
    return scores


def closed_world_probs_from_checkpoint(checkpoint: str | Path, arch: str, images, num_classes: int,
                                       batch_size: int = 128) -> np.ndarray:
    """Softmax probabilities (n, num_classes) of a torchvision ``arch`` (e.g. "resnet18") whose state dict is
    ``checkpoint`` (loaded with ``torch.load(weights_only=True)``), on ``images``: a float tensor or array
    (n, 3, H, W) already normalised as that classifier was trained (the authors normalise separately for the
    classifier and for CLIP)."""
    import torch
    import torchvision

    from ..errors import CliplabError

    try:
        model = torchvision.models.get_model(arch, num_classes=num_classes)
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CliplabError(f"closed-world classifier {checkpoint}: cannot load as torchvision {arch!r} with "
                           f"{num_classes} classes ({str(exc).splitlines()[0]})") from exc
    model.eval()
    images = torch.as_tensor(images, dtype=torch.float32)
    with torch.no_grad():
        out = [torch.softmax(model(images[i:i + batch_size]), dim=1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros((0, num_classes))
