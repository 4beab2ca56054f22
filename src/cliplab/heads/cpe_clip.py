"""CPE-CLIP: class-incremental few-shot learning with shared deep prompts in both towers (paper 52)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted

from ..errors import CliplabError, DatasetError, TextTooLongError, UnsupportedOperationError
from ..models.backbone import Backbone
from ..models.encoders import Tower, replace_tokens
from ..train.engine import TrainSettings, register_objective, run_training
from .base import FEWSHOT_SKIPS, ClipHead, ZeroShotLogitsMixin
from .registry import register

AUTHORS_DEPTH = 12  # README: --deep_g 12 (every block of ViT-B/16)
MASKED = -9999.0  # the authors' value for the logits of the old classes while a later session trains
CHECKPOINT_SECONDS = 60.0


class SharedPrompts(torch.nn.Module):
    """CPE-CLIP's learnable tensors: the shared prompts ``values`` (J, p, text width), one set per block, read by
    the text tower as they are and by the image tower through one Linear ``proj`` (text width -> image width).

    ``forward(images, columns)``: logits (n, len(columns)) = ``logit_scale * f(x) . t_c`` over the class rows
    ``columns`` of ``ids``; ``vision`` False keeps the image tower unprompted (the authors' "no_vision_prompts"
    ablation). The Backbone is a plain attribute (frozen, never checkpointed)."""

    def __init__(self, backbone: Backbone, values: torch.Tensor, proj: tuple[torch.Tensor, torch.Tensor],
                 ids: torch.Tensor, logit_scale: float, vision: bool, length: int | None):
        super().__init__()
        self.backbone = backbone
        self.logit_scale = float(logit_scale)
        self.vision = bool(vision)
        self.length = length
        self.values = torch.nn.Parameter(values.detach().clone().float())
        self.proj = torch.nn.Linear(proj[0].shape[1], proj[0].shape[0])
        with torch.no_grad():
            self.proj.weight.copy_(proj[0])
            self.proj.bias.copy_(proj[1])
        self.register_buffer("ids", ids.detach().clone(), persistent=False)

    @property
    def count(self) -> int:
        return int(self.values.shape[1])

    def text_prompts(self) -> list[torch.Tensor]:
        return [] if self.count == 0 else list(self.values.unbind(0))

    def image_prompts(self) -> list[torch.Tensor]:
        if self.count == 0 or not self.vision:
            return []
        return list(self.proj(self.values).unbind(0))

    def text_features(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        ids = self.ids if rows is None else self.ids[rows]
        return prompted_text(self.backbone, ids, self.text_prompts(), self.length)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        prompts = self.image_prompts()
        if not prompts:  # the plain forward (ResNet image towers have no block-by-block access)
            return self.backbone.forward_images(images, prompts=None if self.backbone.attached_prompts("image") == []
                                                else [])
        return self.backbone.forward_images(images, prompts=prompts)

    def forward(self, images: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * (self.image_features(images) @ self.text_features(columns).T)


def prompted_text(backbone: Backbone, ids: torch.Tensor, prompts: Sequence[torch.Tensor],
                  length: int | None) -> torch.Tensor:
    """L2-normalised text features of ``ids`` (C, L) with deep ``prompts`` (each (p, width)) after the start token;
    ``length`` runs only the first positions (exact under CLIP's causal mask, see :func:`causal_positions`)."""
    if length is None or not prompts:
        return backbone.forward_texts(ids, prompts=list(prompts))
    tower = backbone.text_tower()
    layers = [t.unsqueeze(0).expand(ids.shape[0], -1, -1) for t in prompts]
    x, state = tower.begin(ids[:, :length], layers[0])
    size = x.shape[1]
    if isinstance(state.mask, torch.Tensor) and state.mask.shape[-1] > size:
        state.mask = state.mask[..., :size, :size]
    for j in range(tower.depth):
        if 0 < j < len(layers):
            x = replace_tokens(x, state.start, layers[j])
        x = tower.block(j, x, state)
    return F.normalize(tower.end(x, state), dim=-1)


def causal_positions(tower: Tower, ids: torch.Tensor, count: int) -> int | None:
    """Token positions the text tower needs for ``ids`` with ``count`` prompts inserted (up to the last pooled one)
    where CLIP's causal mask (-inf above the diagonal) shows later positions cannot matter; None otherwise."""
    try:
        _, state = tower.begin(ids, torch.zeros(ids.shape[0], count, tower.width, device=ids.device))
    except (AttributeError, CliplabError, NotImplementedError, ValueError):
        return None
    mask = state.mask
    if state.pooled is None or not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        return None
    length = int(state.pooled.max()) + 1
    if length >= ids.shape[1] or not bool(torch.isneginf(mask[..., :length, length:]).all()):
        return None
    return length


def masked_logits(logits: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """The authors' ``_after_forward``: the columns of classes learnt in earlier sessions set to -9999 (out of
    place, so autograd sees no gradient through them)."""
    return logits.masked_fill(old[None, :], MASKED)


def balance_factor(session: int, new: int, seen: int) -> float:
    """The authors' ``_before_update`` ('balance'): from the second session on (``session`` counts from 0), the
    prompts' and projection's gradients are multiplied by (classes of this session) / (classes seen so far)."""
    return float(new) / float(seen) if session >= 1 else 1.0


@contextlib.contextmanager
def scaled_gradients(module: torch.nn.Module, factor: float):
    """Every trainable parameter's gradient multiplied by ``factor`` as it is accumulated (the authors multiply
    ``.grad`` in place before the optimizer step; the same product, weight decay added after it by SGD)."""
    handles = []
    if factor != 1.0:
        handles = [p.register_hook(lambda g, f=factor: g * f) for p in module.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@register_objective("cpe-clip")
class CPEObjective:
    """Cross-entropy of the (masked) logits for a batch ``{"images", "labels": column indices, "columns": class rows
    of this session's logits, "old": (S,) bool, columns of earlier sessions}``."""

    def __call__(self, module: SharedPrompts, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = masked_logits(module(batch["images"], batch["columns"]), batch["old"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels)
        losses = batch.get("losses")
        if losses is not None:
            losses.append(float(loss.detach()))
        return loss, {"acc": float((logits.argmax(dim=1) == labels).float().mean())}

    def param_groups(self, module: torch.nn.Module, weight_decay: float) -> list[dict]:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": weight_decay}]


@register("cpe-clip", family="encoder", paper=52, needs_train=True, needs=("images",),
          gives=("backbone", "class_weights"))
class CPECLIP(ZeroShotLogitsMixin, ClipHead):
    """CPE-CLIP: shared deep prompts learnt session by session, new classes without forgetting the old ones.

    Paper 52 in ../shared/papers.md (D'Alessandro et al., "Multimodal Parameter-Efficient Few-Shot Class
    Incremental Learning"), read against the authors' code, github.com/neuraptic/cpe-clip
    (``CoLeLib/models/clip_models.py``: ``CLIPParameterEfficient``, ``CLIPTextModelForPromptTuning``,
    ``CLIPVisionModelForPromptTuning``; ``CoLeLib/training/strategies/clip_pe.py``: ``CLIPPE``; README defaults
    ``--L_g 2 --deep_g 12``), through cliplab's encoder access.

    Prompts: J x p learnable vectors ``g_j`` (p = ``n_prompts``, J = ``prompt_depth``, default 12 capped at the
    towers' depths) in the text width, xavier-uniform at the start. The text tower reads ``[SOS] g_0 "{c}." [EOS]``
    (``template`` "{}.", their manual prompt "[]."), the prompts inserted after the start token before the positional
    embeddings, and replaced by ``g_j`` before block j < J ("replace"). The image tower holds ``W g_j + b`` (one
    Linear shared by all blocks, PyTorch's default init), inserted before ``ln_pre`` and replaced before block j.
    Logits: ``logit_scale * f(x) . t_c`` over the classes seen so far (L2-normalised features). Only the prompts
    and the Linear train; both towers are frozen. ``n_prompts=0`` is CLIP itself (tested).

    Sessions (:meth:`learn_session`): each call learns the classes of ``y`` (class indices into ``class_names``),
    which must be new (a class of an earlier session is refused in one line). The logits span all classes seen so
    far (earlier sessions first); from the second session on those of earlier sessions are set to -9999 before the
    cross-entropy (``mask_old``; their ``_after_forward``) and the gradients of every learnable tensor are
    multiplied by n_new / n_seen (``balance``: their 'balance' regularisation, ``_before_update``). :meth:`fit`
    forgets everything and runs one session. ``logits(X)`` scores every class of ``class_names`` (the protocol
    keeps the seen ones), X from ``backbone_``.

    Training per session (``run_training``, objective "cpe-clip"): a fresh SGD (momentum 0.9, weight decay 1e-5,
    their ``make_optimizer`` each experience), batches of ``batch_size`` 4 in a seeded order, ``base_epochs`` 3 in
    the first session and ``epochs`` 5 after (their ``_before_training_exp``), the rate set once an epoch.

    Fitted state: ``prompts_`` (J, p, text width), ``proj_weight_``, ``proj_bias_``, ``session_classes_`` (the
    classes of each session, in order), ``weights_`` (d, C), ``logit_scale_``, ``training_loss_`` (mean step loss
    per epoch, sessions in order), ``epochs_``; ``backbone_`` is rebuilt by :meth:`rebuild_backbone`.

    Departures from the authors' code, and why:

    - Rate: their ``CosineAnnealingWarmupRestarts`` (max 0.1, min 0.001, 50 warm-up steps stepped per epoch, so a
      3-5 epoch session never leaves the warm-up: 0.001 + 0.00198 e) becomes the loop's linear warm-up
      ``lr (e + 1) / warmup_epochs`` = 0.002 (e + 1) with the defaults (lr 0.1, 50): the same ramp, a step earlier.
    - Vision prompts replace the previous block's prompt outputs ("replace"), their option for the text side; their
      README's vision default "accumulate" (prompt outputs kept and new ones appended, p more per block) is not
      built, as cliplab's attached prompts (what ``backbone_`` carries) replace.
    - Vision prompts sit after the class token (theirs after the patches): no attention mask in the image tower, so
      the outputs are the same.
    - Precision float32; ``logit_scale`` defaults to the model's (theirs a fixed 100, OpenAI's value).
    - Images: the model's preprocessing, no augmentation (their datasets' transforms); order seeded by
      (``random_state``, session, epoch) instead of global seeding, so runs repeat bit for bit.
    - Towers and widths: any open_clip or Hugging Face ViT CLIP (theirs ViT-B/16's 512 / 768); on a ResNet image
      tower ``vision_prompts=True`` is refused in one line (``vision_prompts=False``: their text-only ablation).
    """

    _contract_skips = dict(FEWSHOT_SKIPS)

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        cache_dir: str | Path | None = None,
        n_prompts: int = 2,
        prompt_depth: int | None = None,
        template: str = "{}.",
        vision_prompts: bool = True,
        balance: bool = True,
        mask_old: bool = True,
        base_epochs: int = 3,
        epochs: int = 5,
        batch_size: int = 4,
        lr: float = 0.1,
        warmup_epochs: int = 50,
        momentum: float = 0.9,
        weight_decay: float = 1e-5,
        logit_scale: float | None = None,
        random_state: int = 1,
        truncate: bool = True,
        checkpoint_dir: str | Path | None = None,
        progress: bool = False,
    ):
        self.backbone = backbone
        self.class_names = class_names
        self.cache_dir = cache_dir
        self.n_prompts = n_prompts
        self.prompt_depth = prompt_depth
        self.template = template
        self.vision_prompts = vision_prompts
        self.balance = balance
        self.mask_old = mask_old
        self.base_epochs = base_epochs
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.warmup_epochs = warmup_epochs
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.logit_scale = logit_scale
        self.random_state = random_state
        self.truncate = truncate
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress

    # ------------------------------------------------------------------ checks

    def _check_params(self) -> None:
        for key, low in (("n_prompts", 0), ("prompt_depth", 1), ("base_epochs", 0), ("epochs", 0),
                         ("batch_size", 1), ("warmup_epochs", 0)):
            value = getattr(self, key)
            if value is None and key == "prompt_depth":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise CliplabError(f"CPE-CLIP: {key} must be an integer >= {low}, got {value!r}")
        for key in ("lr", "momentum", "weight_decay"):
            value = float(getattr(self, key))
            if not np.isfinite(value) or value < 0 or (key == "lr" and value == 0):
                raise CliplabError(f"CPE-CLIP: {key} must be finite and {'> 0' if key == 'lr' else '>= 0'}")
        if not isinstance(self.template, str) or self.template.count("{}") != 1:
            raise CliplabError(f"CPE-CLIP: template must hold one '{{}}' for the class name, got {self.template!r}")

    def towers(self) -> tuple[Tower | None, Tower]:
        """(image tower or None without vision prompts, text tower), or one line saying why they cannot be prompted."""
        backbone = self.backbone
        image = None
        if self.vision_prompts and self.n_prompts:
            try:
                image = backbone.image_tower()
            except UnsupportedOperationError as exc:
                raise UnsupportedOperationError(f"CPE-CLIP puts prompts into the image tower and needs a transformer "
                                                f"there (or vision_prompts=False): {exc}") from None
        try:
            text = backbone.text_tower()
        except UnsupportedOperationError as exc:
            raise UnsupportedOperationError(f"CPE-CLIP puts prompts into the text tower: {exc}") from None
        return image, text

    def depth_for(self, image: Tower | None, text: Tower) -> int:
        deepest = min(text.depth, image.depth if image is not None else text.depth)
        if self.prompt_depth is None:
            return min(AUTHORS_DEPTH, deepest)
        if int(self.prompt_depth) > deepest:
            raise CliplabError(f"CPE-CLIP: prompt_depth={self.prompt_depth} is over the {deepest} blocks of "
                               f"{self.backbone.info.name}'s towers; give prompt_depth <= {deepest}")
        return int(self.prompt_depth)

    def class_ids(self, class_names: Sequence[str]) -> torch.Tensor:
        """Token ids (C, L) of the template for each class (refused in one line when one is too long)."""
        backbone = self.backbone
        texts = [self.template.format(str(name)) for name in class_names]
        lengths = backbone.text_lengths(texts)
        room = backbone.context_length - int(self.n_prompts)
        if lengths is not None and max(lengths) > room:
            i = int(np.argmax(lengths))
            raise TextTooLongError(f"CPE-CLIP: the prompt {texts[i]!r} has {lengths[i]} tokens, over the model's "
                                   f"{backbone.context_length} less {self.n_prompts} prompts")
        return backbone.tokenize(texts)

    # ------------------------------------------------------------------ the learner

    def build_learner(self) -> SharedPrompts:
        """The prompts at their start: the fitted ones after a session, else seeded by ``random_state``."""
        self._check_params()
        backbone = self.backbone
        image, text = self.towers()
        depth = self.depth_for(image, text)
        ids = self.class_ids(self.class_names).to(backbone.device)
        count = int(self.n_prompts)
        image_width = image.width if image is not None else _image_width(backbone, text.width)
        if hasattr(self, "prompts_"):
            values = torch.from_numpy(np.asarray(self.prompts_, dtype=np.float32))
            proj = (torch.from_numpy(np.asarray(self.proj_weight_, dtype=np.float32)),
                    torch.from_numpy(np.asarray(self.proj_bias_, dtype=np.float32)))
            if tuple(values.shape) != (depth, count, text.width) or proj[0].shape[0] != image_width:
                raise CliplabError(f"CPE-CLIP: the fitted prompts {tuple(values.shape)} do not fit this model and "
                                   "parameters")
        else:
            generator = torch.Generator().manual_seed(int(self.random_state))
            values = torch.empty(depth, count, text.width)
            if count:
                torch.nn.init.xavier_uniform_(values, generator=generator)
            bound = 1.0 / np.sqrt(text.width)
            proj = ((torch.rand(image_width, text.width, generator=generator) * 2 - 1) * bound,
                    (torch.rand(image_width, generator=generator) * 2 - 1) * bound)
        scale = self.logit_scale if self.logit_scale is not None else backbone.logit_scale
        length = causal_positions(text, ids, count) if self.truncate and count else None
        vision = bool(self.vision_prompts) and image is not None
        return SharedPrompts(backbone, values, proj, ids, scale, vision, length).to(backbone.device)

    # ------------------------------------------------------------------ sessions

    def fit(self, X, y, images=None):
        """Forget any earlier session and learn the classes of ``y`` as the first one."""
        for key in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, key)
        return self.learn_session(X, y, images=images)

    def learn_session(self, X, y, images=None):
        """One session: learn the classes of ``y`` (new ones only) on ``images`` (a dataset aligned with ``X``)."""
        self._check_params()
        first = not hasattr(self, "prompts_")
        X, y = self._training_rows(X, y, "CPE-CLIP", reset=first)
        backbone = self.backbone
        earlier = [] if first else [list(map(int, s)) for s in self.session_classes_]
        seen_before = [c for s in earlier for c in s]
        new = sorted({int(c) for c in y})
        overlap = sorted(set(new) & set(seen_before))
        if overlap:
            names = ", ".join(repr(str(self.class_names[c])) for c in overlap[:5])
            raise CliplabError(f"CPE-CLIP: session {len(earlier) + 1} has classes learnt in an earlier session "
                               f"({names}): sessions must not overlap")
        learner = self.build_learner()  # architecture and parameter checks before any image is read
        pixels = _pixels(backbone, images, len(X))
        session = len(earlier)
        columns = seen_before + new
        epochs = int(self.base_epochs if session == 0 else self.epochs)
        losses = _Losses()
        if epochs > 0 and learner.count > 0:
            factor = balance_factor(session, len(new), len(columns)) if self.balance else 1.0
            data = self.session_data(pixels, y, columns, len(seen_before) if self.mask_old else 0, session, losses)
            settings = self.train_settings(epochs, session, columns, pixels, y)
            frozen = [(p, p.requires_grad) for p in backbone.model.parameters()]
            backbone.model.requires_grad_(False)
            if not learner.vision:
                learner.proj.requires_grad_(False)  # no image prompts: the projection has nothing to learn
            try:
                with scaled_gradients(learner, factor):
                    run_training(learner, CPEObjective(), data, settings)
            finally:
                for param, flag in frozen:
                    param.requires_grad_(flag)
        self._store(learner)
        self.session_classes_ = [*earlier, new]
        self.classes_ = np.arange(len(self.class_names))
        self.n_features_in_ = X.shape[1]
        self.epochs_ = [*getattr(self, "epochs_", []), epochs] if not first else [epochs]
        previous = [] if first else list(self.training_loss_)
        self.training_loss_ = previous + _epoch_means(losses.values, epochs)
        return self

    def session_data(self, pixels: torch.Tensor, y: np.ndarray, columns: list[int], n_old: int, session: int,
                     losses: _Losses):
        """``data(epoch)``: the session's batches, labels as column indices into ``columns``; the first ``n_old``
        columns are the earlier sessions' (masked)."""
        n, batch = len(pixels), int(self.batch_size)
        where = {c: i for i, c in enumerate(columns)}
        labels = torch.tensor([where[int(c)] for c in y], dtype=torch.int64)
        cols = torch.tensor(columns, dtype=torch.int64)
        old = torch.arange(len(columns)) < n_old

        def data(epoch: int) -> list[dict]:
            order = np.random.default_rng([int(self.random_state), session, int(epoch)]).permutation(n)
            return [{"images": pixels[rows], "labels": labels[rows], "columns": cols, "old": old, "losses": losses}
                    for rows in (order[s:s + batch] for s in range(0, n, batch))]

        return data

    def train_settings(self, epochs: int, session: int, columns: list[int], pixels: torch.Tensor,
                       y: np.ndarray) -> TrainSettings:
        digest = hashlib.sha256(pixels.numpy().tobytes() + np.asarray(y, np.int64).tobytes()).hexdigest()[:16]
        identity = {"method": "cpe-clip", "session": session, "columns": columns, "epochs": epochs,
                    "n_prompts": int(self.n_prompts), "depth": self.prompt_depth, "vision": bool(self.vision_prompts),
                    "balance": bool(self.balance), "mask_old": bool(self.mask_old), "template": self.template,
                    "batch_size": int(self.batch_size), "model_id": self.backbone.model_id, "data": digest,
                    "start": _digest_fitted(self)}
        folder = None if self.checkpoint_dir is None else str(Path(self.checkpoint_dir) / f"session-{session + 1}")
        return TrainSettings(
            epochs=epochs, lr=float(self.lr), optimizer="sgd", momentum=float(self.momentum),
            weight_decay=float(self.weight_decay), warmup="linear", warmup_steps=int(self.warmup_epochs),
            schedule="constant", seed=int(self.random_state), device=str(self.backbone.device),
            progress=bool(self.progress), desc=f"cpe-clip session {session + 1}", checkpoint_dir=folder,
            checkpoint_every=-(-len(pixels) // int(self.batch_size)) if folder else 0,
            checkpoint_seconds=CHECKPOINT_SECONDS if folder else 0.0, identity=json.dumps(identity, sort_keys=True))

    def _store(self, learner: SharedPrompts) -> None:
        with torch.no_grad():
            self.prompts_ = learner.values.detach().float().cpu().numpy()
            self.proj_weight_ = learner.proj.weight.detach().float().cpu().numpy()
            self.proj_bias_ = learner.proj.bias.detach().float().cpu().numpy()
            self.weights_ = np.ascontiguousarray(learner.text_features().float().cpu().numpy().T, dtype=np.float32)
        self.logit_scale_ = float(learner.logit_scale)
        self.backbone_ = self.rebuild_backbone(self.backbone)

    # ------------------------------------------------------------------ the fitted model

    def seen_classes(self) -> list[int]:
        """The class indices learnt so far, sessions in order."""
        check_is_fitted(self, "session_classes_")
        return [int(c) for s in self.session_classes_ for c in s]

    def rebuild_backbone(self, backbone: Backbone) -> Backbone:
        """A derived copy of ``backbone`` with the learnt prompts attached (text, and image with vision prompts)."""
        values = torch.from_numpy(np.asarray(self.prompts_, dtype=np.float32))
        text = [] if values.shape[1] == 0 else list(values.unbind(0))
        image = []
        if text and self.vision_prompts:
            image = list(F.linear(values, torch.from_numpy(np.asarray(self.proj_weight_, dtype=np.float32)),
                                  torch.from_numpy(np.asarray(self.proj_bias_, dtype=np.float32))).unbind(0))
        derived = backbone.derive("cpe-clip", trainable=False)
        return derived.set_prompts(image=image, text=text)

    def with_classes(self, class_names: Sequence[str]) -> CPECLIP:
        """A fitted copy scoring ``class_names`` with the learnt prompts (the same ``backbone_``)."""
        check_is_fitted(self, "prompts_")
        head = self._fitted_copy(class_names)
        learner = head.build_learner()
        with torch.no_grad():
            head.weights_ = np.ascontiguousarray(learner.text_features().float().cpu().numpy().T, dtype=np.float32)
        head.classes_ = np.arange(len(head.class_names))
        head.session_classes_ = []  # the new names were never learnt as sessions
        return head

    def logits(self, X) -> np.ndarray:
        """``logit_scale_ * X @ weights_`` (n, C) over every class name, X embedded by ``backbone_``."""
        X = self._checked(X)
        return self.logit_scale_ * (X @ self.weights_)

    def fit_summary(self) -> dict:
        return {"n_prompts": int(np.shape(self.prompts_)[1]), "prompt_depth": int(np.shape(self.prompts_)[0]),
                "sessions": len(self.session_classes_), "epochs": list(self.epochs_),
                "final_loss": self.training_loss_[-1] if self.training_loss_ else None}


def _image_width(backbone: Backbone, fallback: int) -> int:
    """The image tower's width where it has one (the projection's shape), else ``fallback``."""
    try:
        return int(backbone.image_tower().width)
    except (UnsupportedOperationError, CliplabError, NotImplementedError, AttributeError):
        return fallback


def _digest_fitted(head) -> str:
    if not hasattr(head, "prompts_"):
        return "init"
    h = hashlib.sha256()
    for key in ("prompts_", "proj_weight_", "proj_bias_"):
        h.update(np.ascontiguousarray(getattr(head, key), dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def _pixels(backbone: Backbone, images, n: int) -> torch.Tensor:
    """The preprocessed training images (n, 3, H, W); one line for a missing, short or unreadable set."""
    if images is None:
        raise CliplabError("CPE-CLIP trains through the image tower: fit(X, y, images=...) needs the training "
                           "images (a dataset aligned with the rows of X)")
    if len(images) != n:
        raise DatasetError(f"CPE-CLIP: {len(images)} training images for {n} feature rows")
    out = []
    for i in range(n):
        try:
            out.append(backbone.preprocess(images.load_image(i).convert("RGB")))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the item's
            raise DatasetError(f"CPE-CLIP: training image {images.item_id(i)} cannot be read: "
                               f"{' '.join(str(exc).split())}") from None
    return torch.stack(out) if out else torch.zeros(0)


class _Losses:
    """Step losses, carried in the batches as one object (the loop copies lists and dicts, not this)."""

    def __init__(self):
        self.values: list[float] = []

    def append(self, value: float) -> None:
        self.values.append(value)


def _epoch_means(losses: list[float], epochs: int) -> list[float]:
    if not losses or epochs <= 0 or len(losses) % epochs:
        return [float(np.mean(losses))] if losses else []
    per = len(losses) // epochs
    return [float(np.mean(losses[e * per:(e + 1) * per])) for e in range(epochs)]
