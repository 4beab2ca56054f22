"""DenseCLIP (Rao et al., CVPR 2022): pixel-text score maps with context-aware prompting.

As the authors' ``DenseCLIP.after_extract_feat`` (raoyongming/DenseCLIP ``segmentation/denseclip/denseclip.py``)
and ``ContextDecoder`` (``segmentation/denseclip/models.py``):

- visual context: the image's global embedding (CLIP's pooled output, unnormalised) followed by its dense
  embeddings (here MaskCLIP's projected value-path tokens, ``cliplab.models.dense``: the authors' ResNet and ViT
  backbones give the same value path), (n, 1 + h*w, d);
- text: the class prompts ``[SOS, ctx_1..ctx_M, "{class}.", EOS]`` through the frozen text tower, unnormalised, with a
  learnable context shared by every class (CoOp's unified context, ``cliplab.train.prompts``; the authors'
  ``CLIPTextContextEncoder`` inserts it after the start token the same way). Here the context starts as the
  embedding of ``ctx_init`` ("a photo of a"), so before training the prompts are CLIP's plain ones (the authors
  start from N(0, 1) vectors);
- context decoder: ``t <- t + gamma * decoder(t, visual context)``, ``gamma`` a learnable (d,) vector at 1e-4;
  the decoder is the authors' (LayerNorm-Linear(-LayerNorm) projections of memory and text to its width, layers of
  self-attention, cross-attention to the memory and a 4x MLP, pre-norm, dropout 0.1, an output LayerNorm-Linear
  back to d; truncated-normal(0.02) linear weights, zero biases), scaled down: width 64, 4 heads, 3 layers
  (theirs: 256, 4, 6 for RN50's d = 1024) for the 32-px models trained here;
- score map: ``cos(dense_p, t_k)`` per patch and class, divided by ``tau`` = 0.07 (the authors' identity head input).

Head (departure, documented): the authors feed the score map concatenated to the backbone's features into a
Semantic FPN decoder whose classifier is tied to the training classes. Here the head is FPN-free and
open-vocabulary: a zero-initialised residual 1x1 convolution on the dense embeddings (``adapter``: ``v + W v + b``)
before the cosine, and the loss is the authors' identity-head loss only (pixel cross-entropy of the bilinearly
upsampled ``score / tau``, ignore index 255). Context, decoder, gamma and adapter are trained; every CLIP weight
stays frozen, so the visual features of the training windows are computed once and cached in memory.

Use: ``train_denseclip(backbone, dataset, out_dir)`` trains on a labelled segmentation set (mosaic train) through the
one training loop and saves ``denseclip.safetensors`` + ``denseclip.json`` in ``out_dir``; the registered method
``denseclip`` reads them with ``--param weights=DIR`` (the door dense methods take artefacts through, as ReCo's
``collection``); without ``weights`` it runs at initialisation (plain prompts, gamma = 1e-4, random decoder).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CliplabError
from ..fileio import atomic_write, atomic_write_text
from .base import DenseMethod
from .registry import register_dense

WEIGHTS_FILE = "denseclip.safetensors"
CONFIG_FILE = "denseclip.json"
FORMAT = "cliplab-denseclip-1"
GAMMA_INIT = 1e-4
TAU = 0.07
IGNORE = 255


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v projections (no bias) and an output projection (the authors')."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise CliplabError(f"denseclip: decoder width {dim} is not a multiple of its {heads} heads")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, c = q.shape
        m, h = k.shape[1], self.heads
        q = self.q_proj(q).reshape(b, n, h, c // h)
        k = self.k_proj(k).reshape(b, m, h, c // h)
        v = self.v_proj(v).reshape(b, m, h, c // h)
        attn = (torch.einsum("bnhc,bmhc->bhnm", q, k) * self.scale).softmax(dim=-1)
        x = torch.einsum("bhnm,bmhc->bnhc", attn, v).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm self-attention, cross-attention to the visual memory and a 4x GELU MLP, each residual."""

    def __init__(self, width: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn, self.cross_attn = Attention(width, heads, dropout), Attention(width, heads, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.norm1(x)
        x = x + self.self_attn(q, q, q)
        x = x + self.cross_attn(self.norm2(x), memory, memory)
        return x + self.dropout(self.mlp(self.norm3(x)))


class ContextDecoder(nn.Module):
    """``decoder(text (n, K, d), visual (n, N, d)) -> (n, K, d)``: text queries attending to the visual context."""

    def __init__(self, visual_dim: int, width: int = 64, heads: int = 4, layers: int = 3, dropout: float = 0.1):
        super().__init__()
        self.memory_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width))
        self.decoder = nn.ModuleList([DecoderLayer(width, heads, dropout) for _ in range(layers)])
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, visual_dim))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        memory = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.decoder:
            x = layer(x, memory)
        return self.out_proj(x)


