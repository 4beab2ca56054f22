"""CoOp: context optimisation, learned prompt context for CLIP's text tower (paper 50, Zhou et al., IJCV 2022)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ..errors import CliplabError
from ..models.backbone import Backbone
from ..train.prompts import (
    PromptLearner,
    PromptObjective,
    PromptTrainingMixin,
    causal_length,
    initial_context,
    train_prompts,
)
from .base import FEWSHOT_SKIPS, ClipHead, ZeroShotLogitsMixin, accuracy
from .registry import register


def authors_epochs(shots: int) -> int:
    """MAX_EPOCH of the authors' few-shot configs (COOP.md, ``scripts/coop/main.sh``): 1 shot ``*_ep50``,
    2 and 4 shots ``*_ep100``, 8 and 16 shots the 200-epoch configs."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


CoOpObjective = PromptObjective  # the objective "coop" (train/prompts.py), under the name benchmarks import


@register("coop", family="encoder", paper=50, needs_train=True, needs=("val", "views"), gives=("class_weights",))
class CoOp(PromptTrainingMixin, ZeroShotLogitsMixin, ClipHead):
    """CoOp: prompt context vectors learned through the frozen text tower; logits = logit_scale * x . t_c.

    Paper 50 in ../shared/papers.md (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022),
    read against the authors' code, github.com/KaiyangZhou/CoOp (``trainers/coop.py``,
    ``configs/trainers/CoOp/*.yaml``, ``scripts/coop/main.sh``) and Dassl's optimiser, scheduler and loader.

    Prompt (unified context, class token at the end): the text tower runs on the token embeddings
    ``[SOS] v_1 ... v_M [CLASS] . [EOS]`` where v_1..v_M (``ctx_``, (M, width)) are shared by all classes and
    learned, and the rest are the model's embeddings of ``"X X ... X {class name}."``; the class text feature
    t_c is the L2-normalised output (pooled at the end-of-text token), and with L2-normalised image features
    x, ``logits = logit_scale * x @ weights_``, ``weights_`` = [t_1 .. t_C] (d, C), ``p(y=c|x)`` = softmax.
    Only the context trains, by cross-entropy on the training features; both towers stay frozen.

    Initialisation (``ctx_init``, ``n_ctx``): with ``ctx_init`` (default "a photo of a") the context starts as
    the token embeddings of those words, so before training (``max_epoch=0``) ``weights_`` equals the
    zero-shot weights of the template ``"a photo of a {c}."``; without an init, M = ``n_ctx`` (default 16)
    vectors drawn from N(0, 0.02^2) with ``random_state``. Choice: the authors' code is more specific than
    issue 23's "16 tokens initialised from 'a photo of a'": with CTX_INIT it sets M to the init's length
    (4 here) and ignores N_CTX, so ``n_ctx=None`` (default) does the same. A larger ``n_ctx`` with an init
    (e.g. 16) is a departure the code does not have: the init fills the last tokens and the first
    ``n_ctx - len(init)`` are random, giving ``"X X ... a photo of a {c}."``. The init's length is counted in
    tokens of the model's tokenizer (the code counts words, which are single tokens for "a photo of a").

    Training (through ``cliplab.train.engine.run_training``, objective ``"coop"``), the authors' configs:
    SGD lr 0.002, momentum 0.9, weight decay 5e-4; ``max_epoch`` epochs with the rate set once an epoch:
    ``warmup_epochs`` (1) at the constant ``warmup_lr`` (1e-5), then cosine, epoch e at
    ``lr/2 (1 + cos(pi (e - 1) / max_epoch))`` (Dassl's ConstantWarmupScheduler over CosineAnnealingLR);
    batches of 32 in a random order per epoch, the last incomplete batch dropped when there are at least 32
    items (Dassl's ``drop_last``); the context of the last epoch is kept (TEST.FINAL_MODEL "last_step").
    ``max_epoch=None`` picks the authors' few-shot config by the shots per class (the largest class count
    of ``y``): 1 shot 50 epochs, 2-4 shots 100, more 200 (their ImageNet runs use 50 at every shot count:
    pass ``max_epoch=50``).

    Features, not images: the image tower is frozen, so ``fit`` takes cached image features and an epoch
    never re-encodes an image (``benchmarks/coop_epoch.py`` measures the difference). The authors draw a
    fresh random crop and flip of every image in every epoch; here, with ``views`` (V, n, d) (the protocol's
    cached augmented views), epoch e takes for each item a view drawn uniformly from the V, by a generator
    seeded with (``random_state``, e), the same generator that orders the epoch; without views every epoch
    uses ``X``. ``X`` itself (the centre crop) is not trained on when views are given, as the authors never
    train on the un-augmented image. ``X_val``/``y_val``, if given, are only scored (``val_accuracy_``, and
    in the progress bar with ``progress=True``): as the authors' few-shot runs, nothing is selected on them.

    Fitted state: ``ctx_`` (M, width), ``weights_`` (d, C), ``logit_scale_``, ``epochs_``, ``training_loss_`` (mean
    step loss per epoch), ``val_accuracy_`` (None without validation), ``history_`` (the loop's evaluations: step,
    epoch, loss, ``val_acc``) and ``text_positions_``; ``heads/saving.py`` stores them (safetensors + JSON) and
    a loaded head scores with ``weights_`` alone.

    Other parameters: ``logit_scale`` (None: the model's), ``random_state`` (the random context vectors and the
    epochs' order and views), ``progress`` (a progress bar with loss, lr and validation accuracy), and
    ``cache_dir``, taken as the other heads take it (CoOp embeds no text through the text cache).
    ``checkpoint_dir``: the training loop's checkpoint folder (``checkpoint.pt`` after every epoch and every
    minute); a fit killed there and run again with the same parameters and data resumes and ends with the same
    context, losses and history as an uninterrupted fit (tested; a finished checkpoint gives its result without
    training; other options or other training data are refused in one line).

    ``with_classes(names)``: the fitted context scoring other class names (the base-to-new protocol of
    ``cliplab fewshot --base-to-new``: trained on the base classes, tested on the new ones).

    Speed (``truncate``, default True): with a causal text tower (CLIP's mask: no position attends to a later
    one) the pooled end-of-text outputs do not depend on the padding after them, so the tower runs on the
    positions up to the longest prompt's end-of-text token only (e.g. 9 of 77), block by block through
    ``Backbone.text_tower()``; the features are the full forward's to float rounding (tested). Where that
    cannot be seen from the tower (no causal mask, pooling not at a position, prompts attached to the
    backbone) all positions run. ``text_positions_`` says how many ran.

    Departures from the authors' code, and why:

    - Views: V cached augmentations (cliplab's ``Augmentation``: random resized crop of area 0.5-1, flip)
      instead of a new crop (area 0.08-1) each epoch; the price of never re-encoding.
    - Precision: float32 (the code's default PREC is fp16); ``logit_scale`` defaults to the model's,
      ``Backbone.logit_scale`` (exp of the learned temperature, clamped at 100 as CLIP's; the code uses the
      unclamped exp, the same 100 for OpenAI's models).
    - Class names are used as given (the code replaces "_" by " "), so the prompts match cliplab's
      zero-shot prompts exactly.
    - Only the unified context with the class token at the end is built (the paper's default); the
      class-specific context (CSC) and the "middle"/"front" positions are not.
    - The schedule's epoch index and batches come from the one training loop; seeds are (``random_state``,
      epoch) NumPy/torch generators instead of Dassl's global seeding, so runs repeat bit for bit on the CPU.
    """

    # scikit-learn's checks feed 1-10 random features and float/string labels: CoOp scores features of its model's
    # width against labels that are class indices into class_names, like the few-shot heads.
    _contract_skips = dict(FEWSHOT_SKIPS)

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        cache_dir: str | Path | None = None,
        n_ctx: int | None = None,
        ctx_init: str | None = "a photo of a",
        max_epoch: int | None = None,
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        batch_size: int = 32,
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

    # ------------------------------------------------------------------ parameters

    def epochs_for(self, y: np.ndarray) -> int:
        """``max_epoch``, or the authors' few-shot choice by the shots per class of ``y``."""
        if self.max_epoch is not None:
            return int(self.max_epoch)
        return authors_epochs(int(np.bincount(np.asarray(y, dtype=np.int64)).max(initial=1)))

    # ------------------------------------------------------------------ prompts

    def build_learner(self) -> PromptLearner:
        """The prompt learner at its initial context (seeded by ``random_state`` where part of it is random)."""
        self._check_params()
        backbone = self.backbone
        ctx, tokens, embedded, start = initial_context(backbone, self.class_names, self.n_ctx, self.ctx_init,
                                                       self.random_state, "CoOp")
        scale = self.logit_scale if self.logit_scale is not None else backbone.logit_scale
        length = causal_length(backbone, embedded, tokens) if self.truncate else None
        n_ctx = len(ctx)
        learner = PromptLearner(backbone, ctx, embedded[:, :start], embedded[:, start + n_ctx:], tokens, scale, length)
        return learner.to(backbone.device)

    # ------------------------------------------------------------------ fitting

    def fit(self, X, y, X_val=None, y_val=None, views=None):
        """Learn the context on the training features (``views`` if given, see the class docstring)."""
        self._check_params()
        X, y = self._training_rows(X, y, "CoOp")
        samples = self._checked_views(views, X) if views is not None else X[None]
        validation = self._validation_set(X_val, y_val) if X_val is not None else None
        epochs = self.epochs_for(y)
        learner = self.build_learner()
        history = train_prompts(learner, self.epoch_data(samples, y), self.train_settings(epochs, samples, y), epochs,
                                validation)
        with torch.no_grad():
            text = learner().float().cpu().numpy()
        self.ctx_ = learner.ctx.detach().float().cpu().numpy()
        self.weights_ = np.ascontiguousarray(text.T, dtype=np.float32)
        self.logit_scale_ = float(learner.logit_scale)
        self.classes_ = np.arange(len(self.class_names))
        self.n_features_in_ = X.shape[1]
        self.epochs_ = int(epochs)
        self.text_positions_ = int(learner.length or learner.tokens.shape[1])
        self.training_loss_ = learner.epoch_losses()
        self.val_accuracy_ = (accuracy(self.logits(validation[0]), validation[1]) if validation is not None
                              else None)
        self.history_ = [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # deterministic state
        return self

    def with_classes(self, class_names: Sequence[str]) -> CoOp:
        """A fitted CoOp scoring ``class_names`` with the learned context (base-to-new: the context learned on the
        base classes, the prompts of the new ones); fit facts (losses, history) are the original fit's."""
        check_is_fitted(self)
        head = self._fitted_copy(class_names)
        learner = head.build_learner()
        if tuple(learner.ctx.shape) != self.ctx_.shape:
            raise CliplabError(f"CoOp: the learned context {self.ctx_.shape} does not fit the prompts of the new "
                               f"classes {tuple(learner.ctx.shape)}")
        with torch.no_grad():
            learner.ctx.copy_(torch.from_numpy(self.ctx_))
            text = learner().float().cpu().numpy()
        head.weights_ = np.ascontiguousarray(text.T, dtype=np.float32)
        head.classes_ = np.arange(len(head.class_names))
        head.text_positions_ = int(learner.length or learner.tokens.shape[1])
        return head

    # ------------------------------------------------------------------ prediction

    def logits(self, X) -> np.ndarray:
        """``logit_scale_ * X @ weights_`` (n, C)."""
        X = self._checked(X)
        return self.logit_scale_ * (X @ self.weights_)

    def fit_summary(self) -> dict:
        return {"n_ctx": int(len(self.ctx_)), "ctx_init": self.ctx_init, "epochs": self.epochs_,
                "final_loss": self.training_loss_[-1] if self.training_loss_ else None,
                "val_accuracy": self.val_accuracy_}
