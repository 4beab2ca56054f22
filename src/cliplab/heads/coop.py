"""CoOp: context optimisation, learned prompt context for CLIP's text tower (paper 50, Zhou et al., IJCV 2022)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.multiclass import check_classification_targets

from ..errors import CliplabError, DimensionMismatchError, UnsupportedOperationError
from ..models.backbone import Backbone
from ..train.engine import TrainSettings, register_objective, run_training
from .base import FEWSHOT_SKIPS, ClipHead, ZeroShotLogitsMixin, accuracy
from .registry import register

RANDOM_CONTEXT = 16  # the authors' N_CTX without an init (``train.py``: TRAINER.COOP.N_CTX = 16)
INIT_STD = 0.02  # random context vectors: N(0, 0.02^2), as ``nn.init.normal_(ctx_vectors, std=0.02)``


def authors_epochs(shots: int) -> int:
    """MAX_EPOCH of the authors' few-shot configs (COOP.md, ``scripts/coop/main.sh``): 1 shot ``*_ep50``,
    2 and 4 shots ``*_ep100``, 8 and 16 shots the 200-epoch configs."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


class PromptLearner(torch.nn.Module):
    """The learnable context and the fixed token embeddings around it, CoOp's unified context with the class
    token at the end: row c of the text tower's input is ``[prefix_c, ctx_1..ctx_M, suffix_c]`` where the
    prefix is the start token and the suffix the embedded ``"{class name}."``, end-of-text token and padding.

    ``forward()`` gives the L2-normalised class text features (C, d), with autograd to ``ctx`` only. The
    Backbone is a plain attribute, not a submodule: its frozen weights are neither trained nor checkpointed
    (only ``ctx`` is: the other tensors are non-persistent buffers).

    ``length``: where the text tower's attention is causal (CLIP's), the outputs at the pooled end-of-text
    positions do not depend on the padding after them, so the tower runs on the first ``length`` positions
    only (block by block, ``Backbone.text_tower()``); None runs all ``context_length`` positions
    (``Backbone.forward_text_embeddings``). Both give the same features (tested).
    """

    def __init__(self, backbone: Backbone, ctx: torch.Tensor, prefix: torch.Tensor, suffix: torch.Tensor,
                 tokens: torch.Tensor, logit_scale: float, length: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.logit_scale = float(logit_scale)
        self.length = length
        self.ctx = torch.nn.Parameter(ctx.detach().clone().float())
        self.register_buffer("prefix", prefix.detach().clone(), persistent=False)
        self.register_buffer("suffix", suffix.detach().clone(), persistent=False)
        self.register_buffer("tokens", tokens.detach().clone(), persistent=False)

    def prompts(self) -> torch.Tensor:
        """The text tower's input embeddings (C, L, width)."""
        ctx = self.ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        return torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)

    def forward(self) -> torch.Tensor:
        if self.length is None:
            return self.backbone.forward_text_embeddings(self.prompts(), self.tokens)
        return F.normalize(_run_short(self.backbone.text_tower(), self.prompts(), self.tokens, self.length), dim=-1)