def score_map(dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Per-patch cosine of dense embeddings (n, d, h, w) to per-image class embeddings (n, K, d): (n, K, h, w)."""
    return torch.einsum("ndhw,nkd->nkhw", F.normalize(dense, dim=1), F.normalize(text, dim=2))


class DenseCLIPModel(nn.Module):
    """Learnable parts of DenseCLIP over a frozen backbone (a plain attribute, never trained or saved):
    ``learner`` (the prompt context), ``decoder``, ``gamma`` and the ``adapter`` head."""

    def __init__(self, backbone, class_names: list[str], *, n_ctx: int = 4, ctx_init: str = "a photo of a",
                 decoder_width: int = 64, decoder_heads: int = 4, decoder_layers: int = 3, dropout: float = 0.1,
                 seed: int = 0):
        super().__init__()
        from ..models.dense import dense_tower

        self.backbone, self.tower = backbone, dense_tower(backbone)
        self.config = {"n_ctx": n_ctx, "ctx_init": ctx_init, "decoder_width": decoder_width,
                       "decoder_heads": decoder_heads, "decoder_layers": decoder_layers, "dropout": dropout,
                       "seed": seed}
        torch.manual_seed(seed)
        self.learner = _learner(backbone, class_names, n_ctx, ctx_init, seed)
        dim = _embed_dim(backbone)
        self.decoder = ContextDecoder(dim, decoder_width, decoder_heads, decoder_layers, dropout)
        self.gamma = nn.Parameter(torch.full((dim,), GAMMA_INIT))
        self.adapter = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)
        self.to(backbone.device)

    def set_classes(self, class_names: list[str]) -> None:
        """Score ``class_names`` with the learned context (the context is shared by every class)."""
        ctx = self.learner.ctx.detach()
        learner = _learner(self.backbone, class_names, len(ctx), None, 0)
        with torch.no_grad():
            learner.ctx.copy_(ctx)
        self.learner = learner.to(ctx.device)

    def text_embeddings(self) -> torch.Tensor:
        """(K, d) unnormalised class embeddings of the context prompts."""
        from ..train.prompts import run_short

        learner = self.learner
        if learner.length is None:
            return self.backbone.forward_text_embeddings(learner.prompts(), learner.tokens, normalize=False)
        return run_short(self.backbone.text_tower(), learner.prompts(), learner.tokens, learner.length)

    def visual(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global (n, d) and dense (n, d, h, w) embeddings of model-size windows, unnormalised, no gradients."""
        with torch.no_grad():
            images = images.to(self.backbone.device, torch.float32)
            pooled = self.backbone.forward_images(images, normalize=False)
            dense = self.tower.tokens(images, "value", -1, True).permute(0, 3, 1, 2)
        return pooled.float(), dense.float()

    def scores(self, pooled: torch.Tensor, dense: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Score maps (n, K, h, w) from the visual embeddings: context decoder, adapter, per-patch cosine."""
        n = dense.shape[0]
        text = (self.text_embeddings() if text is None else text).float()
        text = text[None].expand(n, -1, -1)
        context = torch.cat([pooled[:, :, None], dense.flatten(2)], dim=2).transpose(1, 2)
        text = text + self.gamma * self.decoder(text, context)
        return score_map(dense + self.adapter(dense), text)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scores(*self.visual(images))

    # -------------------------------------------------------------- saving
    def trained_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()
                if not k.startswith("learner.") or k == "learner.ctx"}

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """``denseclip.safetensors`` (trained tensors) and ``denseclip.json`` (sizes, model id, extra) in ``folder``."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = save(self.trained_state())
        atomic_write(folder / WEIGHTS_FILE, lambda handle: handle.write(payload))
        meta = {"format": FORMAT, "model_id": self.backbone.model_id, "config": self.config, **(extra or {})}
        atomic_write_text(folder / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True))
        return folder


def _embed_dim(backbone) -> int:
    with torch.no_grad():
        return int(backbone.forward_texts(backbone.tokenize(["a"]).to(backbone.device)).shape[-1])


def _learner(backbone, class_names, n_ctx, ctx_init, seed):
    from ..train.prompts import PromptLearner, causal_length, initial_context

    ctx, tokens, embedded, start = initial_context(backbone, list(class_names), n_ctx, ctx_init, seed, "denseclip")
    m = len(ctx)
    length = causal_length(backbone, embedded, tokens)  # a causal text tower: only the positions up to the end token
    return PromptLearner(backbone, ctx, embedded[:, :start], embedded[:, start + m:], tokens, 1.0, length)


def load_denseclip(folder: str | Path, backbone, class_names: list[str]) -> DenseCLIPModel:
    """A trained DenseCLIP (``DenseCLIPModel.save``) for ``backbone``, scoring ``class_names``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise CliplabError(f"denseclip weights: {folder} has no {CONFIG_FILE} and {WEIGHTS_FILE} (train_denseclip "
                           "writes them)")
    try:
        meta = json.loads(meta_path.read_text())
        state = load_file(str(weights_path))
    except (ValueError, SafetensorError, OSError) as exc:
        raise CliplabError(f"denseclip weights: cannot read {folder}: {str(exc).splitlines()[0]}") from None
    if meta.get("format") != FORMAT:
        raise CliplabError(f"denseclip weights: {meta_path} is not a {FORMAT} file")
    if meta.get("model_id") != backbone.model_id:
        raise CliplabError(f"denseclip weights in {folder} were trained on model {meta.get('model_id')}, "
                           f"not {backbone.model_id}")
    config = dict(meta["config"])
    ctx = state["learner.ctx"]
    config["n_ctx"] = int(ctx.shape[0])
    config["ctx_init"] = None
    model = DenseCLIPModel(backbone, class_names, **config)
    own = model.state_dict()
    if set(state) != set(model.trained_state()) or any(own[k].shape != v.shape for k, v in state.items()):
        raise CliplabError(f"denseclip weights in {folder} do not fit this model's sizes")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
    return model.eval()


# ------------------------------------------------------------------------------------------ the method
@register_dense("denseclip", paper="Rao et al. 2022 (DenseCLIP)", needs=("tower",))
class DenseCLIP(DenseMethod):
    """DenseCLIP: pixel-text score maps with a learned prompt context and a context decoder (weights=DIR)."""

    def __init__(self, weights: str = "", tau: float = TAU, seed: int = 0):
        self.weights = weights
        self.tau = tau
        self.seed = seed

    def setup(self, context) -> None:
        if self.tau <= 0:
            raise CliplabError(f"denseclip tau must be > 0; got {self.tau}")
        super().setup(context)
        if self.weights:
            self.model_ = load_denseclip(self.weights, context.backbone, list(context.class_names))
        else:
            self.model_ = DenseCLIPModel(context.backbone, list(context.class_names), seed=self.seed).eval()
        with torch.no_grad():
            self.text_ = self.model_.text_embeddings()

    @classmethod
    def train_dense(cls, backbone, dataset, out_dir: str | Path, *, epochs: int = 10, batch_size: int = 32,
                    lr: float = 1e-3, seed: int = 0, progress: bool = False) -> dict:
        """Train on a labelled segmentation set and save in ``out_dir`` (what ``cliplab segment-train`` calls for a
        dense method that has it); the result loads with ``weights=out_dir``. Returns the training summary."""
        _, summary = train_denseclip(backbone, dataset, out_dir, epochs=epochs, batch_size=batch_size, lr=lr,
                                     seed=seed, progress=progress)
        return summary

    @torch.no_grad()
    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        self.model_.eval()
        scores = self.model_.scores(*self.model_.visual(images), text=self.text_)
        return torch.softmax(scores / self.tau, dim=1)


# ------------------------------------------------------------------------------------------ training
class DenseCLIPObjective:
    """The authors' identity-head loss: pixel cross-entropy of bilinearly upsampled ``score / tau``."""

    def __init__(self, tau: float = TAU):
        self.tau = tau

    def __call__(self, module: DenseCLIPModel, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = module.scores(batch["pooled"], batch["dense"]) / self.tau
        logits = F.interpolate(logits, size=batch["mask"].shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, batch["mask"].long(), ignore_index=IGNORE)
        return loss, {"loss": float(loss.detach())}


def training_windows(model: DenseCLIPModel, dataset, limit: int | None = None, batch: int = 64
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached (pooled (N, d), dense (N, d, h, w), masks (N, H, W) uint8) of every model-size window of the set's
    images, cut without overlap after the pipeline's resize (the set's ``default_short_side``, else each image's own
    size, as ``segment-eval``); masks resized nearest."""
    from ..models.dense import DenseSpec, dense_transform, window_starts

    tower = model.tower
    (wh, ww) = tower.image_size
    transforms: dict = {}
    windows, masks = [], []
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for index in range(count):
        image = dataset.load_image(index)
        short = dataset.default_short_side or min(image.size)  # the set's resize, else each image's own size
        if short not in transforms:
            transforms[short] = dense_transform(model.backbone, DenseSpec(input="sliding", resolution=short))
        tensor = transforms[short](image)
        height, width = tensor.shape[-2:]
        mask = torch.from_numpy(np.asarray(dataset.load_mask(index)))[None, None].float()
        mask = F.interpolate(mask, size=(height, width), mode="nearest")[0, 0].to(torch.uint8)
        for top in window_starts(height, wh, wh):
            for left in window_starts(width, ww, ww):
                windows.append(tensor[:, top:top + wh, left:left + ww])
                masks.append(mask[top:top + wh, left:left + ww])
    if not windows:
        raise CliplabError("denseclip: the training set has no images")
    pooled, dense = [], []
    for start in range(0, len(windows), batch):
        p, d = model.visual(torch.stack(windows[start:start + batch]))
        pooled.append(p.cpu())
        dense.append(d.cpu())
    return torch.cat(pooled), torch.cat(dense), torch.stack(masks)


def train_denseclip(backbone, dataset, out_dir: str | Path, *, epochs: int = 5, batch_size: int = 32,
                    lr: float = 1e-3, weight_decay: float = 1e-4, limit: int | None = None, seed: int = 0,
                    progress: bool = False, **model_options) -> tuple[DenseCLIPModel, dict]:
    """Train DenseCLIP on a labelled segmentation set (AdamW, cosine, through ``run_training``; resumable from
    ``out_dir/train_state``) and save it in ``out_dir``. Returns the model and a summary."""
    import time

    from ..train.engine import TrainSettings, run_training

    names = list(dataset.class_names)
    model = DenseCLIPModel(backbone, names, seed=seed, **model_options)
    began = time.perf_counter()
    pooled, dense, masks = training_windows(model, dataset, limit)
    n = len(masks)
    steps = max(1, math.ceil(n / batch_size))

    def data(epoch: int, start: int = 0):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for b in range(start, steps):
            idx = torch.from_numpy(order[b * batch_size:(b + 1) * batch_size])
            yield {"pooled": pooled[idx], "dense": dense[idx], "mask": masks[idx]}

    identity = json.dumps({"method": "denseclip", "config": model.config, "data": dataset.describe(),
                           "limit": limit, "batch_size": batch_size}, sort_keys=True, default=str)
    settings = TrainSettings(epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed, progress=progress,
                             checkpoint_dir=Path(out_dir) / "train_state", desc="denseclip", identity=identity)
    result = run_training(model, DenseCLIPObjective(), data, settings)
    model.eval()
    summary = {"windows": n, "epochs": epochs, "steps": result.steps, "loss": result.last_loss,
               "seconds": time.perf_counter() - began, "train_classes": names, "dataset": dataset.describe()}
    model.save(out_dir, {"train": summary})
    return model, summary
