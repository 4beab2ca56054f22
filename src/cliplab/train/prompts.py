"""Prompt learning through the frozen text tower: what CoOp (``heads/coop.py``) and CoCoOp (``heads/cocoop.py``) share.

- ``context_tokens``/``init_tokens``/``initial_context``: the prompt ``"X .. X {class}."`` with the context slots
  placed by the model's tokenizer, and the context's start (the embedding of ``ctx_init``, random N(0, 0.02^2)
  vectors in front of it where ``n_ctx`` is longer).
- ``PromptLearner``: the learnable context ``ctx`` (M, width) between the fixed start token and ``"{class}."``;
  ``text_features(bias)`` runs the text tower on the C class prompts, or, with a per-image bias (B, width) added to
  every context token (CoCoOp's meta-network output), on all B x C prompts in one pass.
- ``PromptObjective`` (``"coop"``): cross-entropy of ``module.logits(features)``, recording each epoch's summed
  loss in the module's persistent buffers, so a resumed run reports the losses of the epochs it did not run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CliplabError, UnsupportedOperationError
from ..models.backbone import Backbone
from .engine import TrainSettings, register_objective, run_training

RANDOM_CONTEXT = 16  # the authors' N_CTX without an init (CoOp's ``train.py``: TRAINER.COOP.N_CTX = 16)
INIT_STD = 0.02  # random context vectors: N(0, 0.02^2), as ``nn.init.normal_(ctx_vectors, std=0.02)``
MAX_TOKENS = 1 << 17  # prompts x positions per text-tower pass when scoring many images (CoCoOp's prediction)


class PromptLearner(torch.nn.Module):
    """The learnable context and the fixed token embeddings around it, CoOp's unified context with the class
    token at the end: row c of the text tower's input is ``[prefix_c, ctx_1..ctx_M, suffix_c]`` where the
    prefix is the start token and the suffix the embedded ``"{class name}."``, end-of-text token and padding.

    ``text_features()`` gives the L2-normalised class text features (C, d), with autograd to the trainable
    parameters only; ``text_features(bias)`` with ``bias`` (B, width) adds ``bias[b]`` to every context token and
    gives (B, C, d), the B x C prompts run through the tower as one batch. ``logits(features)`` (B, C) is
    ``logit_scale * f_b . t_c`` (CoOp) or, where a subclass conditions the context on the image, ``f_b . t_{b,c}``.
    The Backbone is a plain attribute, not a submodule: its frozen weights are neither trained nor checkpointed
    (only the trainable parameters and the persistent loss buffers are: the token tensors are non-persistent).

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

    @property
    def n_classes(self) -> int:
        return int(self.prefix.shape[0])

    def track_losses(self, epochs: int) -> None:
        """Persistent per-epoch loss sums and step counts (checkpointed with the parameters)."""
        self.register_buffer("loss_sum", torch.zeros(max(epochs, 1), dtype=torch.float64, device=self.ctx.device))
        self.register_buffer("loss_steps", torch.zeros(max(epochs, 1), dtype=torch.int64, device=self.ctx.device))

    def epoch_losses(self) -> list[float]:
        """Mean step loss of each epoch run (empty before ``track_losses``)."""
        if not hasattr(self, "loss_sum"):
            return []
        steps = self.loss_steps.cpu().numpy()
        return [float(s / n) for s, n in zip(self.loss_sum.cpu().numpy(), steps) if n > 0]

    def prompts(self, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The text tower's input embeddings: (C, L, width), or (B * C, L, width) with a bias (B, width), image b's
        prompts in rows b*C .. b*C + C - 1."""
        n = self.n_classes
        ctx = self.ctx[None]  # (1, M, width)
        if bias is not None:
            ctx = ctx + bias[:, None, :].to(ctx.dtype)  # (B, M, width): the bias shifts every context token
        images = ctx.shape[0]
        ctx = ctx[:, None].expand(-1, n, -1, -1).reshape(images * n, *self.ctx.shape)
        prefix, suffix = self.prefix.repeat(images, 1, 1), self.suffix.repeat(images, 1, 1)
        return torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)

    def text_features(self, bias: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised text features: (C, d), or (B, C, d) with a bias (B, width)."""
        embeddings = self.prompts(bias)
        tokens = self.tokens if bias is None else self.tokens.repeat(bias.shape[0], 1)
        if self.length is None:
            text = self.backbone.forward_text_embeddings(embeddings, tokens)
        else:
            text = F.normalize(run_short(self.backbone.text_tower(), embeddings, tokens, self.length), dim=-1)
        return text if bias is None else text.reshape(bias.shape[0], self.n_classes, -1)

    def forward(self) -> torch.Tensor:
        return self.text_features()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``logit_scale * features @ text.T`` (B, C) for L2-normalised image features (B, d)."""
        text = self.text_features()
        return self.logit_scale * (features.to(text.dtype) @ text.T)


def run_short(tower, embeddings: torch.Tensor, tokens: torch.Tensor, length: int) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------- prompts


def context_tokens(backbone: Backbone, class_names: Sequence[str], n_ctx: int, who: str) -> tuple[torch.Tensor, int]:
    """Token ids (C, L) of ``"X .. X {c}."`` (``n_ctx`` X's) and the position of the first context slot.

    The slots are where these ids differ from those of ``"Y .. Y {c}."``: they must be the same ``n_ctx``
    consecutive positions in every row, else the tokenizer does not give one token per slot. ``who`` names the
    method in errors."""
    names = [str(name) for name in class_names]
    texts = {p: [" ".join([p] * n_ctx) + " " + name + "." for name in names] for p in "XY"}
    lengths = backbone.text_lengths(texts["X"])
    if lengths is not None and max(lengths) > backbone.context_length:
        longest = int(np.argmax(lengths))
        raise CliplabError(f"{who}: the prompt of class {names[longest]!r} has {lengths[longest]} tokens with "
                           f"{n_ctx} context tokens, over the model's {backbone.context_length}")
    tokens_x, tokens_y = backbone.tokenize(texts["X"]), backbone.tokenize(texts["Y"])
    differ = tokens_x != tokens_y
    columns = torch.nonzero(differ.any(dim=0)).flatten()
    if (len(columns) != n_ctx or int(columns[-1] - columns[0]) != n_ctx - 1
            or not bool((differ == differ[0:1]).all())):
        raise UnsupportedOperationError(f"{who}: {backbone.info.name}'s tokenizer does not give one token per "
                                        "context word, so the context slots cannot be placed")
    return tokens_x, int(columns[0])


def init_tokens(backbone: Backbone, ctx_init: str, start: int, who: str) -> torch.Tensor:
    """Token ids of ``ctx_init`` alone: the k ids after the ``start`` leading ones such that the rest of its
    tokenization is that of the empty text (start, end-of-text and padding)."""
    full, empty = backbone.tokenize([ctx_init, ""])
    length = len(full)
    if torch.equal(full[:start], empty[:start]):
        for k in range(length - start):
            if torch.equal(full[start + k:], empty[start:length - k]):
                return full[start:start + k]
    raise UnsupportedOperationError(f"{who}: cannot find the tokens of ctx_init {ctx_init!r} in "
                                    f"{backbone.info.name}'s tokenization")


def initial_context(backbone: Backbone, class_names: Sequence[str], n_ctx: int | None, ctx_init: str | None,
                    random_state: int, who: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(ctx (M, width) float32, tokens (C, L), their embeddings (C, L, width), first context slot) on the
    backbone's device: the context starts as the embedding of ``ctx_init`` (M = its token count when ``n_ctx`` is
    None), with ``n_ctx - len(init)`` random N(0, 0.02^2) vectors (seeded by ``random_state``) in front of it."""
    if ctx_init is not None and not isinstance(ctx_init, str):
        raise CliplabError(f"{who}: ctx_init must be words or None, got {ctx_init!r}")
    init_ids = None
    if ctx_init:
        _, start = context_tokens(backbone, class_names, 1, who)
        init_ids = init_tokens(backbone, ctx_init, start, who)
        if len(init_ids) == 0:
            raise CliplabError(f"{who}: ctx_init {ctx_init!r} has no tokens")
    n_init = 0 if init_ids is None else len(init_ids)
    n_ctx = int(n_ctx) if n_ctx is not None else (n_init or RANDOM_CONTEXT)
    if n_ctx < n_init:
        raise CliplabError(f"{who}: n_ctx={n_ctx} is shorter than ctx_init {ctx_init!r} ({n_init} tokens)")
    tokens, start = context_tokens(backbone, class_names, n_ctx, who)
    tokens = tokens.to(backbone.device)
    with torch.no_grad():
        embedded = backbone.token_embeddings(tokens)
        width = embedded.shape[-1]
        generator = torch.Generator().manual_seed(int(random_state))
        parts = [torch.randn(n_ctx - n_init, width, generator=generator, dtype=torch.float32) * INIT_STD]
        if init_ids is not None:
            parts.append(backbone.token_embeddings(init_ids[None].to(backbone.device))[0].float().cpu())
        ctx = torch.cat(parts).to(embedded.device)
    return ctx, tokens, embedded, start


# ---------------------------------------------------------------------------------------------- training


class LazyBatches:
    """One epoch's batches, each made from its rows as it is read (``len`` without making any): image batches
    are decoded one at a time instead of all before the epoch."""

    def __init__(self, rows: list, make):
        self.rows, self.make = rows, make

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return (self.make(r) for r in self.rows)


def epoch_batches(samples: np.ndarray, y: np.ndarray, batch_size: int, random_state: int):
    """``data(epoch)`` for the training loop over ``samples`` (V, n, d) and labels ``y``: that epoch's batches (one
    view drawn per item), seeded by (random_state, epoch); Dassl's ``drop_last`` when the set holds a full batch.
    Each batch carries its ``epoch`` (the objective's loss bookkeeping)."""
    n_views, n = samples.shape[:2]
    batch = int(batch_size)
    stop = n - n % batch if n >= batch else n
    labels = torch.from_numpy(y.astype(np.int64))

    def data(epoch: int) -> list[dict]:
        rng = np.random.default_rng([int(random_state), int(epoch)])
        order = rng.permutation(n)
        view = rng.integers(0, n_views, size=n)
        return [{"features": torch.from_numpy(np.ascontiguousarray(samples[view[rows], rows])),
                 "labels": labels[rows], "epoch": int(epoch)}
                for rows in (order[s:s + batch] for s in range(0, stop, batch))]

    return data


@register_objective("coop")
class PromptObjective:
    """Cross-entropy of ``module.logits(features)`` (the batch mean, as the authors' ``F.cross_entropy``) for a
    batch ``{"features": (b, d) L2-normalised image features, "labels": (b,) class indices, "epoch": e}``. Weight
    decay applies to every trainable parameter, as Dassl's SGD on the prompt learner's parameters. With an
    ``epoch`` and the module's loss buffers (``PromptLearner.track_losses``) each step's loss is added there."""

    def __call__(self, module: PromptLearner, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = module.logits(batch["features"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels)
        epoch = batch.get("epoch")
        if epoch is not None and hasattr(module, "loss_sum"):
            with torch.no_grad():
                module.loss_sum[int(epoch)] += float(loss.detach())
                module.loss_steps[int(epoch)] += 1
        return loss, {"acc": float((logits.argmax(dim=1) == labels).float().mean())}

    def param_groups(self, module: torch.nn.Module, weight_decay: float) -> list[dict]:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": weight_decay}]


def data_digest(samples: np.ndarray, y: np.ndarray) -> str:
    """A digest of the training arrays (part of a checkpoint's identity: another training set never resumes it)."""
    h = hashlib.sha256()
    for array in (np.ascontiguousarray(samples, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64)):
        h.update(str(array.shape).encode())
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches an epoch of ``n`` items gives (``epoch_batches``: Dassl's drop_last when a full batch exists)."""
    return n // batch_size if n >= batch_size else 1


def train_prompts(learner: PromptLearner, data, settings: TrainSettings, epochs: int,
                  validation: tuple[np.ndarray, np.ndarray] | None = None,
                  objective: PromptObjective | None = None) -> list[dict]:
    """Train ``learner``'s parameters for ``epochs`` epochs through the one loop (nothing for 0), the backbone's
    weights frozen whatever it allowed (its flags given back); ``validation`` (features, class indices) is scored
    after each evaluation. Per-epoch losses go to the learner's buffers; returns the loop's history."""
    learner.track_losses(epochs)
    if epochs <= 0:
        return []
    model = learner.backbone.model
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)  # only the prompt learner trains
    try:
        evaluate = None
        if validation is not None:
            features = torch.from_numpy(np.array(validation[0], dtype=np.float32))
            labels = np.asarray(validation[1])

            def evaluate() -> dict:
                scores = learner.logits(features.to(learner.ctx.device)).float().cpu().numpy()
                return {"val_acc": float(np.mean(np.argmax(scores, axis=1) == labels)) if len(labels) else 0.0}

        result = run_training(learner, objective or PromptObjective(), data, settings, evaluate=evaluate)
        return result.history
    finally:
        for param, flag in frozen:
            param.requires_grad_(flag)


CHECKPOINT_SECONDS = 60.0  # with checkpoint_dir: also a checkpoint a minute within long epochs


class PromptTrainingMixin:
    """What the prompt heads share: parameter checks, the epochs' batches and the one loop's settings, read from the
    head's ``n_ctx``, ``max_epoch``, ``lr``, ``momentum``, ``weight_decay``, ``warmup_epochs``, ``warmup_lr``,
    ``batch_size``, ``random_state``, ``ctx_init``, ``checkpoint_dir``, ``progress`` and ``backbone``."""

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

    def epoch_data(self, samples: np.ndarray, y: np.ndarray):
        """``data(epoch)`` for the training loop over ``samples`` (V, n, d) and labels ``y``: that epoch's batches
        (one view drawn per item), seeded by (random_state, epoch)."""
        return epoch_batches(samples, y, int(self.batch_size), int(self.random_state))

    def train_settings(self, epochs: int, samples: np.ndarray | None = None, y: np.ndarray | None = None
                       ) -> TrainSettings:
        """The one training loop's settings for ``epochs`` epochs: the authors' SGD, constant warm-up and cosine;
        with ``checkpoint_dir``, a checkpoint after every epoch (and every minute) whose identity includes the
        training data (``samples``, ``y``), so a killed fit given the same data resumes to the same numbers."""
        every = steps_per_epoch(samples.shape[1], int(self.batch_size)) if samples is not None else 0
        identity = self._identity(epochs)
        if samples is not None and y is not None:
            identity["data"] = data_digest(samples, y)
        checkpoint = self.checkpoint_dir is not None
        return TrainSettings(
            epochs=max(int(epochs), 1), lr=float(self.lr), optimizer="sgd", momentum=float(self.momentum),
            weight_decay=float(self.weight_decay), warmup="constant", warmup_steps=int(self.warmup_epochs),
            warmup_lr=float(self.warmup_lr), schedule="cosine", seed=int(self.random_state),
            device=str(self.backbone.device), progress=bool(self.progress), eval_every=1 if self.progress else 0,
            checkpoint_dir=self.checkpoint_dir, checkpoint_every=every if checkpoint else 0,
            checkpoint_seconds=CHECKPOINT_SECONDS if checkpoint else 0.0,
            desc=self._method(), identity=json.dumps(identity, sort_keys=True))

    def _method(self) -> str:
        return getattr(self, "_registered_name", type(self).__name__.lower())

    def _identity(self, epochs: int) -> dict:
        """The result-deciding options a resumed checkpoint must share (the loop's settings aside)."""
        return {"method": self._method(), "n_ctx": self.n_ctx, "ctx_init": self.ctx_init, "epochs": epochs,
                "batch_size": int(self.batch_size), "classes": [str(c) for c in self.class_names],
                "model_id": self.backbone.model_id, "truncate": bool(getattr(self, "truncate", True)),
                "logit_scale": self.logit_scale}
