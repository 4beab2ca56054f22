"""CoCoOp: conditional context optimisation, CoOp's context shifted per image by a meta-network (Zhou et al., CVPR 2022,
the follow-up of paper 50)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ..errors import CliplabError
from ..models.backbone import Backbone
from ..train.engine import register_objective
from ..train.prompts import (
    MAX_TOKENS,
    PromptLearner,
    PromptObjective,
    PromptTrainingMixin,
    causal_length,
    initial_context,
    train_prompts,
)
from .base import FEWSHOT_SKIPS, ClipHead, ZeroShotLogitsMixin, accuracy
from .registry import register

AUTHORS_EPOCHS = 10  # MAX_EPOCH of every CoCoOp config (configs/trainers/CoCoOp/*_ep10_batch1*.yaml)
META_REDUCTION = 16  # the meta-network's hidden width: vis_dim // 16
META_NAMES = ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
META_FITTED = ("meta_w1_", "meta_b1_", "meta_w2_", "meta_b2_")


class ConditionalPromptLearner(PromptLearner):
    """CoOp's prompt learner plus the meta-network ``h(x)`` = Linear(d, d/16) - ReLU - Linear(d/16, width): image
    b's context is ``ctx + h(x_b)`` (the same bias added to every context token) and its logits are
    ``logit_scale * x_b . t_{b,c}`` with t_{b,c} the text feature of class c under that context. All B x C
    prompts of a batch run through the text tower as one batch (the authors loop over the images)."""

    def __init__(self, backbone: Backbone, ctx: torch.Tensor, prefix: torch.Tensor, suffix: torch.Tensor,
                 tokens: torch.Tensor, logit_scale: float, length: int | None, image_dim: int, random_state: int):
        super().__init__(backbone, ctx, prefix, suffix, tokens, logit_scale, length)
        hidden = max(1, image_dim // META_REDUCTION)
        with torch.random.fork_rng(devices=[]):  # torch's default Linear init, seeded by random_state
            torch.manual_seed(int(random_state))
            self.meta_net = torch.nn.Sequential(OrderedDict([
                ("linear1", torch.nn.Linear(image_dim, hidden)), ("relu", torch.nn.ReLU()),
                ("linear2", torch.nn.Linear(hidden, ctx.shape[1]))])).to(ctx.device)

    def conditioned_text(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, d): the class text features under each image's context."""
        return self.text_features(self.meta_net(features.to(self.ctx.dtype)))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C): ``logit_scale * x_b . t_{b,c}``."""
        features = features.to(self.ctx.dtype)
        text = self.conditioned_text(features)
        return self.logit_scale * torch.einsum("bd,bcd->bc", features, text.to(features.dtype))


@register_objective("cocoop")
class CoCoOpObjective(PromptObjective):
    """CoCoOp's loss: ``F.cross_entropy`` of the image-conditioned logits, averaged over the batch as the authors'
    (their batch is 1 image); weight decay on the context and the meta-network (Dassl's SGD on the prompt learner)."""


@register("cocoop", family="encoder", paper=50, needs_train=True, needs=("val", "views"))
class CoCoOp(PromptTrainingMixin, ZeroShotLogitsMixin, ClipHead):
    """CoCoOp: CoOp's learned context shifted per image by a meta-network; logits = logit_scale * x . t_c(x).

    Zhou et al., "Conditional Prompt Learning for Vision-Language Models" (CVPR 2022), the follow-up of paper 50
    in ../shared/papers.md, read against the authors' code, github.com/KaiyangZhou/CoOp (``trainers/cocoop.py``,
    ``configs/trainers/CoCoOp/*.yaml``, ``scripts/cocoop/base2new_train.sh``) and Dassl's optimiser and scheduler.

    Prompt: as CoOp's (``heads/coop.py``), ``[SOS] v_1 ... v_M [CLASS] . [EOS]`` with v_1..v_M (``ctx_``) learned,
    but conditioned on the image: with the meta-network pi(x) = W2 ReLU(W1 x + b1) + b2 (Linear(d, d/16) - ReLU -
    Linear(d/16, width), ``meta_w1_`` (d/16, d), ``meta_b1_``, ``meta_w2_`` (width, d/16), ``meta_b2_``), image x's
    prompts use v_m + pi(x) for every m, t_c(x) is the L2-normalised text feature of class c under them, and
    ``logits[x, c] = logit_scale * x . t_c(x)`` for L2-normalised image features x. With a zero meta-network
    (W2 = 0, b2 = 0) it is CoOp with the same context (tested). The context and the meta-network train together by
    cross-entropy; both towers stay frozen.

    The authors' defaults (``vit_b16_c4_ep10_batch1_ctxv1``, the base-to-new config): ``ctx_init`` "a photo of a"
    (M = 4; ``n_ctx``/``ctx_init=None`` as CoOp: their c4/c8/c16 configs are ``ctx_init=None, n_ctx=4/8/16``),
    SGD lr 0.002, momentum 0.9, weight decay 5e-4 (on the context and the meta-network), ``max_epoch`` 10 with one
    constant warm-up epoch at 1e-5 then cosine, set once an epoch, batch size 1; the meta-network starts as torch's
    default Linear init (seeded by ``random_state``); the last epoch's state is kept.

    Batching (the authors loop over a batch's images, one text pass of C prompts each): here the B x C prompts of a
    batch run through the text tower as one batch; the loss is the same batch-mean cross-entropy (tested against a
    per-image loop), so with the authors' batch size 1 a step is theirs. Prediction has to run the text tower for
    every image (C prompts each, the price of conditioning): ``logits`` scores images in chunks of about
    ``MAX_TOKENS`` prompt positions; on a CPU this is slow for many test images with a large text tower.

    Features, views, validation, truncation (``truncate``), ``checkpoint_dir``, ``random_state``, ``progress``,
    ``logit_scale`` and ``cache_dir``: as CoOp's (cached image features, an epoch draws one cached augmented view
    per item, nothing selected on the validation part, the text tower run up to the last end-of-text position
    where its mask is causal, resume after a kill to the same numbers).

    ``with_classes(names)``: the learned context and meta-network scoring other class names (base-to-new).

    Fitted state: ``ctx_``, the four ``meta_*_`` arrays, ``logit_scale_``, ``epochs_``, ``training_loss_`` (mean step
    loss per epoch), ``val_accuracy_``, ``history_``, ``text_positions_``; ``heads/saving.py`` stores them and a
    loaded head scores with them and its Backbone.

    Departures from the authors' code, and why:

    - Precision: float32 (their configs use fp16); ``logit_scale`` defaults to the model's (clamped at 100).
    - Views: V cached augmentations instead of a new random crop each epoch (the image tower never reruns).
    - The B x C text passes are batched (same numbers, see above); seeds are (``random_state``, epoch)
      generators, so a run repeats bit for bit on the CPU.
    - Hidden width ``max(1, d // 16)`` (theirs ``d // 16``, zero below d = 16).
    - Class names as given (the code replaces "_" by " "); the init's length counted in the model's tokens.
    """

    _contract_skips = dict(FEWSHOT_SKIPS)

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        cache_dir: str | Path | None = None,
        n_ctx: int | None = None,
        ctx_init: str | None = "a photo of a",
        max_epoch: int | None = AUTHORS_EPOCHS,
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        batch_size: int = 1,
        logit_scale: float | None = None,
        random_state: int = 1,
        truncate: bool = True,
        checkpoint_dir: str | Path | None = None,
        progress: bool = False,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.cache_dir = cache_dir
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.max_epoch = max_epoch
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.warmup_lr = warmup_lr
        self.batch_size = batch_size
        self.logit_scale = logit_scale
        self.random_state = random_state
        self.truncate = truncate
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress

    def build_learner(self) -> ConditionalPromptLearner:
        """The learner at its initial context and meta-network (seeded by ``random_state``)."""
        self._check_params()
        backbone = self.backbone
        ctx, tokens, embedded, start = initial_context(backbone, self.class_names, self.n_ctx, self.ctx_init,
                                                       self.random_state, "CoCoOp")
        scale = self.logit_scale if self.logit_scale is not None else backbone.logit_scale
        length = causal_length(backbone, embedded, tokens) if self.truncate else None
        learner = ConditionalPromptLearner(backbone, ctx, embedded[:, :start], embedded[:, start + len(ctx):],
                                           tokens, scale, length, backbone.embed_dim, int(self.random_state))
        return learner.to(backbone.device)

    def epochs_for(self, y=None) -> int:
        """``max_epoch`` (None: the authors' 10)."""
        return AUTHORS_EPOCHS if self.max_epoch is None else int(self.max_epoch)

    def fit(self, X, y, X_val=None, y_val=None, views=None):
        """Learn the context and the meta-network on the training features (``views`` if given)."""
        self._check_params()
        X, y = self._training_rows(X, y, "CoCoOp")
        samples = self._checked_views(views, X) if views is not None else X[None]
        validation = self._validation_set(X_val, y_val) if X_val is not None else None
        epochs = self.epochs_for(y)
        learner = self.build_learner()
        history = train_prompts(learner, self.epoch_data(samples, y), self.train_settings(epochs, samples, y),
                                epochs, validation, CoCoOpObjective())
        self._keep(learner)
        self.logit_scale_ = float(learner.logit_scale)
        self.classes_ = np.arange(len(self.class_names))
        self.n_features_in_ = X.shape[1]
        self.epochs_ = int(epochs)
        self.text_positions_ = int(learner.length or learner.tokens.shape[1])
        self.training_loss_ = learner.epoch_losses()
        self.val_accuracy_ = (accuracy(self.logits(validation[0]), validation[1]) if validation is not None
                              else None)
        self.history_ = [{k: v for k, v in h.items() if k != "seconds"} for h in history]
        return self

    def _keep(self, learner: ConditionalPromptLearner) -> None:
        """The learned tensors as fitted numpy state."""
        self.ctx_ = learner.ctx.detach().float().cpu().numpy()
        state = learner.meta_net.state_dict()
        for name, key in zip(META_NAMES, META_FITTED):
            setattr(self, key, state[name].detach().float().cpu().numpy())

    def fitted_learner(self) -> ConditionalPromptLearner:
        """A learner for ``class_names`` holding the fitted context and meta-network."""
        check_is_fitted(self)
        learner = self.build_learner()
        if tuple(learner.ctx.shape) != tuple(np.shape(self.ctx_)):
            raise CliplabError(f"CoCoOp: the learned context {np.shape(self.ctx_)} does not fit the prompts "
                               f"{tuple(learner.ctx.shape)}")
        with torch.no_grad():
            learner.ctx.copy_(torch.from_numpy(np.asarray(self.ctx_, dtype=np.float32)))
            learner.meta_net.load_state_dict({name: torch.from_numpy(np.asarray(getattr(self, key), dtype=np.float32))
                                              for name, key in zip(META_NAMES, META_FITTED)})
        learner.logit_scale = float(self.logit_scale_)
        return learner.eval()

    def with_classes(self, class_names: Sequence[str]) -> CoCoOp:
        """A fitted CoCoOp scoring ``class_names`` with the learned context and meta-network (base-to-new);
        fit facts (losses, history) are the original fit's."""
        check_is_fitted(self)
        head = self._fitted_copy(class_names)
        head.classes_ = np.arange(len(head.class_names))
        learner = head.fitted_learner()
        head.text_positions_ = int(learner.length or learner.tokens.shape[1])
        return head

    # ------------------------------------------------------------------ prediction

    def logits(self, X) -> np.ndarray:
        """``logit_scale_ * x . t_c(x)`` (n, C), the text tower run for every image (in chunks)."""
        X = self._checked(X)
        learner = self.fitted_learner()
        positions = int(learner.length or learner.tokens.shape[1])
        chunk = max(1, MAX_TOKENS // (len(self.class_names) * positions))
        out = np.empty((len(X), len(self.class_names)), dtype=np.float32)
        features = torch.from_numpy(np.array(X, dtype=np.float32))  # a copy: X may be read-only
        with torch.no_grad():
            for start in range(0, len(X), chunk):
                part = features[start:start + chunk].to(learner.ctx.device)
                out[start:start + chunk] = learner.logits(part).float().cpu().numpy()
        return out

    def fit_summary(self) -> dict:
        return {"n_ctx": int(len(self.ctx_)), "ctx_init": self.ctx_init, "epochs": self.epochs_,
                "meta_hidden": int(np.shape(self.meta_w1_)[0]),
                "final_loss": self.training_loss_[-1] if self.training_loss_ else None,
                "val_accuracy": self.val_accuracy_}
