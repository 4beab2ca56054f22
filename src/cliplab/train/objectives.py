"""The registered training objectives: ``clip`` and ``siglip`` (open_clip's ClipLoss / SigLipLoss) and ``clipn``.

Each is ``objective(module, batch) -> (loss, logs)`` for ``train.engine.run_training``.

``clip`` / ``siglip``: ``module`` is a Backbone (trained through ``forward_images``/``forward_texts``) or an
open_clip model; ``batch`` is ``{"images": (n, 3, H, W), "tokens": (m, L)}`` with, when captions repeat in a
batch, ``"text_index"`` (n,) giving each image's row of ``tokens`` (each distinct caption is encoded once
and gathered: the loss and its gradients are the same). Features are L2-normalised and the loss is taken
in float32 outside autocast; after each step the logit scale is clamped to [0, ln 100] as open_clip does.

``clipn``: ``module`` is ``train.clipn.ClipnTrainable`` (the "no" text encoder and prompts, holding the
frozen CLIP); ``batch`` is ``{"image_features": (n, d), "tokens": (n, L)}``; each caption gets one of the
``n_prompts`` "no" prompts or their mean, drawn from torch's RNG (seeded per step by the engine); the loss
is the authors' 0.5 (ITBO_yes + ITBO_no + TSO) (``train/clipn.py``).
"""

from __future__ import annotations

import math

import torch

from ..errors import CliplabError
from .engine import register_objective

MAX_LOGIT_SCALE = math.log(100)


def _model(module) -> torch.nn.Module:
    return module if isinstance(module, torch.nn.Module) else module.model


def _image_features(module, images: torch.Tensor) -> torch.Tensor:
    if hasattr(module, "forward_images"):
        return module.forward_images(images, normalize=True)
    return module.encode_image(images, normalize=True)


def vit_tokens(visual, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features (n, d), patch tokens (n, p, d) in the joint space) from one pass of an open_clip
    ``VisionTransformer`` (its ``output_tokens`` switched on for the pass and restored)."""
    old = visual.output_tokens
    visual.output_tokens = True
    try:
        img, patches = visual(images)
    finally:
        visual.output_tokens = old
    if visual.proj is not None:
        patches = patches @ visual.proj
    return img, patches


def _text_features(module, tokens: torch.Tensor) -> torch.Tensor:
    if hasattr(module, "forward_texts"):
        return module.forward_texts(tokens, normalize=True)
    return module.encode_text(tokens, normalize=True)


class _Contrastive:
    """Shared by clip and siglip: the two towers' features of a batch, and the logit-scale clamp."""

    def features(self, module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = _image_features(module, batch["images"]).float()
        texts = _text_features(module, batch["tokens"]).float()
        index = batch.get("text_index")
        if index is not None:
            texts = texts[index]
        if texts.shape[0] != images.shape[0]:
            raise CliplabError(f"{self.name}: {images.shape[0]} images but {texts.shape[0]} captions in a batch "
                               "(give text_index to map images to caption rows)")
        return images, texts

    def after_step(self, module) -> None:
        with torch.no_grad():
            _model(module).logit_scale.clamp_(0, MAX_LOGIT_SCALE)


@register_objective("clip")
class ClipObjective(_Contrastive):
    """CLIP's symmetric InfoNCE (open_clip ``ClipLoss``) with the model's learned temperature."""

    def __init__(self):
        from open_clip.loss import ClipLoss

        self.loss = ClipLoss()

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        images, texts = self.features(module, batch)
        scale = _model(module).logit_scale.exp()
        with torch.autocast(images.device.type, enabled=False):
            loss = self.loss(images, texts, scale.float())
        return loss, {"logit_scale": float(scale.detach())}


@register_objective("siglip")
class SigLipObjective(_Contrastive):
    """SigLIP's pairwise sigmoid loss (open_clip ``SigLipLoss``); the model needs a ``logit_bias``."""

    def __init__(self):
        from open_clip.loss import SigLipLoss

        self.loss = SigLipLoss()

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        model = _model(module)
        bias = getattr(model, "logit_bias", None)
        if bias is None:
            raise CliplabError("siglip: the model has no logit_bias (build it with init_logit_bias, as "
                               "cliplab pretrain --loss siglip does)")
        images, texts = self.features(module, batch)
        scale = model.logit_scale.exp()
        with torch.autocast(images.device.type, enabled=False):
            loss = self.loss(images, texts, scale.float(), bias.float())
        return loss, {"logit_scale": float(scale.detach()), "logit_bias": float(bias.detach())}


@register_objective("clipn")
class ClipnObjective:
    """CLIPN's loss (paper 18): ITBO over matched / unmatched pairs plus TSO, with a random "no" prompt each."""

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        from .clipn import clipn_loss

        clipn = module.clipn
        tokens = batch["tokens"]
        with torch.no_grad():
            text_yes = clipn.backbone.forward_texts(tokens).float()
        choice = torch.randint(0, clipn.prompts.shape[0] + 1, (len(tokens),))
        text_no = clipn.forward_no(tokens, choice).float()
        feats = batch["image_features"].float()
        with torch.autocast(feats.device.type, enabled=False):
            loss = clipn_loss(feats, text_yes, text_no, clipn.logit_scale)
        return loss, {}

    def param_groups(self, module: torch.nn.Module, weight_decay: float) -> list[dict]:
        """The authors' split: weight decay on the matrices of the "no" text tower, none on embeddings,
        gains, biases and the prompts."""
        decay, rest = [], []
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if name != "prompts" and param.ndim >= 2 and "embedding" not in name:
                decay.append(param)
            else:
                rest.append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