def _run_short(tower, embeddings: torch.Tensor, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Unnormalised text features from the first ``length`` positions of ``embeddings``/``tokens``."""
    x, state = tower.begin(tokens[:, :length], None, embeddings[:, :length])
    if state.mask is not None and state.mask.shape[-1] > length:  # a mask built for the whole context
        state.mask = state.mask[..., :length, :length]
    for j in range(tower.depth):
        x = tower.block(j, x, state)
    return tower.end(x, state)


def causal_length(backbone: Backbone, embeddings: torch.Tensor, tokens: torch.Tensor) -> int | None:
    """The positions the text tower needs for ``tokens`` (C, L): up to the last pooled position, where no
    earlier position attends to a later one (an additive mask of -inf there: CLIP's causal mask); None where
    that cannot be seen (no block-by-block tower, no such mask, pooling not at a position) or nothing is saved."""
    try:
        if backbone.attached_prompts("text"):
            return None  # prompts attached to the backbone: only its own forward inserts them
        tower = backbone.text_tower()
        _, state = tower.begin(tokens, None, embeddings)
    except (AttributeError, CliplabError, NotImplementedError):
        return None
    if state.pooled is None or state.count or not isinstance(state.mask, torch.Tensor):
        return None
    length = int(state.pooled.max()) + 1
    if length >= tokens.shape[1] or not state.mask.is_floating_point():
        return None
    if not bool(torch.isneginf(state.mask[..., :length, length:]).all()):
        return None
    return length


@register_objective("coop")
class CoOpObjective:
    """CoOp's loss: cross-entropy of ``logit_scale * f @ t_c`` over the class text features t of the current
    context, for a batch ``{"features": (b, d) L2-normalised image features, "labels": (b,) class indices}``.
    Weight decay applies to the context, as Dassl's SGD on the prompt learner's parameters."""

    def __call__(self, module: PromptLearner, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        text = module()
        logits = module.logit_scale * (batch["features"].to(text.dtype) @ text.T)
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels)
        return loss, {"acc": float((logits.argmax(dim=1) == labels).float().mean())}

    def param_groups(self, module: torch.nn.Module, weight_decay: float) -> list[dict]:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": weight_decay}]


@register("coop", family="encoder", paper=50, needs_train=True, needs=("val", "views"), gives=("class_weights",))
class CoOp(ZeroShotLogitsMixin, ClipHead):
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
        self.progress = progress

    # ------------------------------------------------------------------ parameters

    def _check_params(self) -> None:
        name = type(self).__name__
        for key, low in (("n_ctx", 1), ("max_epoch", 0), ("warmup_epochs", 0), ("batch_size", 1)):
            value = getattr(self, key)
            if value is None and key in ("n_ctx", "max_epoch"):
                continue
            if isinstance(value, bool) or int(value) != value or value < low:
                raise CliplabError(f"{name}: {key} must be an integer >= {low}, got {value!r}")
        for key in ("lr", "momentum", "weight_decay", "warmup_lr"):
            value = float(getattr(self, key))
            if not np.isfinite(value) or value < 0 or (key == "lr" and value == 0):
                raise CliplabError(f"{name}: {key} must be finite and {'> 0' if key == 'lr' else '>= 0'}")
        if self.ctx_init is not None and not isinstance(self.ctx_init, str):
            raise CliplabError(f"{name}: ctx_init must be words or None, got {self.ctx_init!r}")

    def epochs_for(self, y: np.ndarray) -> int:
        """``max_epoch``, or the authors' few-shot choice by the shots per class of ``y``."""
        if self.max_epoch is not None:
            return int(self.max_epoch)
        return authors_epochs(int(np.bincount(np.asarray(y, dtype=np.int64)).max(initial=1)))

    # ------------------------------------------------------------------ prompts

    def _context_start(self, n_ctx: int) -> tuple[torch.Tensor, int]:
        """Token ids (C, L) of ``"X .. X {c}."`` (``n_ctx`` X's) and the position of the first context slot.

        The slots are where these ids differ from those of ``"Y .. Y {c}."``: they must be the same
        ``n_ctx`` consecutive positions in every row, else the tokenizer does not give one token per slot.
        """
        backbone = self.backbone
        names = [str(name) for name in self.class_names]
        texts = {p: [" ".join([p] * n_ctx) + " " + name + "." for name in names] for p in "XY"}
        lengths = backbone.text_lengths(texts["X"])
        if lengths is not None and max(lengths) > backbone.context_length:
            longest = int(np.argmax(lengths))
            raise CliplabError(f"CoOp: the prompt of class {names[longest]!r} has {lengths[longest]} tokens with "
                               f"{n_ctx} context tokens, over the model's {backbone.context_length}")
        tokens_x, tokens_y = backbone.tokenize(texts["X"]), backbone.tokenize(texts["Y"])
        differ = tokens_x != tokens_y
        columns = torch.nonzero(differ.any(dim=0)).flatten()
        if (len(columns) != n_ctx or int(columns[-1] - columns[0]) != n_ctx - 1
                or not bool((differ == differ[0:1]).all())):
            raise UnsupportedOperationError(f"CoOp: {backbone.info.name}'s tokenizer does not give one token per "
                                            "context word, so the context slots cannot be placed")
        return tokens_x, int(columns[0])

    def _init_tokens(self, start: int) -> torch.Tensor:
        """Token ids of ``ctx_init`` alone: the k ids after the ``start`` leading ones such that the rest of its
        tokenization is that of the empty text (start, end-of-text and padding)."""
        backbone = self.backbone
        full, empty = backbone.tokenize([self.ctx_init, ""])
        length = len(full)
        if torch.equal(full[:start], empty[:start]):
            for k in range(length - start):
                if torch.equal(full[start + k:], empty[start:length - k]):
                    return full[start:start + k]
        raise UnsupportedOperationError(f"CoOp: cannot find the tokens of ctx_init {self.ctx_init!r} in "
                                        f"{backbone.info.name}'s tokenization")

    def build_learner(self) -> PromptLearner:
        """The prompt learner at its initial context (seeded by ``random_state`` where part of it is random)."""
        self._check_params()
        backbone = self.backbone
        init_ids = None
        if self.ctx_init:
            _, start = self._context_start(1)
            init_ids = self._init_tokens(start)
            if len(init_ids) == 0:
                raise CliplabError(f"CoOp: ctx_init {self.ctx_init!r} has no tokens")
        n_init = 0 if init_ids is None else len(init_ids)
        n_ctx = int(self.n_ctx) if self.n_ctx is not None else (n_init or RANDOM_CONTEXT)
        if n_ctx < n_init:
            raise CliplabError(f"CoOp: n_ctx={n_ctx} is shorter than ctx_init {self.ctx_init!r} ({n_init} tokens)")
        tokens, start = self._context_start(n_ctx)
        tokens = tokens.to(backbone.device)
        with torch.no_grad():
            embedded = backbone.token_embeddings(tokens)
            width = embedded.shape[-1]
            generator = torch.Generator().manual_seed(int(self.random_state))
            parts = [torch.randn(n_ctx - n_init, width, generator=generator, dtype=torch.float32) * INIT_STD]
            if init_ids is not None:
                parts.append(backbone.token_embeddings(init_ids[None])[0].float().cpu())
            ctx = torch.cat(parts).to(embedded.device)
        scale = self.logit_scale if self.logit_scale is not None else backbone.logit_scale
        length = causal_length(backbone, embedded, tokens) if self.truncate else None
        learner = PromptLearner(backbone, ctx, embedded[:, :start], embedded[:, start + n_ctx:], tokens, scale, length)
        return learner.to(backbone.device)

    # ------------------------------------------------------------------ fitting

    def epoch_data(self, samples: np.ndarray, y: np.ndarray):
        """``data(epoch)`` for the training loop over ``samples`` (V, n, d) and labels ``y``: that epoch's batches
        (one view drawn per item), seeded by (random_state, epoch)."""
        n_views, n = samples.shape[:2]
        batch = int(self.batch_size)
        stop = n - n % batch if n >= batch else n  # Dassl: drop_last when the set holds a full batch
        labels = torch.from_numpy(y.astype(np.int64))

        def data(epoch: int) -> list[dict]:
            rng = np.random.default_rng([int(self.random_state), int(epoch)])
            order = rng.permutation(n)
            view = rng.integers(0, n_views, size=n)
            return [{"features": torch.from_numpy(np.ascontiguousarray(samples[view[rows], rows])),
                     "labels": labels[rows]} for rows in (order[s:s + batch] for s in range(0, stop, batch))]

        return data

    def fit(self, X, y, X_val=None, y_val=None, views=None):
        """Learn the context on the training features (``views`` if given, see the class docstring)."""
        self._check_params()
        X, y = self._validate(X, y, reset=True)
        check_classification_targets(y)
        y = self._check_labels(y)
        backbone = self.backbone
        if X.shape[1] != backbone.embed_dim:
            raise DimensionMismatchError(f"CoOp: features have width {X.shape[1]} but {backbone.info.name}'s "
                                         f"embeddings are {backbone.embed_dim}-d (features from another model?)")
        samples = self._checked_views(views, X) if views is not None else X[None]
        validation = self._validation_set(X_val, y_val) if X_val is not None else None
        epochs = self.epochs_for(y)
        learner = self.build_learner()
        frozen = [(p, p.requires_grad) for p in backbone.model.parameters()]
        backbone.model.requires_grad_(False)  # only the context trains, whatever the backbone allowed
        try:
            losses, history = [], []
            if epochs > 0:
                evaluate = None
                if validation is not None:
                    features = torch.from_numpy(np.array(validation[0], dtype=np.float32))
                    evaluate = lambda: {"val_acc": self._accuracy(learner, features, validation[1])}  # noqa: E731
                result = run_training(learner, _Recording(CoOpObjective(), losses), self.epoch_data(samples, y),
                                      self.train_settings(epochs), evaluate=evaluate)
                history = result.history
            with torch.no_grad():
                text = learner().float().cpu().numpy()
        finally:
            for param, flag in frozen:
                param.requires_grad_(flag)
        self.ctx_ = learner.ctx.detach().float().cpu().numpy()
        self.weights_ = np.ascontiguousarray(text.T, dtype=np.float32)
        self.logit_scale_ = float(learner.logit_scale)
        self.classes_ = np.arange(len(self.class_names))
        self.n_features_in_ = X.shape[1]
        self.epochs_ = int(epochs)
        self.text_positions_ = int(learner.length or learner.tokens.shape[1])
        self.training_loss_ = _epoch_means(losses, epochs)
        self.val_accuracy_ = (accuracy(self.logits(validation[0]), validation[1]) if validation is not None
                              else None)
        self.history_ = [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # deterministic state
        return self

    def train_settings(self, epochs: int) -> TrainSettings:
        """The one training loop's settings for ``epochs`` epochs: the authors' SGD, constant warm-up and cosine."""
        return TrainSettings(
            epochs=epochs, lr=float(self.lr), optimizer="sgd", momentum=float(self.momentum),
            weight_decay=float(self.weight_decay), warmup="constant", warmup_steps=int(self.warmup_epochs),
            warmup_lr=float(self.warmup_lr), schedule="cosine", seed=int(self.random_state),
            device=str(self.backbone.device), progress=bool(self.progress), eval_every=1 if self.progress else 0,
            desc="coop", identity=json.dumps(self._identity(epochs), sort_keys=True))

    def _identity(self, epochs: int) -> dict:
        return {"method": "coop", "n_ctx": self.n_ctx, "ctx_init": self.ctx_init, "epochs": epochs,
                "batch_size": int(self.batch_size), "classes": [str(c) for c in self.class_names],
                "model_id": self.backbone.model_id}

    @staticmethod
    def _accuracy(learner: PromptLearner, features: torch.Tensor, y: np.ndarray) -> float:
        text = learner().float()
        return accuracy((features.to(text.device) @ text.T).cpu().numpy(), y)

    # ------------------------------------------------------------------ prediction

    def logits(self, X) -> np.ndarray:
        """``logit_scale_ * X @ weights_`` (n, C)."""
        X = self._checked(X)
        return self.logit_scale_ * (X @ self.weights_)

    def fit_summary(self) -> dict:
        return {"n_ctx": int(len(self.ctx_)), "ctx_init": self.ctx_init, "epochs": self.epochs_,
                "final_loss": self.training_loss_[-1] if self.training_loss_ else None,
                "val_accuracy": self.val_accuracy_}


class _Recording:
    """An objective that records each step's (epoch-free) loss in ``losses``; otherwise the wrapped one."""

    def __init__(self, objective: CoOpObjective, losses: list):
        self.objective, self.losses = objective, losses

    def __call__(self, module, batch):
        loss, logs = self.objective(module, batch)
        self.losses.append(float(loss.detach()))
        return loss, logs

    def param_groups(self, module, weight_decay):
        return self.objective.param_groups(module, weight_decay)


def _epoch_means(losses: list[float], epochs: int) -> list[float]:
    """Mean step loss per epoch (each epoch has the same number of steps)."""
    if not losses or epochs <= 0:
        return []
    per = len(losses) // epochs
    return [float(np.mean(losses[e * per:(e + 1) * per])) for e in range(epochs)]
