"""OSLoPrompt: prompts distilled from attribute cross-attention, and an "unknown" prompt that rejects (paper 39)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted

from ..errors import CliplabError, DatasetError, DimensionMismatchError, FeatureError
from ..models.backbone import Backbone
from ..train.engine import register_objective
from ..train.prompts import (
    PromptLearner,
    PromptTrainingMixin,
    causal_length,
    data_digest,
    initial_context,
    run_short,
    train_prompts,
)
from .base import FEWSHOT_SKIPS, ClipHead, ZeroShotLogitsMixin, accuracy
from .registry import register

#: Attribute phrases per class when no description set is given (four, as the authors' files hold per class).
DEFAULT_ATTRIBUTES = ("the shape of a {c}", "the colour of a {c}", "the texture of a {c}", "the parts of a {c}")
ATTRIBUTE_TEMPLATE = "{c}"  # description sets: "{class}, which has {descriptor}" (data.prompts.descriptor_sentence)


def loose(name: str) -> str:
    """A class name compared loosely (case, underscores and repeated spaces ignored)."""
    return " ".join(str(name).replace("_", " ").lower().split())


def encode_prompts(backbone: Backbone, embeddings: torch.Tensor, tokens: torch.Tensor,
                   length: int | None) -> torch.Tensor:
    """L2-normalised text features of token embeddings (n, L, width) with their token ids (n, L), through the first
    ``length`` positions where the tower is causal (``train.prompts.causal_length``), else the whole forward."""
    if length is None:
        return backbone.forward_text_embeddings(embeddings, tokens)
    return F.normalize(run_short(backbone.text_tower(), embeddings, tokens, length), dim=-1)


class CrossAttention(torch.nn.Module):
    """The authors' ``CrossAttention`` (``trainer/ours.py``): self-attention (1 head) over each class's attribute
    embeddings with their padding mask, residual + LayerNorm; then the image features (queries) attend over them
    (``heads`` heads), residual + LayerNorm; then ``LayerNorm(out_proj(o) + o)``. Dropout on the attention weights.
    Shapes: queries (K, B, d), attributes (K, A, d), mask (K, A) True = padding; output (K, B, d)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.self_attn = torch.nn.MultiheadAttention(dim, 1, batch_first=True, dropout=dropout)
        self.multihead_attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True, dropout=dropout)
        self.out_proj = torch.nn.Linear(dim, dim)
        self.layer_norm = torch.nn.LayerNorm(dim)
        self.layer_norm1 = torch.nn.LayerNorm(dim)
        self.layer_norm2 = torch.nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, attributes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended, _ = self.self_attn(attributes, attributes, attributes, key_padding_mask=mask)
        attended = self.layer_norm(attended + attributes)
        out, _ = self.multihead_attn(queries, attended, attended, key_padding_mask=mask)
        out = self.layer_norm1(out + queries)
        return self.layer_norm2(self.out_proj(out) + out)


