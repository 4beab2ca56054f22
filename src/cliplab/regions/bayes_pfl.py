"""Bayes-PFL: Bayesian prompt flow learning for zero-shot anomaly maps (paper 51, Qu et al., CVPR 2025).

Read against the authors' code, github.com/xiaozhen228/Bayes-PFL (``models/VPB.py``: ``Context_Prompting``,
``TextEncoder``; ``models/PFL.py``; ``loss.py``; ``train.py``; ``test.py``).

Prompts. A bank of ``prompt_num`` (B, 3) prompts; prompt b for a state is the text ``"X {object}."`` with X
replaced by ``context_len`` (P, 5) learned context vectors followed by ``state_len`` (Q, 5) learned state vectors,
normal or abnormal (initialised N(0, 0.02^2) truncated, N(0.5, ...) and N(-0.5, ...) as theirs). A sample
z of the image-specific flow (``regions/flows.py: ImageSpecificFlow`` on the image's global feature) is added to
every context vector, a sample of the image-agnostic normal/abnormal flow (``ImageAgnosticFlow``, the two sharing
one encoder as theirs) to every state vector; the text tower runs on the result and gives the normal and abnormal
text embeddings t_n, t_a of each prompt and sample.

Maps and scores. A patch feature f (``regions/anomaly.py: patch_features``, in the joint space) scores
``softmax(exp(tau_pixel) [f.t_n, f.t_a])`` per prompt pair, the logits upsampled bilinearly
(``align_corners=True``) to the output size before the softmax; the image score is
``softmax(exp(tau_image) [g.m(t_n), g.m(t_a)])`` with g the global image feature and m their ``class_mapping``
linear map (renormalised). At inference ``samples`` (5) draws of every flow give B x samples prompt pairs; the
anomaly map is the mean of their abnormal probabilities (their ``test.py``), the image score likewise; the
image-agnostic draws are made once per call (their cached ``zk_n``/``zk_a``), and the call is seeded.

Training (``fit_bayes_pfl``, objective ``"bayes-pfl"`` of the one loop): one draw per image; each step picks one
prompt index (their ``index_prompt``) and adds cross-entropy of the image score, their focal loss (gamma 2, mean
over anomalous pixels plus mean over normal ones) and dice loss (abnormal channel only) on the softmaxed pair,
``0.01 x`` each flow's KL term, and their orthogonality loss on the normal and the abnormal prompt embeddings.
Features come from the frozen image tower once, before training.

Departures (documented): one feature layer (the joint-space patch tokens) instead of four intermediate layers,
so no residual cross-modal attention (RCA) and no second stage (``image_mapping``, ``fuse``); one learning rate
(AdamW, betas (0.5, 0.999), no weight decay: their Adam has groups of 1e-3/1e-4/1e-2) with a 10% linear warm-up
and cosine, as theirs; no EMA or validation-driven early stop; masks and maps at ``map_size`` pixels instead of
518; the flow's sample lives in the text width (see ``regions/flows.py``).
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
from ..models.backbone import Backbone
from ..train.engine import TrainSettings, register_objective, run_training
from ..train.prompts import causal_length, context_tokens, run_short
from .anomaly import AnomalyScores, PatchFeatures, upsample
from .flows import ImageAgnosticFlow, ImageSpecificFlow

WHO = "bayes-pfl"
KL_WEIGHT = 0.01  # their loss_reg: 0.01 * kl for each of the three flows


def focal_loss(pred: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 1.0,
               eps: float = 1e-8) -> torch.Tensor:
    """The authors' ``FocalLoss``: ``pred`` (n, 2, H, W) probabilities, ``target`` (n, H, W) in {0, 1};
    ``-alpha (1 - p_t)^gamma log(p_t + eps)``, summed over anomalous pixels / their count plus summed over normal
    pixels / their count."""
    pt = torch.where(target > 0, pred[:, 1], pred[:, 0])
    loss = -alpha * (1 - pt) ** gamma * torch.log(pt + eps)
    fg = (target > 0).float()
    bg = 1 - fg
    return (loss * fg).sum() / (fg.sum() + eps) + (loss * bg).sum() / (bg.sum() + eps)


def dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The authors' ``DiceLoss`` (abnormal channel only): ``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)``."""
    p, t = pred[:, 1], target.float()
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def orthogonal_loss(text: torch.Tensor) -> torch.Tensor:
    """Their ``Orthogonal_Loss`` for ``text`` (n, 2, B, d): per state the mean over (n, B, B) of the squared
    cosines between different prompts (diagonal zeroed, counted in the mean), normal plus abnormal."""
    text = F.normalize(text, dim=-1)
    total = text.new_zeros(())
    eye = torch.eye(text.shape[2], device=text.device)
    for state in range(2):
        cos = torch.einsum("nbc,nkc->nbk", text[:, state], text[:, state]) ** 2
        total = total + (cos * (1 - eye)).mean()
    return total


