"""CLIP-SVD: only the singular values of every weight matrix of both towers train (paper 42, Koleilat et al. 2025)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.prompts import class_prompts
from ..errors import CliplabError, FeatureError
from ..features.views import Augmentation
from ..models.backbone import Backbone
from ..models.reparam import SingularValues
from ..train.engine import TrainSettings, register_objective, run_training
from .base import FEWSHOT_SKIPS, ClipHead, ZeroShotLogitsMixin
from .registry import register

TAG = "clip-svd"  # the derived backbone's tag: model ids read PARENT+clip-svd:HASH
TOWER_CHOICES = {"both": ("image", "text"), "image": ("image",), "text": ("text",)}
PACKED = {"in_proj_weight": 3}  # packed q, k, v projections: one SVD per block, as the authors' separate q/k/v


class BlockSingularValues(torch.nn.Module):
    """W = [U_1 diag(s_1) V_1ᵀ; ...; U_p diag(s_p) V_pᵀ]: the ``parts`` row blocks of a packed weight (q, k, v of
    ``in_proj_weight``) each with its own SVD, U and Vᵀ fixed buffers, only ``s`` (p·r values) trainable."""

    def __init__(self, weight: torch.Tensor, parts: int):
        super().__init__()
        rows = weight.shape[0] // parts
        blocks = weight.detach().double().reshape(parts, rows, weight.shape[1])
        u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
        self.register_buffer("u", u.to(weight.dtype))
        self.register_buffer("vh", vh.to(weight.dtype))
        self.s = torch.nn.Parameter(s.reshape(-1).to(weight.dtype))
        self.parts = parts

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.s.reshape(self.parts, 1, -1)
        return ((self.u * s) @ self.vh).reshape(weight.shape)


def singular_value_blocks(name: str, weight: torch.Tensor) -> torch.nn.Module:
    """``make`` for ``Backbone.reparametrize``: CLIP-SVD's parametrisation, packed q/k/v split into three SVDs."""
    parts = PACKED.get(name.rsplit(".", 1)[-1], 1)
    if parts > 1 and weight.shape[0] % parts == 0:
        return BlockSingularValues(weight, parts)
    return SingularValues(weight)


def parametrisations(backbone: Backbone, names: Sequence[str]) -> list[torch.nn.Module]:
    """The parametrisation module of each qualified weight name in ``names`` (in that order)."""
    found = {}
    for prefix, module in backbone.model.named_modules():
        params = getattr(module, "parametrizations", None)
        if params is None:
            continue
        for attr in params:
            found[f"{prefix}.{attr}" if prefix else attr] = params[attr][0]
    return [found[name] for name in names]


class SVDLearner(torch.nn.Module):
    """The trainable singular values (a ParameterList sharing the parametrisations' ``s``) over a reparametrised
    derived Backbone, held as a plain attribute so that only ``s`` is trained and checkpointed.

    ``forward(batch)`` gives the logits ``logit_scale * f @ t_cᵀ`` of a batch of preprocessed ``images`` (through
    the image tower) or of fixed ``features`` (the image tower frozen), with ``t_c`` the class text features
    (the L2-normalised mean of the class's L2-normalised prompt embeddings, as CLIP's ensembling)."""

    def __init__(self, backbone: Backbone, values: list[torch.nn.Parameter], tokens: torch.Tensor, per_class: int,
                 logit_scale: float, text_trains: bool):
        super().__init__()
        self.backbone = backbone
        self.values = torch.nn.ParameterList(values)
        self.register_buffer("tokens", tokens, persistent=False)
        self.per_class = per_class
        self.logit_scale = float(logit_scale)
        self.text_trains = text_trains
        self._fixed_text = None

    def text_features(self) -> torch.Tensor:
        if not self.text_trains:
            if self._fixed_text is None:
                with torch.no_grad():
                    self._fixed_text = self._text()
            return self._fixed_text
        return self._text()

    def _text(self) -> torch.Tensor:
        feats = self.backbone.forward_texts(self.tokens)
        feats = feats.reshape(-1, self.per_class, feats.shape[-1]).mean(dim=1)
        return F.normalize(feats, dim=-1)

    def forward(self, batch: dict) -> torch.Tensor:
        text = self.text_features()
        images = batch.get("images")
        image = self.backbone.forward_images(images) if images is not None else batch["features"].to(text.dtype)
        return self.logit_scale * image @ text.T


