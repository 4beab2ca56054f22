"""GRIP: prompt tuning on CLIP's own pseudolabels, grown and refined round by round (paper 23, Menghini et al.,
"Enhancing CLIP with CLIP: Exploring Pseudolabeling for Limited-Label Prompt Tuning", NeurIPS 2023)."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.utils.validation import check_is_fitted

from ..errors import CliplabError, FeatureError
from ..models.backbone import Backbone
from ..train.engine import TrainSettings, register_objective, run_training
from ..train.prompts import PromptLearner, causal_length, initial_context
from ..train.pseudolabels import RULES, grip_schedule, rounds_for, select_top_k
from .base import FEWSHOT_SKIPS, ClipHead, ZeroShotLogitsMixin, accuracy
from .registry import register

SETTINGS = ("semi-supervised", "transductive", "unsupervised")
AUTHORS_LR = {"textual": 0.1, "visual": 0.1, "multimodal": 0.01}  # LR of grip_{textual,visual,multimodal}_config
AUTHORS_VISUAL_CONTEXT = {"visual": 16, "multimodal": 4}  # PREFIX_SIZE / VISION_PREFIX_SIZE
PSEUDO_VAL_FROM = 10  # the authors hold out part of the pseudolabels only from 10 per class on (N_PSEUDOSHOTS >= 10)
ENCODE_BATCH = 256  # images per no-grad pass when the visual prompts relabel the pool


@register_objective("grip")
class GripObjective:
    """GRIP's loss for a batch ``{"labels", "pseudo": bool mask, "w_labelled", "w_pseudo", ...}``:
    ``w_labelled * CE(labelled rows) + w_pseudo * CE(pseudolabelled rows)``, each cross-entropy the mean over its
    rows in the batch (0 where the batch has none), as the authors' ``define_loss_function``."""

    def __call__(self, module: GripModule, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = module.batch_logits(batch)
        labels, pseudo = batch["labels"], batch["pseudo"]
        loss = logits.new_zeros(())
        for rows, weight in ((~pseudo, float(batch["w_labelled"])), (pseudo, float(batch["w_pseudo"]))):
            if weight and bool(rows.any()):
                loss = loss + weight * F.cross_entropy(logits[rows], labels[rows])
        return loss, {"acc": float((logits.argmax(dim=1) == labels).float().mean())}

    def param_groups(self, module: torch.nn.Module, weight_decay: float) -> list[dict]:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": weight_decay}]


class GripModule(torch.nn.Module):
    """What one round trains: the textual context (a ``train.prompts.PromptLearner``) and/or the visual prompt
    tokens (p, width) put after the class token of the image tower (VPT-shallow, ``Backbone.forward_images``).
    Where a side is not learned its features are fixed: the image side reads cached ``features``, the text side
    the zero-shot class weights ``text`` (C, d). The Backbone is a plain attribute, never trained or saved."""

    def __init__(self, backbone: Backbone, logit_scale: float, learner: PromptLearner | None = None,
                 text: torch.Tensor | None = None, visual: torch.Tensor | None = None):
        super().__init__()
        self.backbone = backbone
        self.logit_scale = float(logit_scale)
        self.learner = learner
        self.visual = None if visual is None else torch.nn.Parameter(visual.detach().clone().float())
        self.register_buffer("text", None if text is None else text.detach().clone().float(), persistent=False)

    def text_features(self) -> torch.Tensor:
        return self.learner.text_features() if self.learner is not None else self.text

    def image_features(self, batch: dict) -> torch.Tensor:
        if self.visual is None:
            return batch["features"]
        return self.backbone.forward_images(batch["images"], prompts=[self.visual])

    def batch_logits(self, batch: dict) -> torch.Tensor:
        text = self.text_features()
        return self.logit_scale * (self.image_features(batch).to(text.dtype) @ text.T)


class _ImageRows:
    """Images addressed by row over datasets laid end to end (only ``load_image`` is read, never a label),
    preprocessed when a batch needs them: nothing holds a whole pool of decoded images."""

    def __init__(self, backbone: Backbone, parts: list):
        self.backbone, self.parts = backbone, parts
        self.starts = np.cumsum([0] + [len(part) for part in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, rows: np.ndarray) -> _ImageRows:
        return _ImageRows(self.backbone, [_Picked(self, np.asarray(rows, dtype=np.int64))])

    def load_image(self, row: int):
        part = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.parts[part].load_image(int(row - self.starts[part]))

    def load(self, rows) -> torch.Tensor:
        preprocess = self.backbone.preprocess
        return torch.stack([preprocess(self.load_image(int(row))) for row in rows])


class _Picked:
    """Rows ``rows`` of an ``_ImageRows``."""

    def __init__(self, source: _ImageRows, rows: np.ndarray):
        self.source, self.rows = source, rows

    def __len__(self) -> int:
        return len(self.rows)

    def load_image(self, i: int):
        return self.source.load_image(int(self.rows[i]))


class _Epoch:
    """One epoch's batches, made as they are reached (images decoded per batch); ``len`` is the batch count."""

    def __init__(self, make, count: int, start: int = 0):
        self.make, self.count, self.start = make, count, start

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return (self.make(b) for b in range(self.start, self.count))


class _Grip(ZeroShotLogitsMixin, ClipHead):
    """The method; the registered classes fix the prompt modality (see :class:`Grip`'s docstring)."""

    modality = "textual"
    _contract_skips = dict(FEWSHOT_SKIPS)

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        templates="generic",
        cache_dir: str | Path | None = None,
        setting: str = "semi-supervised",
        step_quantile: int = 10,
        rounds: int | None = None,
        selection: str = "balanced",
        max_unlabelled: int | None = None,
        n_ctx: int | None = None,
        ctx_init: str | None = "a photo of a",
        n_vis_ctx: int | None = None,
        max_epoch: int = 150,
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.1,
        warmup_epochs: int = 5,
        batch_size: int = 16,
        pseudo_val_fraction: float = 0.2,
        logit_scale: float | None = None,
        random_state: int = 1,
        checkpoint_dir: str | None = None,
        progress: bool = False,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.templates = templates
        self.cache_dir = cache_dir
        self.setting = setting
        self.step_quantile = step_quantile
        self.rounds = rounds
        self.selection = selection
        self.max_unlabelled = max_unlabelled
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.n_vis_ctx = n_vis_ctx
        self.max_epoch = max_epoch
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.batch_size = batch_size
        self.pseudo_val_fraction = pseudo_val_fraction
        self.logit_scale = logit_scale
        self.random_state = random_state
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress

    # ------------------------------------------------------------------ parameters

    @property
    def _learns_text(self) -> bool:
        return self.modality in ("textual", "multimodal")

    @property
    def _learns_image(self) -> bool:
        return self.modality in ("visual", "multimodal")

    def _name(self) -> str:
        return getattr(self, "_registered_name", "grip")

    def _check_params(self) -> None:
        name = self._name()
        if self.setting not in SETTINGS:
            raise CliplabError(f"{name}: setting must be one of {', '.join(SETTINGS)}, got {self.setting!r}")
        if self.selection not in RULES:
            raise CliplabError(f"{name}: selection must be one of {', '.join(RULES)}, got {self.selection!r}")
        rounds_for(self.step_quantile)
        for key, low in (("rounds", 0), ("max_unlabelled", 1), ("n_ctx", 1), ("n_vis_ctx", 1), ("max_epoch", 0),
                         ("warmup_epochs", 0), ("batch_size", 1)):
            value = getattr(self, key)
            if value is None and key in ("rounds", "max_unlabelled", "n_ctx", "n_vis_ctx"):
                continue
            if isinstance(value, bool) or int(value) != value or value < low:
                raise CliplabError(f"{name}: {key} must be an integer >= {low}, got {value!r}")
        if self.rounds is not None and self.rounds > rounds_for(self.step_quantile):
            raise CliplabError(f"{name}: rounds={self.rounds} is more than step_quantile={self.step_quantile} "
                               f"gives ({rounds_for(self.step_quantile)})")
        for key in ("momentum", "weight_decay"):
            if not np.isfinite(float(getattr(self, key))) or float(getattr(self, key)) < 0:
                raise CliplabError(f"{name}: {key} must be finite and >= 0")
        if self.lr is not None and not (np.isfinite(float(self.lr)) and float(self.lr) > 0):
            raise CliplabError(f"{name}: lr must be finite and > 0, got {self.lr!r}")
        if not 0 <= float(self.pseudo_val_fraction) < 1:
            raise CliplabError(f"{name}: pseudo_val_fraction must be in [0, 1), got {self.pseudo_val_fraction!r}")
        if self.ctx_init is not None and not isinstance(self.ctx_init, str):
            raise CliplabError(f"{name}: ctx_init must be words or None, got {self.ctx_init!r}")

    def _lr(self) -> float:
        return float(self.lr) if self.lr is not None else AUTHORS_LR[self.modality]

    def _vis_ctx(self) -> int:
        return int(self.n_vis_ctx) if self.n_vis_ctx is not None else AUTHORS_VISUAL_CONTEXT.get(self.modality, 16)

    def _scale(self) -> float:
        return float(self.logit_scale) if self.logit_scale is not None else float(self.backbone.logit_scale)

    # ------------------------------------------------------------------ prompts

    def _learner(self, class_names, ctx: np.ndarray | None = None) -> PromptLearner:
        """The textual prompt learner for ``class_names`` at its initial context (or at ``ctx``)."""
        backbone = self.backbone
        start_ctx, tokens, embedded, start = initial_context(backbone, class_names, self.n_ctx, self.ctx_init,
                                                             int(self.random_state), self._name())
        if ctx is not None:
            start_ctx = torch.as_tensor(ctx, dtype=torch.float32, device=start_ctx.device)
        n = start_ctx.shape[0]
        length = causal_length(backbone, embedded, tokens)
        learner = PromptLearner(backbone, start_ctx, embedded[:, :start], embedded[:, start + n:], tokens,
                                self._scale(), length)
        return learner.to(backbone.device)

    def _initial_visual(self) -> torch.Tensor:
        """VPT-shallow tokens (p, width): the authors' ``scale * randn`` with scale = width^-0.5, seeded."""
        width = int(self.backbone.image_tower().width)
        generator = torch.Generator().manual_seed(int(self.random_state) + 1)
        return torch.randn(self._vis_ctx(), width, generator=generator) * width ** -0.5

    def _module(self, text0: np.ndarray, visual: bool) -> GripModule:
        """A fresh round's module (every round restarts from the same initial prompts, as the authors)."""
        device = self.backbone.device
        return GripModule(
            self.backbone, self._scale(),
            learner=self._learner(self.class_names) if self._learns_text else None,
            text=None if self._learns_text else torch.from_numpy(text0.T.copy()).to(device),
            visual=self._initial_visual().to(device) if visual else None)

    # ------------------------------------------------------------------ inputs

    def _pool_features(self, unlabelled) -> np.ndarray | None:
        """The unlabelled features only: an ``ImageFeatures``' labels (or anything else it carries) are never read."""
        if unlabelled is None:
            return None
        features = getattr(unlabelled, "features", unlabelled)
        features = np.asarray(features)
        if features.ndim != 2 or len(features) == 0:
            raise FeatureError(f"{self._name()}: the unlabelled set is empty (shape {features.shape}): there is "
                               "nothing to pseudolabel")
        return self._validate(features)

    def _checked_images(self, images, n: int, what: str):
        """``images``, a dataset aligned with ``n`` feature rows (only its ``load_image`` is used)."""
        if images is None:
            raise CliplabError(f"{self._name()}: the {self.modality} prompts train through the image tower and need "
                               f"{what} (a dataset aligned with its feature rows)")
        if len(images) != n:
            raise CliplabError(f"{self._name()}: {what} has {len(images)} images for {n} feature rows")
        return images

    # ------------------------------------------------------------------ fitting

    def _fit(self, X, y, X_val=None, y_val=None, unlabelled=None, images=None, unlabelled_images=None):
        """Learn the prompts on the labelled rows ``X, y`` and GRIP's pseudolabels of ``unlabelled`` (features
        (m, d) or an ``ImageFeatures``, whose labels are never read); the visual modalities also take ``images``
        and ``unlabelled_images`` (datasets aligned with those rows). See :class:`Grip`."""
        self._check_params()
        name = self._name()
        X, y = self._training_rows(X, y, name)
        backbone = self.backbone
        if self._learns_image:
            backbone.image_tower()  # a tower that cannot take prompts (ResNet) refuses here, before any training
        use_images = self._learns_image and (images is not None or unlabelled_images is not None)
        if self._learns_image and not use_images:
            warnings.warn(f"{name}: no images given, so the visual prompts cannot train: the image tower stays as "
                          "it is", stacklevel=2)
        pool = self._pool_features(unlabelled)
        n_classes = len(self.class_names)
        validation = self._validation_set(X_val, y_val) if X_val is not None else None

        labelled_rows = np.arange(len(X))
        targets = np.arange(n_classes)
        pool_images = None
        if self.setting == "unsupervised":  # every row is unlabelled: X joins the pool, its labels unread
            pool = X if pool is None else np.concatenate([pool, X])
            labelled_rows = labelled_rows[:0]
        elif pool is None:
            if self.setting == "transductive":
                raise CliplabError(f"{name}: the transductive setting needs the unlabelled test features "
                                   "(unlabelled=...): there is nothing to pseudolabel")
            warnings.warn(f"{name}: no unlabelled data given: one round on the labelled rows alone", stacklevel=2)
        if self.setting == "transductive":
            targets = np.setdiff1d(targets, y)  # the unseen classes: pseudolabels only among them
            if len(targets) == 0:
                raise CliplabError(f"{name}: transductive setting, but every class has labelled rows: no unseen "
                                   "class to pseudolabel (use setting='semi-supervised')")
        labelled_images = None
        if use_images:
            if len(labelled_rows):
                labelled_images = _ImageRows(backbone, [self._checked_images(images, len(X), "images")])
            if pool is not None:
                parts = []
                if unlabelled is not None:
                    parts.append(self._checked_images(unlabelled_images, len(pool) - (len(X) if self.setting ==
                                                      "unsupervised" else 0), "unlabelled_images"))
                if self.setting == "unsupervised":
                    parts.append(self._checked_images(images, len(X), "images"))
                pool_images = _ImageRows(backbone, parts)
        pool_rows = None if pool is None else np.arange(len(pool))
        if pool is not None and self.max_unlabelled is not None and len(pool) > self.max_unlabelled:
            pool_rows = np.sort(np.random.default_rng(int(self.random_state)).choice(
                len(pool), int(self.max_unlabelled), replace=False))  # a seeded subsample of the pool
            pool = pool[pool_rows]
            pool_images = None if pool_images is None else pool_images.take(pool_rows)

        schedule = []
        if pool is not None:
            schedule = grip_schedule(len(pool), len(targets), int(self.step_quantile))
            if schedule[0] == 0:
                raise CliplabError(f"{name}: {len(pool)} unlabelled rows give 0 pseudolabels per class in round 1 "
                                   f"({len(targets)} classes, {len(schedule)} rounds: at least "
                                   f"{len(schedule) * len(targets)} rows needed)")
            schedule = schedule[:self.rounds] if self.rounds is not None else schedule
        elif self.rounds != 0:
            schedule = [0]  # labelled rows only: one round
        text0 = self._zeroshot_weights()  # (d, C): round 0, the zero-shot model that labels round 1
        scale = self._scale()
        round_weights, rounds_log = [text0], []
        module = None
        current = {"text": text0, "visual": None}
        for r, k in enumerate(schedule, start=1):
            rows, labels = np.zeros(0, np.int64), np.zeros(0, np.int64)
            if k > 0:
                probs = self._pool_probs(pool, pool_images, current, targets, scale)
                rows, labels = select_top_k(probs, k, rule=self.selection)
                labels = targets[labels]
            train_p, held = self._hold_out(rows, k, r)
            module = self._module(text0, use_images)
            loss = self._train_round(module, r, X, y, labelled_rows, pool, rows[train_p], labels[train_p],
                                     labelled_images, pool_images)
            with torch.no_grad():
                text = module.text_features().detach().float().cpu().numpy().T
            visual = None if module.visual is None else module.visual.detach().float().cpu().numpy()
            current = {"text": text, "visual": visual}
            round_weights.append(text)
            entry = {"round": r, "k": int(k), "pseudolabels": int(len(rows)), "trained_pseudolabels":
                     int(train_p.sum()), "labelled": int(len(labelled_rows)), "final_loss": loss}
            if len(held) and not use_images:
                entry["pseudo_val_agreement"] = accuracy(scale * (pool[rows[held]] @ text), labels[held])
            if validation is not None and not use_images:
                entry["val_acc"] = accuracy(scale * (validation[0] @ text), validation[1])
            rounds_log.append(entry)
            self.pseudo_rows_, self.pseudo_labels_ = (rows if pool_rows is None else pool_rows[rows]), labels

        if not schedule:
            self.pseudo_rows_, self.pseudo_labels_ = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.weights_ = np.ascontiguousarray(round_weights[-1], dtype=np.float32)
        self.round_weights_ = np.ascontiguousarray(np.stack(round_weights), dtype=np.float32)
        if module is not None and module.learner is not None:
            self.ctx_ = module.learner.ctx.detach().float().cpu().numpy()
        elif self._learns_text:
            self.ctx_ = self._learner(self.class_names).ctx.detach().float().cpu().numpy()
        if self._learns_image:  # (0, width) where no visual prompts trained: the image tower as it is
            width = int(backbone.image_tower().width)
            self.vis_ctx_ = np.ascontiguousarray(current["visual"] if current["visual"] is not None
                                                 else np.zeros((0, width)), dtype=np.float32)
            self.backbone_ = self.rebuild_backbone(backbone)
        self.logit_scale_ = scale
        self.classes_ = np.arange(n_classes)
        self.n_features_in_ = X.shape[1]
        self.rounds_ = rounds_log
        self.schedule_ = [int(k) for k in schedule]
        self.pool_size_ = 0 if pool is None else int(len(pool))  # after max_unlabelled
        self.target_classes_ = targets.astype(np.int64)
        self.val_accuracy_ = rounds_log[-1].get("val_acc") if rounds_log else (
            accuracy(self.logits(validation[0]), validation[1]) if validation is not None else None)
        return self

    def _hold_out(self, rows: np.ndarray, k: int, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(mask of the pseudolabels trained on, rows of ``rows`` held out): from ``PSEUDO_VAL_FROM`` per class on,
        the authors keep ``pseudo_val_fraction`` of them aside (their validation set, which selects nothing)."""
        keep = np.ones(len(rows), dtype=bool)
        if k < PSEUDO_VAL_FROM or not self.pseudo_val_fraction or not len(rows):
            return keep, np.zeros(0, np.int64)
        rng = np.random.default_rng([int(self.random_state), r])
        n_train = int(len(rows) * (1 - float(self.pseudo_val_fraction)))
        keep[:] = False
        keep[rng.choice(len(rows), size=n_train, replace=False)] = True
        return keep, np.flatnonzero(~keep)

    def _pool_probs(self, pool, pool_images, current, targets, scale) -> np.ndarray:
        """Softmax over the target classes of the current model's logits on the pool (the previous round's)."""
        text = current["text"][:, targets]
        features = pool if current["visual"] is None else self._encode(pool_images, current["visual"])
        logits = scale * (features.astype(np.float64) @ text.astype(np.float64))
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)

    def _encode(self, images: _ImageRows, visual: np.ndarray) -> np.ndarray:
        prompt = torch.from_numpy(visual).to(self.backbone.device)
        out = []
        with torch.no_grad():
            for s in range(0, len(images), ENCODE_BATCH):
                batch = images.load(range(s, min(s + ENCODE_BATCH, len(images))))
                out.append(self.backbone.forward_images(batch, prompts=[prompt]).float().cpu())
        return torch.cat(out).numpy()

    def _train_round(self, module: GripModule, r: int, X, y, labelled_rows, pool, p_rows, p_labels,
                     labelled_images, pool_images) -> float | None:
        """One round's training through the one loop; returns the last step's loss (None without training)."""
        epochs = int(self.max_epoch)
        n_l, n_p = len(labelled_rows), len(p_rows)
        if epochs == 0 or n_l + n_p == 0 or not any(p.requires_grad for p in module.parameters()):
            return None  # nothing to train (a visual modality without images learns nothing)
        features = np.concatenate([X[labelled_rows], pool[p_rows] if n_p else X[:0]]).astype(np.float32)
        labels = torch.from_numpy(np.concatenate([y[labelled_rows], p_labels]).astype(np.int64))
        pseudo = torch.from_numpy(np.r_[np.zeros(n_l, bool), np.ones(n_p, bool)])
        images = None
        if module.visual is not None:  # the round's training images: labelled rows, then pseudolabelled ones
            images = _ImageRows(self.backbone, ([labelled_images.take(labelled_rows)] if n_l else [])
                                + ([pool_images.take(p_rows)] if n_p else []))
        balance = n_l / n_p if n_p and n_l else 1.0
        # semi-supervised: balance * CE(labelled) + CE(pseudo); transductive: CE(labelled) + balance * CE(pseudo)
        w_l, w_p = (1.0, balance) if self.setting == "transductive" else (balance, 1.0)
        feats = torch.from_numpy(features)
        n, batch = n_l + n_p, int(self.batch_size)
        seed = int(self.random_state)

        def data(epoch: int, start: int = 0) -> _Epoch:
            order = torch.from_numpy(np.random.default_rng([seed, r, int(epoch)]).permutation(n))

            def make(b: int) -> dict:
                rows = order[b * batch:(b + 1) * batch]  # the authors' DataLoader keeps the last, smaller batch
                item = {"features": feats[rows], "labels": labels[rows], "pseudo": pseudo[rows],
                        "w_labelled": w_l, "w_pseudo": w_p}
                if images is not None:
                    item["images"] = images.load(rows.tolist())
                return item

            return _Epoch(make, -(-n // batch), start)

        model = self.backbone.model
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        model.requires_grad_(False)  # only the prompts train
        try:
            result = run_training(module, GripObjective(), data, self._settings(r, epochs, features, labels, pseudo))
        finally:
            for param, flag in frozen:
                param.requires_grad_(flag)
        return float(result.last_loss)

    def _settings(self, r: int, epochs: int, features, labels, pseudo) -> TrainSettings:
        digest = hashlib.sha256()
        for part in (np.ascontiguousarray(features), labels.numpy(), pseudo.numpy()):
            digest.update(part.tobytes())
        identity = {"method": self._name(), "round": r, "data": digest.hexdigest()[:16],
                    "params": {k: v for k, v in self.get_params(deep=False).items()
                               if k not in ("backbone", "cache_dir", "checkpoint_dir", "progress")},
                    "model_id": self.backbone.model_id}
        return TrainSettings(
            epochs=epochs, lr=self._lr(), optimizer="sgd", momentum=float(self.momentum),
            weight_decay=float(self.weight_decay), warmup="linear", warmup_steps=int(self.warmup_epochs),
            schedule="cosine", seed=int(self.random_state) * 1000 + r, device=str(self.backbone.device),
            progress=bool(self.progress), desc=f"{self._name()} round {r}",
            checkpoint_dir=None if self.checkpoint_dir is None else str(Path(self.checkpoint_dir) / f"round-{r:02d}"),
            checkpoint_every=0, checkpoint_seconds=60.0 if self.checkpoint_dir is not None else 0.0,
            identity=json.dumps(identity, sort_keys=True, default=str))

    # ------------------------------------------------------------------ prediction

    def rebuild_backbone(self, backbone: Backbone) -> Backbone:
        """A derived copy of ``backbone`` with the learned visual prompts attached (``backbone_``)."""
        derived = backbone.derive(self._name(), trainable=False)
        prompts = np.asarray(self.vis_ctx_, dtype=np.float32)
        return derived.set_prompts(image=[torch.from_numpy(prompts)] if len(prompts) else [])

    def logits(self, X) -> np.ndarray:
        """``logit_scale_ * X @ weights_`` (n, C); the visual modalities' ``X`` are features of ``backbone_``."""
        X = self._checked(X)
        return self.logit_scale_ * (X @ self.weights_)

    def with_classes(self, class_names: Sequence[str]):
        """A fitted head for other class names with what was learned: the learned context with the new names
        (textual), the visual prompts with the new names' zero-shot weights (visual), both (multimodal)."""
        check_is_fitted(self)
        head = clone(self).set_params(class_names=list(class_names))
        head.logit_scale_ = self.logit_scale_
        if self._learns_text:
            head.ctx_ = self.ctx_.copy()
            with torch.no_grad():
                text = head._learner(head.class_names, self.ctx_).text_features().float().cpu().numpy()
            head.weights_ = np.ascontiguousarray(text.T, dtype=np.float32)
        else:
            head.weights_ = np.ascontiguousarray(head._zeroshot_weights(), dtype=np.float32)
        if self._learns_image:
            head.vis_ctx_ = self.vis_ctx_.copy()
            head.backbone_ = self.backbone_
        head.classes_ = np.arange(len(head.class_names))
        head.n_features_in_ = self.n_features_in_
        # the fit record (fit_summary) travels with what was learned
        head.schedule_, head.rounds_, head.pool_size_ = self.schedule_, self.rounds_, self.pool_size_
        head.val_accuracy_ = self.val_accuracy_
        return head

    def fit_summary(self) -> dict:
        return {"setting": self.setting, "modality": self.modality, "schedule": self.schedule_,
                "pool": self.pool_size_, "rounds": self.rounds_, "val_accuracy": self.val_accuracy_}


_DOC = """GRIP (paper 23): textual prompts tuned on CLIP's own zero-shot pseudolabels, grown round by round.

    Paper 23 in ../shared/papers.md (Menghini et al., NeurIPS 2023), read against the authors' code,
    github.com/BatsResearch/menghini-enhanceCLIPwithCLIP-code (``methods/*/training_strategies.py: grip_train``,
    ``update_training_set``, ``*_fpl.py``, ``utils/clip_pseudolabels.py``, ``methods_config/grip_*_config.yml``).

    Modality (one registered name each): ``grip`` learns the textual context (CoOp's, ``train.prompts``) on cached
    image features; ``grip-visual`` learns VPT-shallow tokens after the image tower's class token with the
    zero-shot class weights fixed; ``grip-multimodal`` both. The visual ones train through the image tower on the
    images (``images``/``unlabelled_images``, decoded and preprocessed batch by batch, no augmentation, as the
    authors' ``transform``; the pool is re-encoded with the prompts each round to relabel it) and give a derived
    Backbone (``backbone_``, the prompts attached) whose features ``logits`` scores.

    Settings (``setting``), the paper's three, one loss (the authors' ``define_loss_function``, batch means):
    ``"semi-supervised"``: labelled ``X, y`` + pseudolabels of ``unlabelled`` (the rest of the train split),
    loss ``(|L| / |P|) CE(labelled) + CE(pseudo)``; ``"transductive"`` (zero-shot): ``X, y`` label the seen
    classes, ``unlabelled`` are test images, pseudolabels only among the classes without a labelled row (softmax
    over them), loss ``CE(labelled) + (|L| / |P|) CE(pseudo)``; ``"unsupervised"``: no labels are read, ``X``
    joins the pool (its ``y`` only validated), loss ``CE(pseudo)``. |L|, |P| count the round's training rows.

    Rounds (GRIP): round 0 is zero-shot CLIP (``templates``' class weights, the head's ``round_weights_[0]``).
    ``R = 100 // step_quantile`` rounds (10); round r pseudolabels the pool with the previous round's model,
    ``K_r = floor(r * floor(m / R) / C)`` per class (``train.pseudolabels.grip_schedule``, class-balanced top-K by
    ``select_top_k``), re-initialises the prompts to the same start and trains them from scratch on the labelled
    rows and those pseudolabels. ``rounds`` stops after that many (0: zero-shot; the benchmark runs fewer, say
    so). ``max_unlabelled`` (None: all) first draws that many pool rows (seeded by ``random_state``), for CPU-sized
    runs on a whole train split (``pseudo_rows_`` still index the whole pool). From K_r >= 10 the authors train on
    80% of the pseudolabels and keep 20% as a validation set that selects nothing (``pseudo_val_fraction``; the
    rows held out by a (random_state, r) generator): the held-out part's agreement with the model is logged. The
    last epoch's prompts are kept, as theirs.

    Training (the authors' ``grip_*_config.yml``): SGD, momentum 0.9, weight decay 0.1, lr 0.1 (textual, visual)
    or 0.01 (multimodal), batches of 16 in a seeded random order (the last smaller batch kept), ``max_epoch`` 150
    per round with 5 warm-up epochs then cosine, set once an epoch; through ``train.engine.run_training``
    (objective ``"grip"``), one checkpoint folder per round under ``checkpoint_dir`` (a killed fit resumes).

    Through the protocol (``eval.inputs.prepare_fit``, needs "unlabelled"): the semi-supervised setting on the
    few-shot draw, ``unlabelled`` = the rest of the train split, labels removed (``max_unlabelled`` bounds it).

    Unlabelled data never carry labels into fit: ``unlabelled`` is reduced to its features on entry (an
    ``ImageFeatures``' labels are not read; a test poisons them), ``unlabelled_images`` is only asked for
    ``load_image``. An empty ``unlabelled`` set, a transductive fit without one, a pool too small for one
    pseudolabel per class in round 1, a transductive fit where every class is labelled, a visual modality without
    images or on a ResNet image tower: one line each, before any training. Without ``unlabelled`` in the
    semi-supervised setting (e.g. a plain ``fit(X, y)``) there is nothing to pseudolabel: one warning, one round
    on the labelled rows.

    Fitted: ``weights_`` (d, C), ``round_weights_`` (rounds + 1, d, C: the class weights after each round, 0 =
    zero-shot), ``ctx_`` (textual context), ``vis_ctx_`` (visual tokens), ``backbone_`` (visual), ``rounds_`` (per
    round: k, pseudolabels, trained ones, labelled rows, final loss, ``val_acc`` on ``X_val`` where given and
    the pseudo-validation agreement, textual only), ``schedule_``, ``pool_size_``, ``target_classes_``,
    ``pseudo_rows_``/``pseudo_labels_`` (the last round's pseudolabels: rows of the pool = ``unlabelled`` then,
    unsupervised, ``X``), ``logit_scale_``, ``val_accuracy_``.

    Departures from the authors' code, and why:

    - Textual context: ``ctx_init`` "a photo of a" (its 4 tokens, so 0 rounds is the zero-shot template and short
      CPU runs start from a sensible prompt) and the prompt ``"{context} {class}."`` of ``train.prompts``; theirs
      is 16 random N(0, 0.02^2) vectors before the bare class name (``ctx_init=None, n_ctx=16`` gives the
      former's random start).
    - Multimodal: the textual context and the visual tokens are learned side by side; the authors couple them
      through a small shared transformer (UPT: width 128, 1 layer) that is not built here.
    - Pseudolabel selection (``selection="balanced"``) is order-independent and keeps a row for one class at most;
      ``selection="authors"`` restates their one-pass leaderboard (pool order; a row may be kept twice), which
      equals their functions' selection on the same logits (``train.pseudolabels``, outside comparison).
    - Schedule: the one loop's warm-up is linear from lr/5 at epoch 0 (theirs from 0) and its cosine runs over
      all epochs (theirs over the epochs after warm-up).
    - Visual prompts start from ``width^-0.5 * N(0, 1)`` (theirs), seeded by ``random_state + 1``; precision float32
      (theirs fp16 on GPU); seeds are per (``random_state``, round, epoch) generators.
    """


@register("grip", family="encoder", paper=23, needs_backbone=True, needs=("val", "unlabelled"),
          default_templates="dataset", gives=("class_weights",))
class Grip(_Grip):
    """GRIP (paper 23): textual prompts tuned on CLIP's own zero-shot pseudolabels, grown round by round."""
    __doc__ = _DOC  # the whole text above; its first line is this class's literal docstring
    modality = "textual"

    def fit(self, X, y, X_val=None, y_val=None, unlabelled=None):
        """Learn the context on ``X, y`` and GRIP's pseudolabels of ``unlabelled`` (features or an
        ``ImageFeatures``, labels never read); ``X_val``/``y_val`` are only scored each round."""
        return self._fit(X, y, X_val, y_val, unlabelled)


@register("grip-visual", family="encoder", paper=23, needs_backbone=True, needs=("images", "unlabelled"),
          default_templates="dataset", gives=("backbone",))
class GripVisual(_Grip):
    """GRIP with visual prompts (VPT-shallow); see :class:`Grip`."""
    modality = "visual"

    def fit(self, X, y, unlabelled=None, images=None, unlabelled_images=None):
        """Learn the prompts on ``X, y`` (``images`` aligned with them) and GRIP's pseudolabels of ``unlabelled``
        (``unlabelled_images`` aligned with it; labels never read)."""
        return self._fit(X, y, None, None, unlabelled, images, unlabelled_images)


@register("grip-multimodal", family="encoder", paper=23, needs_backbone=True, needs=("images", "unlabelled"),
          default_templates="dataset", gives=("backbone",))
class GripMultimodal(_Grip):
    """GRIP with textual and visual prompts; see :class:`Grip`."""
    modality = "multimodal"

    def fit(self, X, y, unlabelled=None, images=None, unlabelled_images=None):
        """Learn the prompts on ``X, y`` (``images`` aligned with them) and GRIP's pseudolabels of ``unlabelled``
        (``unlabelled_images`` aligned with it; labels never read)."""
        return self._fit(X, y, None, None, unlabelled, images, unlabelled_images)