class BayesPFL(nn.Module):
    """The prompt bank, the three flows, the temperatures and the class mapping (module docstring). The Backbone
    is a plain attribute: frozen, neither trained nor saved."""

    def __init__(self, backbone: Backbone, object_name: str = "texture", *, prompt_num: int = 3,
                 context_len: int = 5, state_len: int = 5, n_flows: int = 10, hidden: int | None = None,
                 seed: int = 0):
        super().__init__()
        if not str(object_name).strip():
            raise CliplabError(f"{WHO}: the object name must not be empty (e.g. --object texture)")
        for name, value in (("prompt_num", prompt_num), ("context_len", context_len), ("state_len", state_len),
                            ("n_flows", n_flows)):
            if not isinstance(value, int) or value < (0 if name == "n_flows" else 1):
                raise CliplabError(f"{WHO}: {name} must be a positive integer; got {value!r}")
        self.backbone = backbone
        self.config = {"object_name": str(object_name).strip(), "prompt_num": prompt_num, "context_len": context_len,
                       "state_len": state_len, "n_flows": n_flows, "hidden": hidden, "seed": seed}
        tokens, start = context_tokens(backbone, [self.config["object_name"]], context_len + state_len, WHO)
        with torch.no_grad():
            embedded = backbone.token_embeddings(tokens).detach().float()
        width, dim = int(embedded.shape[-1]), int(backbone.embed_dim)
        self.start, self.width = start, width
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :start], persistent=False)
        self.register_buffer("suffix", embedded[:, start + context_len + state_len:], persistent=False)
        self.length = causal_length(backbone, embedded, tokens)
        hidden = int(hidden or max(dim // 2, 16))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.prompt_context = nn.Parameter(torch.empty(prompt_num, context_len, width))
            self.state_normal = nn.Parameter(torch.empty(prompt_num, state_len, width))
            self.state_abnormal = nn.Parameter(torch.empty(prompt_num, state_len, width))
            self.temperature_pixel = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            self.temperature_image = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            self.context_flow = ImageSpecificFlow(dim, width, hidden, n_flows)
            self.normal_flow = ImageAgnosticFlow(dim, width, hidden, n_flows)
            self.abnormal_flow = ImageAgnosticFlow(dim, width, hidden, n_flows, encoder=self.normal_flow.encoder)
            self.class_mapping = nn.Linear(dim, dim)
            for module in (self.context_flow, self.normal_flow.encoder, self.class_mapping):
                for m in module.modules():  # their _initialize_weights: Linear N(0, 0.02^2), zero bias
                    if isinstance(m, nn.Linear):
                        m.weight.data.normal_(0.0, 0.02)
                        m.bias.data.zero_()
            nn.init.trunc_normal_(self.prompt_context, mean=0.0, std=0.02)
            nn.init.trunc_normal_(self.state_normal, mean=0.5, std=0.02)
            nn.init.trunc_normal_(self.state_abnormal, mean=-0.5, std=0.02)

    @property
    def prompt_num(self) -> int:
        return int(self.prompt_context.shape[0])

    def text_features(self, image_features: torch.Tensor, samples: int = 1, agnostic: tuple | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings (S, n, 2, B, d), L2-normalised (state 0 normal, 1 abnormal), and the summed KL terms of
        the three flows for ``image_features`` (n, d) with ``samples`` (S) draws; ``agnostic``: the normal and
        abnormal image-agnostic draws to use (else drawn here)."""
        ctx_draw = self.context_flow(image_features, samples)  # zk (S, n, W)
        normal, abnormal = agnostic or (self.normal_flow(samples), self.abnormal_flow(samples))  # zk (S, 1, W)
        n, bank = image_features.shape[0], self.prompt_num
        ctx = self.prompt_context[None, None] + ctx_draw.zk[:, :, None, None, :]  # (S, n, B, P, W)
        states = [(s[None, None] + d.zk[:, :, None, None, :]).expand(samples, n, -1, -1, -1)
                  for s, d in ((self.state_normal, normal), (self.state_abnormal, abnormal))]
        middle = torch.stack([torch.cat([ctx, st], dim=3) for st in states], dim=2)  # (S, n, 2, B, P+Q, W)
        rows = samples * n * 2 * bank
        middle = middle.reshape(rows, -1, self.width)
        embeddings = torch.cat([self.prefix.expand(rows, -1, -1), middle.to(self.prefix.dtype),
                                self.suffix.expand(rows, -1, -1)], dim=1)
        tokens = self.tokens.expand(rows, -1)
        if self.length is None:
            text = self.backbone.forward_text_embeddings(embeddings, tokens)
        else:
            text = F.normalize(run_short(self.backbone.text_tower(), embeddings, tokens, self.length), dim=-1)
        kl = KL_WEIGHT * (ctx_draw.kl() + normal.kl() + abnormal.kl())
        return text.float().reshape(samples, n, 2, bank, -1), kl

    def logits(self, text: torch.Tensor, global_: torch.Tensor, patches: torch.Tensor, out_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image logits (S, n, 2, B) and pixel logits (S, n, 2, B, H, W) upsampled to ``out_size``."""
        mapped = F.normalize(self.class_mapping(text), dim=-1)
        image = self.temperature_image.exp() * torch.einsum("snkbd,nd->snkb", mapped, global_)
        pixel = self.temperature_pixel.exp() * torch.einsum("snkbd,nhwd->snkbhw", text, patches)
        return image, upsample(pixel, out_size)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss for a batch ``{"global": (n, d), "patches": (n, h, w, d), "masks": (n, H, W),
        "labels": (n,)}`` (module docstring)."""
        global_, patches, masks = batch["global"], batch["patches"], batch["masks"]
        text, kl = self.text_features(global_, 1)
        image, pixel = self.logits(text, global_, patches, int(masks.shape[-1]))
        index = int(torch.randint(0, self.prompt_num, (1,)))
        ce = F.cross_entropy(image[0, :, :, index], batch["labels"])
        pred = torch.softmax(pixel[0, :, :, index], dim=1)
        seg = focal_loss(pred, masks) + dice_loss(pred, masks)
        ortho = orthogonal_loss(text[0])
        total = ce + seg + kl + ortho
        return total, {k: float(v.detach()) for k, v in (("ce", ce), ("seg", seg), ("kl", kl), ("ortho", ortho))}

    @torch.no_grad()
    def predict(self, features: PatchFeatures, out_size: int, *, samples: int = 5, seed: int = 0,
                batch_size: int = 16) -> AnomalyScores:
        """Image scores (n,) and maps (n, out_size, out_size): means of the abnormal probabilities over the
        prompt bank x ``samples`` draws, seeded by ``seed``."""
        if samples < 1:
            raise CliplabError(f"{WHO}: samples must be at least 1; got {samples}")
        training = self.training
        self.eval()
        device = self.prefix.device
        scores, maps = [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            agnostic = (self.normal_flow(samples), self.abnormal_flow(samples))
            for start in range(0, features.global_.shape[0], batch_size):
                part = features.take(slice(start, start + batch_size))
                global_, patches = part.global_.to(device), part.patches.to(device)
                text, _ = self.text_features(global_, samples, agnostic)
                image, pixel = self.logits(text, global_, patches, out_size)
                scores.append(torch.softmax(image, dim=2)[:, :, 1].mean(dim=(0, 2)).cpu())
                maps.append(torch.softmax(pixel, dim=2)[:, :, 1].mean(dim=(0, 2)).cpu())
        self.train(training)
        return AnomalyScores(torch.cat(scores), torch.cat(maps))

    def save(self, folder: str | Path) -> Path:
        """``bayes_pfl.safetensors`` (trained parameters) and ``bayes_pfl.json`` (config, model id) in ``folder``."""
        from safetensors.torch import save_file

        from ..fileio import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}  # the shared encoder twice
        save_file(state, str(folder / "bayes_pfl.safetensors"))
        atomic_write_text(folder / "bayes_pfl.json", json.dumps(
            {"method": WHO, "model_id": self.backbone.model_id, **self.config}, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, backbone: Backbone) -> BayesPFL:
        """A saved model for ``backbone`` (the model it was trained with, else one line)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path = folder / "bayes_pfl.json"
        if not meta_path.is_file():
            raise CliplabError(f"{folder} holds no Bayes-PFL model (bayes_pfl.json missing)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("model_id") != backbone.model_id:
            raise CliplabError(f"{folder} was trained with model {meta.get('model_id')}, not {backbone.model_id}")
        config = {k: meta[k] for k in ("prompt_num", "context_len", "state_len", "n_flows", "hidden", "seed")}
        model = cls(backbone, meta["object_name"], **config)
        model.load_state_dict(load_file(str(folder / "bayes_pfl.safetensors")))
        return model.to(backbone.device).eval()

    def with_object(self, object_name: str) -> BayesPFL:
        """The same trained prompts and flows for another object name (zero-shot to a new category)."""
        if object_name == self.config["object_name"]:
            return self
        other = BayesPFL(self.backbone, object_name, **{k: v for k, v in self.config.items() if k != "object_name"})
        other.load_state_dict(self.state_dict())
        return other.to(self.prefix.device).eval()


@register_objective("bayes-pfl")
class BayesPFLObjective:
    """``module.loss(batch)``: cross-entropy + focal + dice + 0.01 KL x 3 + orthogonality (module docstring)."""

    def __call__(self, module: BayesPFL, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return module.loss(batch)


def training_masks(masks: np.ndarray, map_size: int) -> torch.Tensor:
    """(n, H, W) bool masks -> (n, map_size, map_size) float {0, 1}: area-averaged, then > 0.5 (their threshold)."""
    tensor = torch.from_numpy(np.asarray(masks, dtype=np.float32))[:, None]
    return (F.interpolate(tensor, size=(map_size, map_size), mode="area")[:, 0] > 0.5).float()


def fit_bayes_pfl(backbone: Backbone, features: PatchFeatures, masks: np.ndarray, labels: np.ndarray, *,
                  object_name: str = "texture", epochs: int = 5, batch_size: int = 8, lr: float = 1e-3,
                  map_size: int = 64, seed: int = 0, progress: bool = False, **params) -> BayesPFL:
    """Train Bayes-PFL on auxiliary images (their features, exact masks and 0/1 labels) through the one loop."""
    n = features.global_.shape[0]
    if n == 0 or len(masks) != n or len(labels) != n:
        raise CliplabError(f"{WHO}: {n} feature rows, {len(masks)} masks and {len(labels)} labels do not match")
    if set(np.unique(labels)) - {0, 1}:
        raise CliplabError(f"{WHO}: labels must be 0 (normal) or 1 (anomalous)")
    model = BayesPFL(backbone, object_name, seed=seed, **params).to(backbone.device)
    targets = training_masks(masks, map_size)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)

    def data(epoch: int) -> list[dict]:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        return [{"global": features.global_[rows], "patches": features.patches[rows], "masks": targets[rows],
                 "labels": y[rows]} for rows in (order[s:s + batch_size] for s in range(0, n, batch_size))]

    steps = epochs * math.ceil(n / batch_size)  # per-step warm-up and cosine, as their transformers scheduler
    settings = TrainSettings(steps=steps, lr=lr, betas=(0.5, 0.999), weight_decay=0.0,
                             warmup_steps=max(0, int(0.1 * steps)), seed=seed, device=str(backbone.device),
                             progress=progress, desc=WHO)
    run_training(model, BayesPFLObjective(), data, settings)
    return model.eval()
