"""MaPLe: multi-modal prompt learning, coupled deep prompts in both towers (paper 31, Khattak et al., CVPR 2023)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted

from ..errors import CliplabError, DatasetError, TextTooLongError, UnsupportedOperationError
from ..features.views import Augmentation
from ..models.backbone import Backbone
from ..models.encoders import Tower, replace_tokens
from ..train.engine import TrainSettings, register_objective, run_training
from ..train.prompts import LazyBatches
from .base import FEWSHOT_SKIPS, ClipHead, ZeroShotLogitsMixin
from .registry import register

AUTHORS_DEPTH = 9  # TRAINER.MAPLE.PROMPT_DEPTH of configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml
INIT_STD = 0.02  # random context and deep text prompts: nn.init.normal_(std=0.02)
CHECKPOINT_SECONDS = 60.0  # with a checkpoint_dir: a checkpoint every epoch and at least every minute
CROP_SCALE = (0.08, 1.0)  # Dassl's INPUT.RRCROP_SCALE default, the authors' "random_resized_crop"


class MultiModalPrompts(torch.nn.Module):
    """MaPLe's learnable tensors and the forward through both frozen towers.

    Parameters: the language context ``ctx`` (p, text width), the deep text prompts ``deep[i]`` (p, text width) of
    blocks 1..J-1, and the coupling functions ``couplings[j]`` (Linear: text width -> image width) of blocks 0..J-1.
    The text prompts of block j are ``[ctx, deep[0], ..., deep[J-2]][j]``; the vision prompts of block j are
    ``couplings[j](text prompt j)``. With J = 0 there are no couplings and no vision prompts: the text context alone,
    CoOp's prompt. The Backbone is a plain attribute (its frozen weights are neither trained nor checkpointed); the
    token ids are non-persistent buffers.
    """

    def __init__(self, backbone: Backbone, ctx: torch.Tensor, deep: Sequence[torch.Tensor],
                 couplings: Sequence[tuple[torch.Tensor, torch.Tensor]], ids: torch.Tensor, logit_scale: float,
                 length: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.logit_scale = float(logit_scale)
        self.length = length
        self.ctx = torch.nn.Parameter(ctx.detach().clone().float())
        self.deep = torch.nn.ParameterList([torch.nn.Parameter(t.detach().clone().float()) for t in deep])
        self.couplings = torch.nn.ModuleList()
        for weight, bias in couplings:
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
            self.couplings.append(layer)
        self.register_buffer("ids", ids.detach().clone(), persistent=False)

    def text_prompts(self) -> list[torch.Tensor]:
        """The text tower's prompts per block: the context, then the deep prompts."""
        return [self.ctx, *self.deep]

    def image_prompts(self) -> list[torch.Tensor]:
        """The image tower's prompts per block, each the coupling of that block's text prompt."""
        text = self.text_prompts()
        return [coupling(text[j]) for j, coupling in enumerate(self.couplings)]

    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features (C, d)."""
        return text_features(self.backbone, self.ids, self.text_prompts(), self.length)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features (n, d) through the prompted image tower."""
        return self.backbone.forward_images(images, prompts=self.image_prompts())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (n, C)."""
        return self.logit_scale * (self.image_features(images) @ self.text_features().T)


def text_features(backbone: Backbone, ids: torch.Tensor, prompts: Sequence[torch.Tensor],
                  length: int | None) -> torch.Tensor:
    """L2-normalised text features of ``ids`` (C, L) with ``prompts`` (context first, then deep prompts).

    ``length``: run only the first ``length`` positions (see :func:`short_length`); None runs all of them through
    ``Backbone.forward_texts``.
    """
    if length is None:
        return backbone.forward_texts(ids, prompts=list(prompts))
    tower = backbone.text_tower()
    count = ids.shape[0]
    layers = [t.unsqueeze(0).expand(count, -1, -1) for t in prompts]
    x, state = tower.begin(ids[:, :length], layers[0])
    if isinstance(state.mask, torch.Tensor) and state.mask.shape[-1] > x.shape[1]:  # a mask for the whole context
        state.mask = state.mask[..., :x.shape[1], :x.shape[1]]
    for j in range(tower.depth):
        if 0 < j < len(layers):
            x = replace_tokens(x, state.start, layers[j])
        x = tower.block(j, x, state)
    return F.normalize(tower.end(x, state), dim=-1)


def short_length(tower: Tower, ids: torch.Tensor, n_ctx: int) -> int | None:
    """How many positions the text tower needs for ``ids`` with ``n_ctx`` context tokens inserted: up to the last
    pooled position, where CLIP's causal mask (-inf above the diagonal) keeps earlier positions from seeing later
    ones; None where that cannot be seen (no such mask, no pooled position) or nothing is saved."""
    try:
        first = torch.zeros(ids.shape[0], n_ctx, tower.width, device=ids.device)
        _, state = tower.begin(ids, first)
    except (AttributeError, CliplabError, NotImplementedError):
        return None
    if state.pooled is None or not isinstance(state.mask, torch.Tensor) or not state.mask.is_floating_point():
        return None
    length = int(state.pooled.max()) + 1
    if length >= ids.shape[1] or not bool(torch.isneginf(state.mask[..., :length, length:]).all()):
        return None
    return length


@register_objective("maple")
class MaPLeObjective:
    """Cross-entropy of the prompted logits for a batch ``{"images": (b, 3, H, W), "labels": (b,)}``; weight decay
    on every learnable tensor (Dassl's SGD over the prompt learner's parameters)."""

    def __call__(self, module: MultiModalPrompts, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = module(batch["images"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels)
        return loss, {"acc": float((logits.argmax(dim=1) == labels).float().mean())}

    def param_groups(self, module: torch.nn.Module, weight_decay: float) -> list[dict]:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": weight_decay}]


@register("maple", family="encoder", paper=31, needs_train=True, needs=("images",),
          gives=("backbone", "class_weights"))
class MaPLe(ZeroShotLogitsMixin, ClipHead):
    """MaPLe: a language context and deep prompts in both towers, the vision prompts coupled to the language ones.

    Paper 31 in ../shared/papers.md (Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023), read against
    the authors' code, github.com/muzairkhattak/multimodal-prompt-learning (``trainers/maple.py``, its CLIP fork
    ``clip/model.py``: ``ResidualAttentionBlock_MaPLe``, ``VisionTransformer_MaPLe``, and
    ``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml``), through cliplab's encoder access
    (``Backbone.forward_images``/``forward_texts`` with ``prompts=``, ``text_tower()``).

    Language side: the text tower reads ``[SOS] c_1 .. c_p [rest of "{ctx_init} {class name}." after its first p
    tokens] [EOS]``: the authors tokenize the whole prompt "a photo of a {c}." and replace its first ``n_ctx``
    tokens by the learnable context, initialised from their embeddings. With their ``n_ctx=2`` and ``ctx_init`` "a
    photo of a" the context starts as "a photo" and the words "of a" stay fixed tokens of every prompt (so
    ``max_epoch=0`` with J = 1 gives the zero-shot weights of "a photo of a {c}."). Without ``ctx_init`` the context is
    ``n_ctx`` vectors from N(0, 0.02^2) and the prompt "X .. X {c}.". Before block j (1 <= j < J) the p context
    positions are replaced by the deep text prompt of that block (N(0, 0.02^2) at the start).

    Vision side: before block j (0 <= j < J) the image tower holds p prompt tokens ``F_j(text prompt j)``, F_j a
    Linear from the text width to the image width (the coupling function; the authors' ``proj`` for j = 0 and
    ``compound_prompt_projections`` after it), inserted before ``ln_pre`` at block 0 and replacing the previous
    block's prompt outputs after it. Image features are pooled without the prompt tokens. Only the context, the deep
    text prompts and the couplings train, by cross-entropy of ``logit_scale * f(x) . t_c`` (both L2-normalised); both
    towers stay frozen, but the image features depend on the prompts, so MaPLe trains on images (``needs`` "images":
    a dataset aligned with the rows of X) and the test images must be embedded through ``backbone_`` (``gives``
    "backbone": a derived Backbone with the learned prompts attached, what the evaluation does), scored against
    ``weights_`` (``gives`` "class_weights"). ``logits(X)`` expects features from ``backbone_``.

    Depth (``prompt_depth``, J): the authors' 9 blocks (None: 9, or fewer where either tower has fewer blocks); an
    explicit J over a tower's depth is refused in one line. J = 0 (not in the authors' code, which asserts J >= 1)
    keeps the context alone, without couplings or vision prompts: CoOp's prompt through this code (tested equal).

    Training (``cliplab.train.engine.run_training``, objective "maple"), the authors' config: SGD lr 0.0035,
    momentum 0.9, weight decay 5e-4 (Dassl's defaults) on every learnable tensor, batch 4 in a random order per epoch
    (the last incomplete batch dropped when there are at least 4 items, Dassl's ``drop_last``), ``max_epoch`` 5 (their
    cross-dataset config: 2 epochs at lr 0.0026 and depth 3); rate set once an epoch: ``warmup_epochs`` (1) at
    ``warmup_lr`` (1e-5), then cosine over ``max_epoch``; the last epoch's prompts are kept. Each image of each epoch
    is a random resized crop (area 0.08-1, aspect 3/4-4/3, bicubic) with a random flip (``augment=True``), drawn by a
    generator seeded with (``random_state``, epoch, item), then the model's preprocessing; ``augment=False`` uses the
    preprocessed image itself. ``checkpoint_dir``: the loop's resumable checkpoint folder (a killed fit resumes to the
    same numbers).

    Initialisation of the couplings: PyTorch's Linear default (weights and biases U(-1/sqrt(w), 1/sqrt(w)), w the text
    width), drawn with ``random_state``; as the authors' ``_get_clones``, the couplings of blocks 1..J-1 start as
    copies of one layer and that of block 0 is drawn on its own.

    Fitted state: ``ctx_`` (p, text width), ``deep_text_`` (J-1, p, text width), ``coupling_weight_`` (J, image
    width, text width), ``coupling_bias_`` (J, image width), ``weights_`` (d, C), ``logit_scale_``, ``prompt_depth_``,
    ``epochs_``, ``training_loss_`` (mean step loss per epoch), ``text_positions_``; ``backbone_`` is rebuilt from
    them by :meth:`rebuild_backbone` (what loading a saved head calls). :meth:`with_classes` scores other class names
    with the learned prompts (base-to-new).

    Speed (``truncate``): with CLIP's causal text mask the pooled outputs do not depend on later positions, so the
    text tower runs on the positions up to the longest prompt's end-of-text token only (tested equal to the full
    forward); ``text_positions_`` says how many ran.

    Departures from the authors' code, and why:

    - Precision: float32 throughout (their config's PREC is fp16, and their ``proj`` and prompt tokens are cast to
      half even so); ``logit_scale`` defaults to the model's (exp of the learned temperature clamped at 100, CLIP's;
      the code uses the unclamped exp, the same 100 for OpenAI's models).
    - Widths: their compound text prompts are (p, 512) and their couplings Linear(512, 768), ViT-B/16's widths;
      here the towers' own widths, so any open_clip or Hugging Face ViT CLIP works.
    - Vision prompt position: they append the prompt tokens after the patches, cliplab's towers put them after the
      class token; without an attention mask in the image tower the outputs are the same (tested against a
      hand-built run of their layout in tests/unit/test_maple.py).
    - Init: their code initialises from the words when ``n_ctx <= 4`` and silently falls back to random vectors
      otherwise (and with ``n_ctx`` over the init's tokens would embed the end-of-text and padding tokens as
      context); here ``n_ctx`` up to the init's token count takes its first tokens and a longer one is refused.
    - Class names are used as given (the code replaces "_" by " "), as CoOp here.
    - Augmentation: drawn per (seed, epoch, item) with NumPy (cliplab's ``Augmentation``) instead of torchvision's
      global RNG, so a run repeats bit for bit on the CPU and resumes exactly.
    - The schedule's epoch index and batches come from the one training loop (the same schedule as Dassl's
      ConstantWarmupScheduler over CosineAnnealingLR).
    - No validation during training (their few-shot runs select nothing on it); the provider's validation features
      come from the unprompted image tower, so the method does not declare "val".
    """

    _contract_skips = dict(FEWSHOT_SKIPS)

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        cache_dir: str | Path | None = None,
        n_ctx: int = 2,
        ctx_init: str | None = "a photo of a",
        prompt_depth: int | None = None,
        max_epoch: int = 5,
        lr: float = 0.0035,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        batch_size: int = 4,
        augment: bool = True,
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
        self.prompt_depth = prompt_depth
        self.max_epoch = max_epoch
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.warmup_lr = warmup_lr
        self.batch_size = batch_size
        self.augment = augment
        self.logit_scale = logit_scale
        self.random_state = random_state
        self.truncate = truncate
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress

    # ------------------------------------------------------------------ checks

    def _check_params(self) -> None:
        for key, low in (("n_ctx", 1), ("max_epoch", 0), ("warmup_epochs", 0), ("batch_size", 1),
                         ("prompt_depth", 0)):
            value = getattr(self, key)
            if value is None and key == "prompt_depth":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise CliplabError(f"MaPLe: {key} must be an integer >= {low}, got {value!r}")
        for key in ("lr", "momentum", "weight_decay", "warmup_lr"):
            value = float(getattr(self, key))
            if not np.isfinite(value) or value < 0 or (key == "lr" and value == 0):
                raise CliplabError(f"MaPLe: {key} must be finite and {'> 0' if key == 'lr' else '>= 0'}")
        if self.ctx_init is not None and not isinstance(self.ctx_init, str):
            raise CliplabError(f"MaPLe: ctx_init must be words or None, got {self.ctx_init!r}")

    def towers(self) -> tuple[Tower, Tower]:
        """The image and text towers, or one line saying why MaPLe cannot prompt this model."""
        backbone = self.backbone
        try:
            image = backbone.image_tower()
        except UnsupportedOperationError as exc:
            raise UnsupportedOperationError(f"MaPLe puts prompts into the image tower and needs a transformer there: "
                                            f"{exc}") from None
        try:
            text = backbone.text_tower()
        except UnsupportedOperationError as exc:
            raise UnsupportedOperationError(f"MaPLe puts prompts into the text tower: {exc}") from None
        return image, text

    def depth_for(self, image: Tower, text: Tower) -> int:
        """J: ``prompt_depth``, or the authors' 9 capped at the towers' depths; over a tower's depth is an error."""
        deepest = min(image.depth, text.depth)
        if self.prompt_depth is None:
            return min(AUTHORS_DEPTH, deepest)
        depth = int(self.prompt_depth)
        if depth > deepest:
            tower = image if image.depth < text.depth else text
            raise CliplabError(f"MaPLe: prompt_depth={depth} is over the {tower.depth} blocks of "
                               f"{self.backbone.info.name}'s {tower.modality} tower; give prompt_depth <= {deepest}")
        return depth

    # ------------------------------------------------------------------ prompts

    def class_ids(self, class_names: Sequence[str], n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, context ids)``: the token ids (C, L) the text tower reads with the context inserted after the
        start token (the authors' prompt "{prefix} {c}." without its first ``n_ctx`` tokens, padded), and the ids
        of those ``n_ctx`` tokens (what an init embeds)."""
        backbone = self.backbone
        prefix = self.ctx_init if self.ctx_init else " ".join(["X"] * n_ctx)
        names = [str(name) for name in class_names]
        texts = [f"{prefix} {name}." for name in names]
        lengths = backbone.text_lengths(texts)
        if lengths is not None and max(lengths) > backbone.context_length:
            longest = int(np.argmax(lengths))
            raise TextTooLongError(f"MaPLe: the prompt {texts[longest]!r} has {lengths[longest]} tokens, over the "
                                   f"model's {backbone.context_length}")
        own = backbone.tokenize([prefix, ""])
        full = backbone.tokenize(texts)
        pad = own[1, -1]
        measured = backbone.text_lengths([prefix])
        # the prefix's own tokens: its length less the start and end tokens (else: where its ids differ from the
        # empty text's, less the end-of-text position)
        count = measured[0] - 2 if measured is not None else int((own[0] != own[1]).sum()) - 1
        if n_ctx > count:
            raise CliplabError(f"MaPLe: n_ctx={n_ctx} is longer than ctx_init {prefix!r} ({count} tokens)")
        context = own[0, 1:1 + n_ctx]
        if not bool((full[:, 1:1 + n_ctx] == context).all()):
            raise UnsupportedOperationError(f"MaPLe: {backbone.info.name}'s tokenizer splits {prefix!r} differently "
                                            "before a class name, so the context cannot be placed")
        ids = torch.cat([full[:, :1], full[:, 1 + n_ctx:], pad.expand(len(full), n_ctx)], dim=1)
        return ids, context

    def build_learner(self) -> MultiModalPrompts:
        """The prompts at their initial values (the random parts seeded by ``random_state``)."""
        self._check_params()
        backbone = self.backbone
        image, text = self.towers()
        depth = self.depth_for(image, text)
        n_ctx = int(self.n_ctx)
        ids, context = self.class_ids(self.class_names, n_ctx)
        ids = ids.to(backbone.device)
        generator = torch.Generator().manual_seed(int(self.random_state))
        width, image_width = text.width, image.width
        with torch.no_grad():
            if self.ctx_init:
                ctx = backbone.token_embeddings(context[None].to(backbone.device))[0].float().cpu()
            else:
                ctx = torch.randn(n_ctx, width, generator=generator) * INIT_STD
            deep = [torch.randn(n_ctx, width, generator=generator) * INIT_STD for _ in range(max(depth - 1, 0))]
            bound = 1.0 / np.sqrt(width)

            def linear() -> tuple[torch.Tensor, torch.Tensor]:
                weight = (torch.rand(image_width, width, generator=generator) * 2 - 1) * bound
                return weight, (torch.rand(image_width, generator=generator) * 2 - 1) * bound

            couplings = []
            if depth >= 1:
                couplings.append(linear())
                shared = linear()
                couplings += [(shared[0].clone(), shared[1].clone()) for _ in range(depth - 1)]
        scale = self.logit_scale if self.logit_scale is not None else backbone.logit_scale
        length = short_length(text, ids, n_ctx) if self.truncate else None
        learner = MultiModalPrompts(backbone, ctx, deep, couplings, ids, scale, length)
        return learner.to(backbone.device)

    # ------------------------------------------------------------------ fitting

    def _images(self, images, n: int) -> list:
        if images is None:
            raise CliplabError("MaPLe trains through the image tower: fit(X, y, images=...) needs the training "
                               "images (a dataset aligned with the rows of X)")
        if len(images) != n:
            raise DatasetError(f"MaPLe: {len(images)} training images for {n} feature rows")
        out = []
        for i in range(n):
            try:
                out.append(images.load_image(i).convert("RGB"))
            except Exception as exc:  # noqa: BLE001 - any decoder failure is the item's
                raise DatasetError(f"MaPLe: training image {images.item_id(i)} cannot be read: "
                                   f"{' '.join(str(exc).split())}") from None
        return out

    def epoch_data(self, pictures: list, y: np.ndarray):
        """``data(epoch, start)`` for the training loop: that epoch's batches of preprocessed (augmented) images,
        seeded by (random_state, epoch) for the order and (random_state, epoch, item) for each crop."""
        backbone = self.backbone
        n, batch = len(pictures), int(self.batch_size)
        stop = n - n % batch if n >= batch else n  # Dassl: drop_last when the set holds a full batch
        labels = torch.from_numpy(y.astype(np.int64))
        size = backbone.preprocess_config.get("size", 224)
        augmentation = Augmentation(size=int(size[0] if isinstance(size, (list, tuple)) else size),
                                    scale=CROP_SCALE)
        plain: dict[int, torch.Tensor] = {}

        def pixels(item: int, epoch: int) -> torch.Tensor:
            if not self.augment:
                if item not in plain:
                    plain[item] = backbone.preprocess(pictures[item])
                return plain[item]
            rng = np.random.default_rng([int(self.random_state), int(epoch), item])
            return backbone.preprocess(augmentation(pictures[item], rng))

        def data(epoch: int, start: int = 0) -> LazyBatches:
            order = np.random.default_rng([int(self.random_state), int(epoch)]).permutation(n)
            rows = [order[s:s + batch] for s in range(start * batch, stop, batch)]
            return LazyBatches(rows, lambda r: {"images": torch.stack([pixels(int(i), epoch) for i in r]),
                                             "labels": labels[r]})

        return data

    def fit(self, X, y, images=None):
        """Learn the prompts on the training ``images`` (rows of ``X``, labels ``y``: class indices)."""
        self._check_params()
        X, y = self._training_rows(X, y, "MaPLe")
        backbone = self.backbone
        learner = self.build_learner()  # architecture, depth and prompt checks, before any image is read
        pictures = self._images(images, len(X))
        epochs = int(self.max_epoch)
        losses: list[float] = []
        frozen = [(p, p.requires_grad) for p in backbone.model.parameters()]
        backbone.model.requires_grad_(False)  # only the prompts train, whatever the backbone allowed
        try:
            if epochs > 0:
                run_training(learner, _Recording(MaPLeObjective(), losses), self.epoch_data(pictures, y),
                             self.train_settings(epochs, learner, len(pictures)))
            self._store(learner)
        finally:
            for param, flag in frozen:
                param.requires_grad_(flag)
        self.classes_ = np.arange(len(self.class_names))
        self.n_features_in_ = X.shape[1]
        self.epochs_ = epochs
        self.training_loss_ = _epoch_means(losses, epochs)
        return self

    def _store(self, learner: MultiModalPrompts) -> None:
        """The fitted arrays from ``learner``, ``weights_`` and ``backbone_``."""
        with torch.no_grad():
            self.ctx_ = learner.ctx.detach().float().cpu().numpy()
            width = self.ctx_.shape[1]
            self.deep_text_ = np.stack([t.detach().float().cpu().numpy() for t in learner.deep]) if len(
                learner.deep) else np.zeros((0, *self.ctx_.shape), dtype=np.float32)
            image_width = self.backbone.image_tower().width
            self.coupling_weight_ = (np.stack([c.weight.detach().float().cpu().numpy() for c in learner.couplings])
                                     if len(learner.couplings) else np.zeros((0, image_width, width), np.float32))
            self.coupling_bias_ = (np.stack([c.bias.detach().float().cpu().numpy() for c in learner.couplings])
                                   if len(learner.couplings) else np.zeros((0, image_width), np.float32))
            self.weights_ = np.ascontiguousarray(learner.text_features().float().cpu().numpy().T, dtype=np.float32)
        self.logit_scale_ = float(learner.logit_scale)
        self.prompt_depth_ = len(learner.couplings)
        self.text_positions_ = int(learner.length or learner.ids.shape[1])
        self.backbone_ = self.rebuild_backbone(self.backbone)

    def train_settings(self, epochs: int, learner: MultiModalPrompts, n: int) -> TrainSettings:
        """The one loop's settings: the authors' SGD, one constant warm-up epoch, cosine, by epoch; with a
        ``checkpoint_dir``, a checkpoint after every epoch of ``n`` items and every minute."""
        identity = {"method": "maple", "n_ctx": int(self.n_ctx), "ctx_init": self.ctx_init,
                    "prompt_depth": len(learner.couplings), "epochs": epochs, "batch_size": int(self.batch_size),
                    "augment": bool(self.augment), "classes": [str(c) for c in self.class_names],
                    "model_id": self.backbone.model_id, "logit_scale": learner.logit_scale}
        return TrainSettings(
            epochs=epochs, lr=float(self.lr), optimizer="sgd", momentum=float(self.momentum),
            weight_decay=float(self.weight_decay), warmup="constant", warmup_steps=int(self.warmup_epochs),
            warmup_lr=float(self.warmup_lr), schedule="cosine", seed=int(self.random_state),
            device=str(self.backbone.device), progress=bool(self.progress), desc="maple",
            checkpoint_dir=self.checkpoint_dir, checkpoint_every=max(n // int(self.batch_size), 1),
            checkpoint_seconds=CHECKPOINT_SECONDS if self.checkpoint_dir is not None else 0.0,
            identity=json.dumps(identity, sort_keys=True))

    # ------------------------------------------------------------------ the fitted prompts

    def prompts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(text prompts, image prompts)`` per block from the fitted arrays (float32, CPU)."""
        check_is_fitted(self, "ctx_")
        text = [torch.from_numpy(np.asarray(self.ctx_, dtype=np.float32))]
        text += [torch.from_numpy(np.asarray(t, dtype=np.float32)) for t in self.deep_text_]
        image = [F.linear(text[j], torch.from_numpy(np.asarray(w, dtype=np.float32)),
                          torch.from_numpy(np.asarray(b, dtype=np.float32)))
                 for j, (w, b) in enumerate(zip(self.coupling_weight_, self.coupling_bias_, strict=True))]
        return text, image

    def rebuild_backbone(self, backbone: Backbone) -> Backbone:
        """A derived copy of ``backbone`` with the learned prompts attached to both towers (what ``backbone_`` is):
        its ``encode_images`` gives the features ``logits`` scores."""
        text, image = self.prompts()
        derived = backbone.derive("maple", trainable=False)
        return derived.set_prompts(image=image, text=text)

    def with_classes(self, class_names: Sequence[str]) -> MaPLe:
        """A fitted copy scoring ``class_names`` with the learned prompts (the same ``backbone_`` image features)."""
        check_is_fitted(self, "ctx_")
        head = self._fitted_copy(class_names)
        text, _ = self.prompts()
        ids, _ = head.class_ids(head.class_names, int(self.ctx_.shape[0]))
        backbone = self.backbone
        ids = ids.to(backbone.device)
        length = short_length(backbone.text_tower(), ids, len(self.ctx_)) if self.truncate else None
        with torch.no_grad():
            weights = text_features(backbone, ids, [t.to(backbone.device) for t in text], length)
        head.weights_ = np.ascontiguousarray(weights.float().cpu().numpy().T, dtype=np.float32)
        head.classes_ = np.arange(len(head.class_names))
        return head

    # ------------------------------------------------------------------ prediction

    def logits(self, X) -> np.ndarray:
        """``logit_scale_ * X @ weights_`` (n, C), X embedded by ``backbone_``."""
        X = self._checked(X)
        return self.logit_scale_ * (X @ self.weights_)

    def fit_summary(self) -> dict:
        return {"n_ctx": int(len(self.ctx_)), "ctx_init": self.ctx_init, "prompt_depth": self.prompt_depth_,
                "epochs": self.epochs_, "final_loss": self.training_loss_[-1] if self.training_loss_ else None}


class _Recording:
    """An objective that records each step's loss in ``losses``; otherwise the wrapped one."""

    def __init__(self, objective: MaPLeObjective, losses: list):
        self.objective, self.losses = objective, losses

    def __call__(self, module, batch):
        loss, logs = self.objective(module, batch)
        self.losses.append(float(loss.detach()))
        return loss, logs

    def param_groups(self, module, weight_decay):
        return self.objective.param_groups(module, weight_decay)


def _epoch_means(losses: list[float], epochs: int) -> list[float]:
    """Mean step loss per epoch (each epoch has the same number of steps; a resumed fit records only its own)."""
    if not losses or epochs <= 0 or len(losses) % epochs:
        return [float(np.mean(losses))] if losses else []
    per = len(losses) // epochs
    return [float(np.mean(losses[e * per:(e + 1) * per])) for e in range(epochs)]