@register_objective("clip-svd")
class SVDObjective:
    """Cross-entropy of the learner's logits; AdamW's weight decay on every singular value (the authors pass all of
    the model's parameters to AdamW with one weight decay)."""

    def __call__(self, module: SVDLearner, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = module(batch)
        loss = F.cross_entropy(logits, batch["labels"])
        return loss, {"acc": float((logits.argmax(dim=1) == batch["labels"]).float().mean())}

    def param_groups(self, module: torch.nn.Module, weight_decay: float) -> list[dict]:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": weight_decay}]


class _Epoch:
    """One epoch's batches, built lazily (images augmented as they are reached); ``len`` is the batch count."""

    def __init__(self, make, count: int, start: int = 0):
        self.make, self.count, self.start = make, count, start

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return (self.make(b) for b in range(self.start, self.count))


@register("clip-svd", family="encoder", paper=42, needs_train=True, needs=("images",),
          default_templates=("a photo of a {c}.",), gives=("class_weights", "backbone"))
class ClipSVD(ZeroShotLogitsMixin, ClipHead):
    """CLIP-SVD: every linear and attention projection of both towers as U·diag(s)·Vᵀ, only s trained.

    Paper 42 in ../shared/papers.md (Koleilat, Rivaz, Xiao, "Singular Value Few-shot Adaptation of
    Vision-Language Models"), read against the authors' code, github.com/HealthX-Lab/CLIP-SVD (``train.py``
    ``run_training``, ``svf_utils/svf_torch.py``, ``svf_utils/utils.py``, ``svf_utils/PlainHeadAttention.py``,
    ``main.py``, ``configs/few_shot/*.yaml``).

    Model: a ``derive()``d copy of the backbone has every weight of its transformer blocks reparametrised
    (``Backbone.reparametrize``, ``torch.nn.utils.parametrize``): the MLP's two linears, the attention output
    projection and the packed q/k/v input projection, the latter split into its three (d, d) blocks each with its
    own SVD, as the authors replace CLIP's attention by separate q/k/v/proj linears before decomposing every
    ``nn.Linear`` (full rank: ``--rank 1.0``). U and Vᵀ are fixed; the singular values s (min(m, n) per matrix,
    ~0.04% of ViT-B/16) train; biases, norms, embeddings and the bare output projections stay frozen. At
    initialisation the model equals the plain one to float rounding (tested to 1e-5). With L2-normalised image
    features x and class text features t_c from the tuned text tower, ``logits = logit_scale * x @ weights_``.

    Training (through ``cliplab.train.engine.run_training``, objective ``"clip-svd"``), the authors' few-shot
    configs for natural images (``run_training`` with ``--subsample all``): AdamW lr 5e-4, betas (0.9, 0.999),
    weight decay 0.01 on the singular values, batches of 32 in a random order per pass (last batch kept), cosine
    decay over ``n_iters * shots`` iterations (``n_iters`` 200; shots = the largest class count of ``y``) stopping
    mid-pass; every step encodes the batch's images and every class's prompt, both towers with autograd; cross-
    entropy of ``logit_scale * x @ t_cᵀ``; the model of the last step is kept (no validation:
    ``VALIDATION = False`` in their code). ``max_epoch`` instead trains that many passes (cliplab's few-shot
    table and benchmarks use it). Train transform: random resized crop of area 0.08-1 (aspect 3/4-4/3, bicubic)
    to the model's input size and a horizontal flip with probability 1/2, then the model's preprocessing.
    The prompt is one template per dataset (``templates``, default "a photo of a {c}.", the authors'
    ImageNet/generic one; several templates are ensembled).

    ``towers`` ("both", "image", "text"): which towers' singular values train (the authors'
    ``train_image_encoder`` / ``train_text_encoder``). ``fit(X, y, images=)``: ``images`` is a dataset aligned with
    the rows of ``X`` (what ``eval.inputs.prepare_fit`` gives for ``needs=("images",)``); without it the image
    tower cannot train, so only the text tower's singular values train, on the given features ``X`` (the
    authors' ``train_image_encoder=False``; "image" alone then refuses). ``trained_towers_`` says which trained.

    Fitted state: ``singular_values_`` (float32, all s in ``svd_names_`` order), ``svd_names_``, ``weights_`` (d, C),
    ``logit_scale_`` and ``backbone_``, the derived Backbone with the tuned s merged into plain weights (its
    ``model_id`` follows them): test images are embedded through it (``gives=("backbone",)``).
    :meth:`rebuild_backbone` rebuilds it from the base backbone and ``singular_values_`` (``heads/saving.py``);
    :meth:`with_classes` scores other class names with the tuned towers (base-to-new). ``checkpoint_dir``: a
    training checkpoint every pass, from which a killed fit resumes to the same numbers.

    Outside comparison (a script outside the repository runs the authors' own ``clip/model.py``,
    ``PlainMultiHeadAttention``, ``resolver`` and ``set_clip_trainable_parameters`` and their loss against this
    head's construction, on identical random ViT weights, 3+3 blocks with 64-wide heads and QuickGELU, and identical
    inputs): 4608 trainable singular values in both; logits (scale 100) at initialisation within 3.7e-5 in float32
    (in float64 1.9e-5: their U and Vᵀ live in float32 ``nn.Linear`` weights; ours reproduce the plain model to
    9e-14); after one identical SGD step (lr 0.5, moving the logits by up to 10.4) within 2.5e-4, the singular
    values within 1.7e-5 (changes up to 0.27). On random ViT-B-32 weights (QuickGELU), float32: 92160 trainable in
    both, logits within 4.6e-5 at initialisation and 3.3e-4 after the step (which moves them by 15.1), singular
    values within 7.3e-5 (changes up to 0.26).

    Departures from the authors' code, and why:

    - Precision: float32 (their steps run under fp16 autocast on CUDA); ``logit_scale`` defaults to the model's
      (``Backbone.logit_scale``; theirs is the constant 100, the same for OpenAI's models).
    - Schedule: cosine to 0 (theirs ends at ``eta_min`` 1e-6); with ``max_epoch`` the horizon is the passes'
      steps. Their base-to-new runs (``run_other_training``) step a cosine of period ``train_epochs`` once per
      iteration, which we do not copy.
    - Class names are used as given (the code replaces "_" by " "), so prompts match cliplab's zero-shot ones.
    - Augmentations are drawn from NumPy generators seeded by (``random_state``, pass, batch) and the batch order by
      (``random_state``, pass), so runs repeat bit for bit on the CPU and resume exactly (theirs: global seeds).
    - Only transformer blocks of open_clip ViT/text towers and Hugging Face CLIP are covered as in their code; on
      an open_clip ResNet image tower only its attention-pool projections are reparametrised (their code has no
      ResNet path).
    """

    _contract_skips = dict(FEWSHOT_SKIPS)

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        templates: str | Sequence[str] = ("a photo of a {c}.",),
        cache_dir: str | Path | None = None,
        towers: str = "both",
        max_epoch: int | None = None,
        n_iters: int = 200,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        batch_size: int = 32,
        logit_scale: float | None = None,
        random_state: int = 1,
        checkpoint_dir: str | Path | None = None,
        progress: bool = False,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.templates = templates
        self.cache_dir = cache_dir
        self.towers = towers
        self.max_epoch = max_epoch
        self.n_iters = n_iters
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.logit_scale = logit_scale
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress

    # ------------------------------------------------------------------ parameters

    def _check_params(self) -> None:
        name = "CLIP-SVD"
        if self.towers not in TOWER_CHOICES:
            raise CliplabError(f"{name}: towers must be one of {', '.join(TOWER_CHOICES)}, got {self.towers!r}")
        for key, low in (("max_epoch", 0), ("n_iters", 1), ("batch_size", 1)):
            value = getattr(self, key)
            if value is None and key == "max_epoch":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise CliplabError(f"{name}: {key} must be an integer >= {low}, got {value!r}")
        for key in ("lr", "weight_decay"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (key == "lr" and value == 0):
                raise CliplabError(f"{name}: {key} must be a finite number {'> 0' if key == 'lr' else '>= 0'}, "
                                   f"got {value!r}")

    def steps_for(self, y: np.ndarray) -> int:
        """Optimiser steps: ``max_epoch`` passes, else the authors' ``n_iters * shots``."""
        per_pass = math.ceil(len(y) / int(self.batch_size))
        if self.max_epoch is not None:
            return int(self.max_epoch) * per_pass
        return int(self.n_iters) * int(np.bincount(np.asarray(y, dtype=np.int64)).max(initial=1))

    def prompts(self) -> list[list[str]]:
        """Per class, the prompts whose tuned-tower embeddings are ensembled into its text feature."""
        return class_prompts(self.class_names, self.templates)

    # ------------------------------------------------------------------ the reparametrised backbone

    def _reparametrised(self, backbone: Backbone, towers: Sequence[str]) -> tuple[Backbone, list[str]]:
        """A derived copy of ``backbone`` with CLIP-SVD's parametrisation on ``towers``; only s trains."""
        derived = backbone.derive(TAG, trainable=False)
        names = derived.reparametrize(singular_value_blocks, towers=tuple(towers))
        if not names:
            raise CliplabError(f"CLIP-SVD: {backbone.info.name} has no linear or attention projection to decompose")
        return derived, names

    @staticmethod
    def _merged(derived: Backbone) -> Backbone:
        derived.merge_reparametrisations()
        derived.model.requires_grad_(False)
        derived.model.eval()
        return derived

    def rebuild_backbone(self, backbone: Backbone) -> Backbone:
        """``backbone_`` rebuilt from the base ``backbone`` and the fitted ``singular_values_`` (what loading a saved
        head calls): the same SVD, the saved s, merged into plain weights."""
        names = [str(n) for n in self.svd_names_]
        towers = [str(t) for t in self.trained_towers_]
        derived, found = self._reparametrised(backbone, towers)
        if found != names:
            raise CliplabError(f"CLIP-SVD: {backbone.info.name} does not have the decomposed weights this head was "
                               f"fitted on ({len(found)} vs {len(names)}); load it with the model it was fitted on")
        modules = parametrisations(derived, names)
        values = np.asarray(self.singular_values_, dtype=np.float32).reshape(-1)
        total = sum(m.s.numel() for m in modules)
        if values.size != total:
            raise CliplabError(f"CLIP-SVD: {values.size} singular values saved, the model's weights have {total}")
        with torch.no_grad():
            offset = 0
            for module in modules:
                count = module.s.numel()
                module.s.copy_(torch.from_numpy(values[offset:offset + count]).to(module.s))
                offset += count
        return self._merged(derived)

    # ------------------------------------------------------------------ fitting

    def _image_batches(self, images, n: int, y: np.ndarray, backbone: Backbone):
        """``data(epoch, start)`` over augmented, preprocessed images of ``images`` (decoded once)."""
        size = backbone.preprocess_config.get("size", 224)
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        augment = Augmentation(size=size, scale=(0.08, 1.0))
        decoded = [images.load_image(i).convert("RGB") for i in range(n)]
        labels = torch.from_numpy(y.astype(np.int64))
        batch, count = int(self.batch_size), math.ceil(n / int(self.batch_size))

        def data(epoch: int, start: int = 0) -> _Epoch:
            order = np.random.default_rng([int(self.random_state), int(epoch)]).permutation(n)

            def make(b: int) -> dict:
                rows = order[b * batch:(b + 1) * batch]
                rng = np.random.default_rng([int(self.random_state), int(epoch), int(b)])
                tensors = [backbone.preprocess(augment(decoded[i], rng)) for i in rows]
                return {"images": torch.stack(tensors), "labels": labels[rows]}

            return _Epoch(make, count, start)

        return data

    def _feature_batches(self, X: np.ndarray, y: np.ndarray):
        """``data(epoch, start)`` over the fixed features (the image tower frozen)."""
        n, batch = len(y), int(self.batch_size)
        count = math.ceil(n / batch)
        features, labels = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)), torch.from_numpy(
            y.astype(np.int64))

        def data(epoch: int, start: int = 0) -> _Epoch:
            order = np.random.default_rng([int(self.random_state), int(epoch)]).permutation(n)

            def make(b: int) -> dict:
                rows = order[b * batch:(b + 1) * batch]
                return {"features": features[rows], "labels": labels[rows]}

            return _Epoch(make, count, start)

        return data

    def _tokens(self, backbone: Backbone) -> tuple[torch.Tensor, int]:
        prompts = self.prompts()
        per_class = len(prompts[0])
        if any(len(p) != per_class for p in prompts):
            raise CliplabError("CLIP-SVD: every class needs the same number of prompts (templates, not a mapping)")
        texts = [p for group in prompts for p in group]
        lengths = backbone.text_lengths(texts)
        if lengths is not None and max(lengths) > backbone.context_length:
            longest = int(np.argmax(lengths))
            raise CliplabError(f"CLIP-SVD: the prompt {texts[longest]!r} has {lengths[longest]} tokens, over the "
                               f"model's {backbone.context_length}")
        return backbone.tokenize(texts), per_class

    def fit(self, X, y, images=None):
        """Train the singular values on the few-shot ``images`` (aligned with the rows of ``X``), or with the image
        tower frozen on the features ``X`` when no images are given (see the class docstring)."""
        self._check_params()
        X, y = self._training_rows(X, y, "CLIP-SVD")
        backbone = self.backbone
        towers = TOWER_CHOICES[self.towers]
        if images is not None and len(images) != len(X):
            raise FeatureError(f"CLIP-SVD: {len(images)} images for {len(X)} training rows; images must be aligned "
                               "with the rows of X")
        if images is None and "image" in towers:
            if towers == ("image",):
                raise CliplabError("CLIP-SVD: towers='image' trains the image tower and needs the training images "
                                   "(fit(X, y, images=...))")
            towers = ("text",)
        tokens, per_class = self._tokens(backbone)
        derived, names = self._reparametrised(backbone, towers)
        modules = parametrisations(derived, names)
        scale = self.logit_scale if self.logit_scale is not None else backbone.logit_scale
        learner = SVDLearner(derived, [m.s for m in modules], tokens.to(derived.device), per_class, scale,
                             "text" in towers)
        steps = self.steps_for(y)
        history = []
        if steps > 0:
            data = (self._image_batches(images, len(X), y, derived) if "image" in towers
                    else self._feature_batches(X, y))
            per_pass = math.ceil(len(y) / int(self.batch_size))
            result = run_training(learner, SVDObjective(), data,
                                  self.train_settings(steps, per_pass, self._identity(steps, names, X, y, towers)))
            history = result.history
            self.final_loss_ = float(result.last_loss)
        else:
            self.final_loss_ = None
        self.singular_values_ = torch.cat([m.s.detach().float().reshape(-1).cpu() for m in modules]).numpy()
        self.svd_names_ = list(names)
        self.trained_towers_ = list(towers)
        self.backbone_ = self._merged(derived)
        self.logit_scale_ = float(scale)
        self.weights_ = self.class_weights_for(self.class_names)
        self.classes_ = np.arange(len(self.class_names))
        self.n_features_in_ = X.shape[1]
        self.steps_ = int(steps)
        self.history_ = [{k: v for k, v in h.items() if k != "seconds"} for h in history]
        return self

    def train_settings(self, steps: int, per_pass: int, identity: dict) -> TrainSettings:
        """The one training loop's settings: the authors' AdamW and per-iteration cosine, a checkpoint every pass."""
        return TrainSettings(
            steps=steps, lr=float(self.lr), optimizer="adamw", betas=(0.9, 0.999), eps=1e-8,
            weight_decay=float(self.weight_decay), warmup_steps=0, schedule="cosine", seed=int(self.random_state),
            device=str(self.backbone.device), progress=bool(self.progress), desc="clip-svd",
            checkpoint_dir=self.checkpoint_dir, checkpoint_every=per_pass if self.checkpoint_dir else 0,
            identity=json.dumps(identity, sort_keys=True))

    def _identity(self, steps: int, names: list[str], X: np.ndarray, y: np.ndarray, towers) -> dict:
        data = hashlib.sha256(np.ascontiguousarray(X, dtype=np.float32).tobytes() + y.astype(np.int64).tobytes())
        return {"method": "clip-svd", "steps": steps, "batch_size": int(self.batch_size), "towers": list(towers),
                "templates": [p for group in self.prompts() for p in group], "weights": len(names),
                "model_id": self.backbone.model_id, "data": data.hexdigest()[:16]}

    # ------------------------------------------------------------------ prediction

    def class_weights_for(self, class_names: Sequence[str]) -> np.ndarray:
        """(d, C) text weights of ``class_names`` from the tuned text tower (``backbone_``) and the templates."""
        prompts = class_prompts(class_names, self.templates)
        texts = [p for group in prompts for p in group]
        per_class = len(prompts[0])
        feats = self.backbone_.encode_texts(texts).reshape(len(prompts), per_class, -1).mean(dim=1)
        return np.ascontiguousarray(F.normalize(feats, dim=-1).numpy().T, dtype=np.float32)

    def with_classes(self, class_names: Sequence[str]) -> ClipSVD:
        """A fitted copy scoring ``class_names`` with the tuned towers and the same templates (base-to-new)."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self)
        head = copy.copy(self)
        head.class_names = list(class_names)
        head.weights_ = self.class_weights_for(head.class_names)
        head.classes_ = np.arange(len(head.class_names))
        return head

    def logits(self, X) -> np.ndarray:
        """``logit_scale_ * X @ weights_`` (n, C); ``X`` embedded through ``backbone_``."""
        X = self._checked(X)
        return self.logit_scale_ * (X @ self.weights_)

    def fit_summary(self) -> dict:
        return {"towers": self.trained_towers_, "singular_values": int(self.singular_values_.size),
                "weights": len(self.svd_names_), "steps": self.steps_, "final_loss": self.final_loss_}