class OpenSetPrompts(PromptLearner):
    """CoOp's learner over the K known classes and, with pseudo-open samples, one more row: the "unknown" class
    (``text_features()`` (K or K + 1, d)); with ``attribute`` the cross-attention branch (``attribute_text``):
    per image and known class, the fixed attribute prompt ``"[SOS] a photo of a {class}."`` with the cross-attention
    output (image features attending over the class's projected attribute embeddings) added to each of its context
    tokens. The Backbone stays a plain attribute (frozen, never checkpointed); fixed tensors are non-persistent."""

    def __init__(self, backbone: Backbone, ctx, prefix, suffix, tokens, logit_scale: float, length: int | None,
                 n_known: int, attribute: dict | None = None):
        super().__init__(backbone, ctx, prefix, suffix, tokens, logit_scale, length)
        self.n_known = int(n_known)
        self.cross = None
        if attribute is None:
            return
        dim, width = int(backbone.embed_dim), int(ctx.shape[1])
        for name in ("attr_ctx", "attr_prefix", "attr_suffix", "attr_tokens", "attributes", "attribute_mask"):
            self.register_buffer(name, attribute[name].detach().clone(), persistent=False)
        self.attr_length = attribute["length"]
        with torch.random.fork_rng(devices=[]):  # PyTorch's default initialisations, seeded by the head
            torch.manual_seed(int(attribute["seed"]))
            self.projector = torch.nn.Linear(dim, dim)
            self.cross = CrossAttention(dim, int(attribute["heads"]), float(attribute["dropout"]))
            self.to_tokens = torch.nn.Linear(dim, width) if dim != width else None
        self.to(ctx.device)

    def attribute_text(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K, d) L2-normalised text features of the attribute-conditioned prompts of each image and known class."""
        n_images, k = features.shape[0], self.n_known
        queries = features[None].expand(k, -1, -1).to(self.attr_ctx.dtype)
        out = self.cross(queries, self.projector(self.attributes), self.attribute_mask).transpose(0, 1)  # (B, K, d)
        if self.to_tokens is not None:
            out = self.to_tokens(out)
        ctx = self.attr_ctx[None, None] + out[:, :, None, :]  # (B, K, M, width): added to every context token
        embeddings = torch.cat([self.attr_prefix.repeat(n_images, 1, 1), ctx.reshape(n_images * k, *ctx.shape[2:]),
                                self.attr_suffix.repeat(n_images, 1, 1)], dim=1)
        text = encode_prompts(self.backbone, embeddings, self.attr_tokens.repeat(n_images, 1), self.attr_length)
        return text.reshape(n_images, k, -1)


@register_objective("osloprompt")
class OSLoPromptObjective:
    """OSLoPrompt's loss (``pacs.py: train_epoch``): cross-entropy of the learned prompts' logits over the known
    classes and "unknown" for the known images and the pseudo-open ones (label K) together, plus ``style_weight``
    (0.33) x cross-entropy of the attribute-conditioned logits ``s f_b . e_{b,k}`` of the known images, plus
    ``consistency_weight`` (1) x the mean over known images and classes of ``1 - cos(t_k, e_{b,k})`` (the learned
    prompt's text feature against the attribute-conditioned one). Batch: ``{"features" (b, d), "labels" (b,),
    "open" (u, d) optional, "epoch"}``."""

    def __init__(self, style_weight: float = 0.33, consistency_weight: float = 1.0):
        self.style_weight, self.consistency_weight = float(style_weight), float(consistency_weight)

    def __call__(self, module: OpenSetPrompts, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        features, labels = batch["features"], batch["labels"]
        text = module.text_features()
        everything, targets = features, labels
        pseudo_open = batch.get("open")
        if pseudo_open is not None and len(pseudo_open):
            everything = torch.cat([features, pseudo_open.to(features.dtype)])
            targets = torch.cat([labels, torch.full((len(pseudo_open),), module.n_known, dtype=labels.dtype)])
        logits = module.logit_scale * (everything.to(text.dtype) @ text.T)
        loss = F.cross_entropy(logits, targets)
        logs = {"acc": float((logits.argmax(dim=1) == targets).float().mean())}
        if module.cross is not None and (self.style_weight or self.consistency_weight):
            conditioned = module.attribute_text(features)  # (b, K, d)
            style = module.logit_scale * torch.einsum("bd,bkd->bk", features.to(conditioned.dtype), conditioned)
            known = text[:module.n_known]
            agreement = F.cosine_similarity(known[None].expand_as(conditioned), conditioned, dim=-1)
            loss = (loss + self.style_weight * F.cross_entropy(style, labels)
                    + self.consistency_weight * (1 - agreement).mean())
        epoch = batch.get("epoch")
        if epoch is not None and hasattr(module, "loss_sum"):
            with torch.no_grad():
                module.loss_sum[int(epoch)] += float(loss.detach())
                module.loss_steps[int(epoch)] += 1
        return loss, logs

    def param_groups(self, module: torch.nn.Module, weight_decay: float) -> list[dict]:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": weight_decay}]


@register("osloprompt", family="encoder", paper=39, needs_train=True, needs=("val", "views", "descriptions"),
          gives=("class_weights",))
class OSLoPrompt(PromptTrainingMixin, ZeroShotLogitsMixin, ClipHead):
    """OSLoPrompt: CoOp's context, taught by attribute cross-attention, plus an "unknown" prompt that rejects.

    Paper 39 in ../shared/papers.md (C et al., "OSLoPrompt: Bridging Low-Supervision Challenges and Open-Set Domain
    Generalization in CLIP", CVPR 2025), read against the authors' code, github.com/has97/Osloprompt
    (``trainer/ours.py``: ``PromptLearner``, ``CrossAttention``, ``CustomCLIP._compute_style_loss``; ``pacs.py``:
    the loss, the "unknown" class and the closed/open accuracies and their harmonic mean; ``configs/*.yaml``).

    Prompts: ``[SOS] v_1 .. v_M "{class}." [EOS]`` for the K known classes and, when pseudo-open samples are given,
    for one more class named ``unknown_name`` ("unknown", as their ``train_classnames + ['unknown']``); the context v
    (``ctx_``, init "a photo of a" as CoOp here) is shared by all rows. Logits ``logit_scale * x . t_k`` over the K+1
    rows. A sample is rejected when the unknown logit beats every known one (their test: ``argmax`` over K+1 equals
    K); ``unknown_margin(X)`` = max known logit - unknown logit is the OOD score (``cliplab.ood`` score
    "osloprompt", higher = known; rejected below 0).

    Attribute cross-attention (training only, as in their forward at test time): each known class k has attribute
    embeddings a_k (A, d) (the model's text embeddings of its attribute phrases, padded with a mask); per image x
    (features (d,)) and class k, ``c_{x,k} = CrossAttention(x, P a_k)`` (P Linear d -> d, their ``projector``;
    queries the image features, keys/values the self-attended attributes); c is added to each token of the fixed
    prompt ``"[SOS] {attribute_prompt} {class}."`` (their ``"A {domain} of a {class}"`` with ``cross_atten`` added at
    positions 1-4) and the text tower gives e_{x,k}. Loss (objective "osloprompt", their ``train_epoch``):
    ``CE(logits of known and pseudo-open images, labels with K for pseudo-open) + style_weight CE(s x . e_{x,k}, y)
    + consistency_weight mean_{x,k} (1 - cos(t_k, e_{x,k}))`` (0.33 and 1 as theirs). The cross-attention, P and
    the context train together; only the context is kept (prediction reads the learned prompts alone).

    Attributes (``descriptions``): a description set (CuPL/DCLIP JSON file or a mapping class -> phrases, the
    ``--descriptions`` of the description heads), each phrase embedded as ``"{class}, which has {phrase}"``
    (``data.prompts.descriptor_sentence``); without one, the four phrases of ``DEFAULT_ATTRIBUTES`` per class
    ("the shape of a {c}", colour, texture, parts). The authors ship fixed per-class embeddings (``attributes/
    attribute_*.npy``, (classes, 4, 512), with padding masks) whose generation is not released.

    Pseudo-open samples (the unknown prompt's training data): ``fit(..., X_open=features)``, or ``open_data`` (a
    named dataset, read from its train split, or a folder/manifest, its train split where it has one) restricted
    to ``open_classes`` (comma-separated names: held-out classes; required when the set shares a class with the
    known ones; named datasets are read under the default data root, ``CLIPLAB_DATA``), ``open_samples`` of them
    drawn (seeded; default all), embedded through the feature cache. Each batch gets ``open_per_batch`` of them
    (default: as many as a known class has on average, at least 1), drawn in a seeded order per epoch. Without
    pseudo-open samples there is no unknown prompt (``unknown_weights_`` is None) and the head is a closed-set
    classifier; ``attention=False`` and no pseudo-open samples is CoOp exactly
    (same batches, loss and steps: tested).

    Training: CoOp's loop and schedule (``train.prompts``, SGD lr 0.002, momentum 0.9, weight decay 5e-4, one
    constant warm-up epoch, cosine, batch 32, ``max_epoch=None`` CoOp's epochs by shots) on cached features and
    the protocol's views; ``X_val``/``y_val`` are only scored. ``checkpoint_dir`` resumes a killed fit bit for bit
    (the identity includes the pseudo-open features and the attention settings).

    Fitted state: ``ctx_``, ``weights_`` (d, K), ``unknown_weights_`` (d,) or None, ``logit_scale_``, ``epochs_``,
    ``training_loss_``, ``val_accuracy_`` (closed-set), ``history_``, ``text_positions_``, ``n_open_``,
    ``n_attributes_``. ``logits(X)`` are the K known logits (the contract's); ``open_logits(X)`` (n, K+1),
    ``unknown_margin(X)``, ``predict_open(X)`` (class index, -1 = rejected) read the unknown prompt.

    Departures from the authors' code, and why:

    - Pseudo-open samples: theirs are synthesised each step by Stable Diffusion from an LLM's list of related
      class names (``prompts/prompts_list_*.txt``) with a negative prompt of the known classes, filtered by
      brightness; here they are real images the user names (a folder, or held-out classes of a dataset), as the
      issue asks: no generative model runs here.
    - Text side only: their "domain- and class-generic visual prompts" (the raw context, 768-d, fed into a modified
      ViT image tower and projected to the text by ``prompt_cls``) are left out, so training runs on cached image
      features (any image tower, ResNets included); the context lives in the text width, as CoOp's.
    - One source: no domain labels; their per-domain prompts "A {domain} of a {class}" become one
      ``attribute_prompt`` ("a photo of a"), and the style CE runs over all known images at once (theirs
      concatenates the domains' logits, the same CE).
    - Optimiser and schedule: CoOp's SGD and cosine by default (theirs AdamW at 0.0017/0.001/0.001 per module,
      weight decay 1e-4, 10 epochs, gradient clipping at 1, a ReduceLROnPlateau that is never stepped), so that
      attention off is CoOp; ``optimizer="adamw"`` takes AdamW (one rate, ``lr``, for every module, with CoOp's
      warm-up and cosine); ``lr``, ``max_epoch`` and ``weight_decay`` are parameters.
    - Context: CoOp's ("a photo of a", 4 tokens) instead of their 2 free + 2 projected random tokens (N(0, 0.02)).
    - Pooling: their ``CustomCLIP.forward`` finds the end-of-text position by tokenising ``"X X X X {class}"``
      without the full stop that the embedded prompt has, so their class features are read at the "." token; here
      at the end-of-text token (CoOp's; on a random ViT-B-32 the two differ by up to 0.08 per feature component).
    - When the joint width d differs from the text width, the cross-attention output goes through one more
      Linear d -> width (``to_tokens``); their ViT-B/32 has both at 512.
    - float32; ``logit_scale`` defaults to the model's; seeded draws instead of their global seeding, so runs repeat
      bit for bit on the CPU.
    """

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
        optimizer: str = "sgd",
        attention: bool = True,
        descriptions: str | Path | Mapping[str, Sequence[str]] | None = None,
        attribute_prompt: str = "a photo of a",
        attention_heads: int = 1,
        attention_dropout: float = 0.5,
        style_weight: float = 0.33,
        consistency_weight: float = 1.0,
        open_data: str | None = None,
        open_classes: str | Sequence[str] | None = None,
        open_samples: int | None = None,
        open_per_batch: int | None = None,
        unknown_name: str = "unknown",
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
        self.optimizer = optimizer
        self.attention = attention
        self.descriptions = descriptions
        self.attribute_prompt = attribute_prompt
        self.attention_heads = attention_heads
        self.attention_dropout = attention_dropout
        self.style_weight = style_weight
        self.consistency_weight = consistency_weight
        self.open_data = open_data
        self.open_classes = open_classes
        self.open_samples = open_samples
        self.open_per_batch = open_per_batch
        self.unknown_name = unknown_name
        self.logit_scale = logit_scale
        self.random_state = random_state
        self.truncate = truncate
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress

    # ------------------------------------------------------------------ parameters

    def _check_params(self) -> None:
        super()._check_params()
        for key in ("style_weight", "consistency_weight"):
            value = float(getattr(self, key))
            if not np.isfinite(value) or value < 0:
                raise CliplabError(f"OSLoPrompt: {key} must be finite and >= 0, got {getattr(self, key)!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise CliplabError(f"OSLoPrompt: optimizer must be 'sgd' (CoOp's) or 'adamw' (the authors'), got "
                               f"{self.optimizer!r}")
        if not 0 <= float(self.attention_dropout) < 1:
            raise CliplabError(f"OSLoPrompt: attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        heads = self.attention_heads
        width = int(self.backbone.embed_dim)
        if isinstance(heads, bool) or int(heads) != heads or heads < 1 or width % int(heads):
            raise CliplabError(f"OSLoPrompt: attention_heads must be a positive divisor of the model's width {width}, "
                               f"got {heads!r}")
        for key in ("open_samples", "open_per_batch"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise CliplabError(f"OSLoPrompt: {key} must be an integer >= 1 or None, got {value!r}")
        if not isinstance(self.attribute_prompt, str) or not self.attribute_prompt.strip():
            raise CliplabError("OSLoPrompt: attribute_prompt must be words, e.g. 'a photo of a'")
        if not isinstance(self.unknown_name, str) or not loose(self.unknown_name):
            raise CliplabError(f"OSLoPrompt: unknown_name must be a word, got {self.unknown_name!r}")
        known = {loose(c) for c in self.class_names}
        if loose(self.unknown_name) in known:
            raise CliplabError(f"OSLoPrompt: unknown_name {self.unknown_name!r} is one of the known classes; pick "
                               "another")

    def epochs_for(self, y: np.ndarray) -> int:
        """``max_epoch``, or CoOp's few-shot choice by the shots per class of ``y`` (50, 100 or 200)."""
        if self.max_epoch is not None:
            return int(self.max_epoch)
        shots = int(np.bincount(np.asarray(y, dtype=np.int64)).max(initial=1))
        return 50 if shots <= 1 else 100 if shots <= 4 else 200

    def _identity(self, epochs: int) -> dict:
        return {**super()._identity(epochs), "attention": bool(self.attention),
                "attention_heads": int(self.attention_heads), "attention_dropout": float(self.attention_dropout),
                "style_weight": float(self.style_weight), "consistency_weight": float(self.consistency_weight),
                "attribute_prompt": self.attribute_prompt, "unknown_name": self.unknown_name,
                "open_per_batch": self.open_per_batch}

    # ------------------------------------------------------------------ attributes and pseudo-open samples

    def attribute_sentences(self) -> list[list[str]]:
        """Per known class, the attribute texts embedded for the cross-attention (see the class docstring)."""
        names = [str(c) for c in self.class_names]
        if self.descriptions is None:
            return [[a.format(c=name) for a in DEFAULT_ATTRIBUTES] for name in names]
        from ..data.descriptions import load_descriptions
        from ..data.prompts import descriptor_sentence

        per_class = load_descriptions(self.descriptions, names, subset=True)
        return [[descriptor_sentence(ATTRIBUTE_TEMPLATE, name, d) for d in per_class[name] if d.strip()]
                for name in names]

    def attribute_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attributes (K, A, d), padding mask (K, A) True where a class has fewer than A phrases)."""
        from ..features.text import embed_prompts

        groups = embed_prompts(self.backbone, self.attribute_sentences(), self.cache_dir)
        count = max(len(g) for g in groups)
        out = np.zeros((len(groups), count, self.backbone.embed_dim), dtype=np.float32)
        mask = np.ones((len(groups), count), dtype=bool)
        for k, group in enumerate(groups):
            out[k, :len(group)], mask[k, :len(group)] = group, False
        return torch.from_numpy(out), torch.from_numpy(mask)

    def _open_class_names(self) -> list[str] | None:
        value = self.open_classes
        if value is None:
            return None
        names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
        names = [n for n in names if n]
        if not names:
            raise CliplabError("OSLoPrompt: open_classes names no class")
        return names

    def open_features(self, X_open=None) -> np.ndarray | None:
        """The pseudo-open features: ``X_open`` as given (checked), or those of ``open_data`` (see the class
        docstring), or None."""
        known = {loose(c): str(c) for c in self.class_names}
        if X_open is not None:
            if self.open_data is not None:
                raise CliplabError("OSLoPrompt: give pseudo-open samples as X_open or as open_data, not both")
            X_open = np.asarray(self._validate(X_open), dtype=np.float32)
            if X_open.shape[1] != self.backbone.embed_dim:
                raise DimensionMismatchError(f"OSLoPrompt: X_open has width {X_open.shape[1]}, the model's "
                                             f"embeddings are {self.backbone.embed_dim}-d")
            return X_open
        if self.open_data is None:
            if self.open_classes is not None:
                raise CliplabError("OSLoPrompt: open_classes names classes of open_data; give open_data too")
            return None
        from ..data import dataset_names, load_dataset
        from ..data.base import Subset
        from ..features import embed_images

        try:
            dataset = load_dataset(self.open_data, split="train")
        except DatasetError:
            if str(self.open_data).lower() in dataset_names():  # a named dataset that is missing: say so
                raise
            dataset = load_dataset(self.open_data)  # a folder or manifest without splits: all of it
        names = [str(c) for c in (dataset.class_names or [])]
        wanted = self._open_class_names()
        labels = np.asarray(dataset.labels) if names else None
        if wanted is None:
            shared = [n for n in names if loose(n) in known]
            if shared:
                raise CliplabError(f"OSLoPrompt: open_data {self.open_data} holds the known class {shared[0]!r}: name "
                                   "its held-out classes with open_classes")
            rows = np.arange(len(dataset))
        else:
            if not names:
                raise CliplabError(f"OSLoPrompt: open_data {self.open_data} has no classes to pick open_classes from")
            by_name = {loose(n): i for i, n in enumerate(names)}
            picked = []
            for name in wanted:
                if loose(name) in known:
                    raise CliplabError(f"OSLoPrompt: open class {name!r} is a known class; pseudo-open classes must "
                                       "be held out")
                if loose(name) not in by_name:
                    raise CliplabError(f"OSLoPrompt: open class {name!r} is not a class of {self.open_data} "
                                       f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
                picked.append(by_name[loose(name)])
            rows = np.flatnonzero(np.isin(labels, picked))
        if self.open_samples is not None and len(rows) > int(self.open_samples):
            draw = np.random.default_rng([int(self.random_state), 39]).choice(len(rows), int(self.open_samples),
                                                                               replace=False)
            rows = rows[np.sort(draw)]
        if not len(rows):
            raise CliplabError(f"OSLoPrompt: open_data {self.open_data} gives no pseudo-open samples")
        features = embed_images(self.backbone, Subset(dataset, rows), self.cache_dir, progress=bool(self.progress))
        if not len(features):
            raise FeatureError(f"OSLoPrompt: no image of open_data {self.open_data} could be embedded")
        return np.asarray(features.features, dtype=np.float32)

    # ------------------------------------------------------------------ prompts

    def build_learner(self, with_unknown: bool, attention: bool | None = None) -> OpenSetPrompts:
        """The learner for the known classes (+ the unknown row), the context at its start; with ``attention`` the
        cross-attention branch (seeded by ``random_state``)."""
        self._check_params()
        backbone = self.backbone
        known = [str(c) for c in self.class_names]
        names = known + ([self.unknown_name] if with_unknown else [])
        ctx, tokens, embedded, start = initial_context(backbone, names, self.n_ctx, self.ctx_init,
                                                       self.random_state, "OSLoPrompt")
        scale = self.logit_scale if self.logit_scale is not None else backbone.logit_scale
        length = causal_length(backbone, embedded, tokens) if self.truncate else None
        n_ctx = len(ctx)
        attribute = None
        if (self.attention if attention is None else attention):
            a_ctx, a_tokens, a_embedded, a_start = initial_context(backbone, known, None, self.attribute_prompt,
                                                                   self.random_state, "OSLoPrompt")
            attributes, mask = self.attribute_embeddings()
            attribute = {
                "attr_ctx": a_ctx, "attr_prefix": a_embedded[:, :a_start],
                "attr_suffix": a_embedded[:, a_start + len(a_ctx):], "attr_tokens": a_tokens,
                "length": causal_length(backbone, a_embedded, a_tokens) if self.truncate else None,
                "attributes": attributes.to(backbone.device), "attribute_mask": mask.to(backbone.device),
                "heads": int(self.attention_heads), "dropout": float(self.attention_dropout),
                "seed": int(self.random_state) + 1}
        learner = OpenSetPrompts(backbone, ctx, embedded[:, :start], embedded[:, start + n_ctx:], tokens, scale,
                                 length, len(known), attribute)
        return learner.to(backbone.device)

    def open_epoch_data(self, samples: np.ndarray, y: np.ndarray, X_open: np.ndarray | None):
        """CoOp's epoch batches (``epoch_data``), each with ``open_per_batch`` pseudo-open rows (default about a
        known class's share of the batch) taken in a seeded order per epoch (cycled when the batches need more)."""
        base = self.epoch_data(samples, y)
        if X_open is None:
            return base
        n_known = len(self.class_names)

        def data(epoch: int) -> list[dict]:
            batches = base(epoch)
            counts = [int(self.open_per_batch) if self.open_per_batch is not None
                      else max(1, int(round(len(b["labels"]) / n_known))) for b in batches]
            order = np.random.default_rng([int(self.random_state), int(epoch), 1]).permutation(len(X_open))
            rows = np.resize(order, sum(counts))
            bounds = np.cumsum([0, *counts])
            for batch, s, e in zip(batches, bounds[:-1], bounds[1:], strict=True):
                batch["open"] = torch.from_numpy(np.ascontiguousarray(X_open[rows[s:e]]))
            return batches

        return data

    # ------------------------------------------------------------------ fitting

    def fit(self, X, y, X_val=None, y_val=None, views=None, X_open=None):
        """Learn the context (and, with pseudo-open samples, the unknown prompt) on the training features."""
        self._check_params()
        X, y = self._training_rows(X, y, "OSLoPrompt")
        samples = self._checked_views(views, X) if views is not None else X[None]
        validation = self._validation_set(X_val, y_val) if X_val is not None else None
        pseudo_open = self.open_features(X_open)
        epochs = self.epochs_for(y)
        learner = self.build_learner(pseudo_open is not None)
        settings = replace(self.train_settings(epochs, samples, y), optimizer=self.optimizer)
        if pseudo_open is not None:
            identity = json.loads(settings.identity)
            identity["open"] = data_digest(pseudo_open[None], np.zeros(0, dtype=np.int64))
            settings = replace(settings, identity=json.dumps(identity, sort_keys=True))
        objective = OSLoPromptObjective(float(self.style_weight), float(self.consistency_weight))
        history = train_prompts(learner, self.open_epoch_data(samples, y, pseudo_open), settings, epochs, validation,
                                objective=objective)
        self._store(learner)
        self.classes_ = np.arange(len(self.class_names))
        self.n_features_in_ = X.shape[1]
        self.epochs_ = int(epochs)
        self.training_loss_ = learner.epoch_losses()
        self.val_accuracy_ = (accuracy(self.logits(validation[0]), validation[1]) if validation is not None
                              else None)
        self.history_ = [{k: v for k, v in h.items() if k != "seconds"} for h in history]
        self.n_open_ = 0 if pseudo_open is None else int(len(pseudo_open))
        self.n_attributes_ = 0 if learner.cross is None else int((~learner.attribute_mask).sum())
        return self

    def _store(self, learner: OpenSetPrompts) -> None:
        learner.eval()
        with torch.no_grad():
            text = learner().float().cpu().numpy()
        k = len(self.class_names)
        self.ctx_ = learner.ctx.detach().float().cpu().numpy()
        self.weights_ = np.ascontiguousarray(text[:k].T, dtype=np.float32)
        self.unknown_weights_ = np.ascontiguousarray(text[k], dtype=np.float32) if len(text) > k else None
        self.logit_scale_ = float(learner.logit_scale)
        self.text_positions_ = int(learner.length or learner.tokens.shape[1])

    def with_classes(self, class_names: Sequence[str]) -> OSLoPrompt:
        """A fitted copy scoring ``class_names`` (and the unknown prompt, if any) with the learned context."""
        check_is_fitted(self, "ctx_")
        head = self._fitted_copy(class_names)
        learner = head.build_learner(self.unknown_weights_ is not None, attention=False)
        if tuple(learner.ctx.shape) != tuple(np.shape(self.ctx_)):
            raise CliplabError(f"OSLoPrompt: the learned context {np.shape(self.ctx_)} does not fit the prompts of "
                               f"the new classes {tuple(learner.ctx.shape)}")
        with torch.no_grad():
            learner.ctx.copy_(torch.from_numpy(np.asarray(self.ctx_, dtype=np.float32)))
        learner.logit_scale = float(self.logit_scale_)
        head._store(learner)
        head.classes_ = np.arange(len(head.class_names))
        return head

    # ------------------------------------------------------------------ prediction

    def logits(self, X) -> np.ndarray:
        """The known classes' logits ``logit_scale_ * X @ weights_`` (n, K)."""
        X = self._checked(X)
        return self.logit_scale_ * (X @ self.weights_)

    def open_logits(self, X) -> np.ndarray:
        """(n, K + 1): the known classes' logits and, last, the unknown prompt's."""
        X = self._checked(X)
        if self.unknown_weights_ is None:
            raise CliplabError("OSLoPrompt: this head was fitted without pseudo-open samples (open_data or X_open), "
                               "so it has no unknown prompt")
        unknown = X @ np.asarray(self.unknown_weights_, dtype=np.float32)
        return self.logit_scale_ * np.hstack([X @ self.weights_, unknown[:, None]])

    def unknown_margin(self, X) -> np.ndarray:
        """(n,) max known logit - unknown logit: higher = more like a known class; below 0 the sample is rejected."""
        scores = self.open_logits(X)
        return scores[:, :-1].max(axis=1) - scores[:, -1]

    def predict_open(self, X) -> np.ndarray:
        """Class indices, -1 where the unknown logit beats every known one (their arg-max over K + 1)."""
        scores = self.open_logits(X)
        best = scores.argmax(axis=1)
        return np.where(best == scores.shape[1] - 1, -1, best)

    def fit_summary(self) -> dict:
        return {"n_ctx": int(len(self.ctx_)), "ctx_init": self.ctx_init, "epochs": self.epochs_,
                "attention": bool(self.attention), "attributes": self.n_attributes_, "pseudo_open": self.n_open_,
                "final_loss": self.training_loss_[-1] if self.training_loss_ else None,
                "val_accuracy": self.val_accuracy_}
