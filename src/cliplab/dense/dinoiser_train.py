"""CLIP-DINOiser's light 3x3 conv (``obj_proj``): CLIP's layer -3 features trained to mimic DINO's correlations.

As the authors' ``CLIP_DINOiser`` (wysoczanska/clip_dinoiser ``models/clip_dinoiser/clip_dinoiser.py``): the input
is the output of block ``layer``'s ``ln_2`` (their forward hook on ``resblocks[-3].ln_2``: the normalised stream
after that block's attention, before its MLP), patch tokens as a (width, h, w) map; ``obj_proj`` is
``Conv2d(width, dim=256, 3, padding=1, padding_mode="replicate")``; its outputs are L2-normalised per patch and
their patch-to-patch cosines are the correlations that replace DINO's at inference (thresholded at gamma and
pooled exactly as DINO's: ``cliplab.dense.dinoiser``).

Training (their repository releases the trained weights, not the training code; this follows the paper): the conv
is fitted on unlabelled images so its correlations predict the guidance encoder's binarised correlations
``1[A_dino > gamma]`` with binary cross-entropy, ``BCE(clamp(A_conv, eps, 1 - eps), 1[A_dino > gamma])`` averaged
over all patch pairs (:func:`correlation_loss`); CLIP and the guidance encoder stay frozen, their features are
computed once per image (model-size centre crops), and the conv trains through the one loop (``run_training``).
Where the guidance grid differs from CLIP's, the guidance features are resized bilinearly to CLIP's grid first.

Not reproduced: the 1x1 background conv (``bkg_decoder``), trained in the paper against FOUND's saliency, which
is not available here; the pipeline's ``--background-threshold`` gives the background instead.
Saved as safetensors (the conv's weights) with a JSON beside it (model id, layer, sizes); a file trained for
another model is refused in one line. ``cliplab segment --method dinoiser --param conv=FILE`` uses it (then no
DINO checkpoint is needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CliplabError, ModelLoadError

EPS = 1e-6


class GuidanceConv(torch.nn.Module):
    """The authors' ``obj_proj``: a ``kernel`` x ``kernel`` conv (replicate padding) from CLIP's width to ``dim``."""

    def __init__(self, width: int, dim: int = 256, kernel: int = 3):
        super().__init__()
        self.width, self.dim, self.kernel = width, dim, kernel
        self.conv = torch.nn.Conv2d(width, dim, (kernel, kernel), padding=kernel // 2, padding_mode="replicate")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)


def conv_correlations(conv: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """(n, width, h, w) CLIP features -> (n, h*w, h, w) cosines of the conv's outputs (their ``forward_pass``)."""
    out = conv(features)
    n, dim, h, w = out.shape
    flat = F.normalize(out.reshape(n, dim, -1), dim=1)
    return torch.einsum("ndp,ndq->npq", flat, flat).reshape(n, h * w, h, w)


def correlation_loss(predicted: torch.Tensor, target: torch.Tensor, gamma: float = 0.2) -> torch.Tensor:
    """Mean binary cross-entropy of predicted correlations (clamped to [eps, 1 - eps]) against ``target > gamma``."""
    labels = (target > gamma).to(predicted.dtype)
    return F.binary_cross_entropy(predicted.clamp(EPS, 1 - EPS), labels)


def clip_intermediate(tower, images: torch.Tensor, layer: int = -3) -> torch.Tensor:
    """The output of block ``layer``'s second norm (``ln_2`` / ``layer_norm2``) for the patch tokens:
    (n, width, h, w)."""
    last = tower.resolve_layer(layer)
    blocks = getattr(tower, "blocks", None)
    if blocks is None:
        blocks = getattr(getattr(tower, "vision", None), "encoder", None)
        blocks = getattr(blocks, "layers", None)
    if blocks is None:
        raise CliplabError(f"{tower.name}: the trained guidance conv needs a ViT tower block by block")
    norm = getattr(blocks[last], "ln_2", None) or getattr(blocks[last], "layer_norm2", None)
    if norm is None:
        raise CliplabError(f"{tower.name}: block {last} has no second norm (ln_2) to read")
    seen = {}
    handle = norm.register_forward_hook(lambda module, args, out: seen.__setitem__("x", out))
    try:
        h, w = tower.grid_of(images)
        x = tower.embed(images)
        for index in range(last + 1):
            x = tower.block(index, x)
    finally:
        handle.remove()
    out = seen["x"]
    if out.shape[0] != images.shape[0]:  # sequence-first blocks
        out = out.transpose(0, 1)
    return out[:, 1:].reshape(out.shape[0], h, w, -1).permute(0, 3, 1, 2).float()


class GuidanceConvObjective:
    """BCE of the conv's correlations against the guidance's binarised correlations (precomputed per batch)."""

    def __init__(self, gamma: float = 0.2):
        self.gamma = gamma

    def __call__(self, module: GuidanceConv, batch: dict):
        loss = correlation_loss(conv_correlations(module, batch["features"]), batch["targets"], self.gamma)
        return loss, {}


def _load(item):
    from PIL import Image

    if isinstance(item, (str, Path)):
        with Image.open(item) as image:
            return image.convert("RGB")
    return item.convert("RGB")


@torch.no_grad()
def guidance_targets(backbone, guidance, images, *, layer: int = -3, batch_size: int = 16
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's layer features (n, width, h, w) and the guidance's correlations (n, h*w, h, w) on CLIP's grid, for
    unlabelled images (PIL images, paths, or a dataset with ``load_image``), each the model's centre crop."""
    from ..dense.dinoiser import guidance_correlations
    from ..models.dense import dense_tower

    tower = dense_tower(backbone)
    count = len(images)
    fetch = images.load_image if hasattr(images, "load_image") else (lambda i: images[i])
    feats, targets = [], []
    model = backbone.model
    training = model.training
    model.eval()
    try:
        for start in range(0, count, batch_size):
            batch = torch.stack([backbone.preprocess(_load(fetch(i))) for i in range(start, min(count,
                                                                                               start + batch_size))])
            batch = batch.to(backbone.device, torch.float32)
            f = clip_intermediate(tower, batch, layer)
            g = guidance(batch).float()
            if g.shape[-2:] != f.shape[-2:]:
                g = F.interpolate(g, size=f.shape[-2:], mode="bilinear", align_corners=False)
            feats.append(f.cpu())
            targets.append(guidance_correlations(g, None).cpu())
    finally:
        model.train(training)
    if not feats:
        raise CliplabError("no images to train the guidance conv on")
    return torch.cat(feats), torch.cat(targets)


def train_guidance_conv(backbone, guidance, images, *, layer: int = -3, dim: int = 256, kernel: int = 3,
                        gamma: float = 0.2, steps: int = 200, lr: float = 1e-3, batch_size: int = 16, seed: int = 0,
                        checkpoint_dir=None, progress: bool = True) -> GuidanceConv:
    """Fit the 3x3 conv on unlabelled ``images`` to mimic ``guidance``'s correlations (module docstring)."""
    from ..train.engine import TrainSettings, run_training

    feats, targets = guidance_targets(backbone, guidance, images, layer=layer)
    torch.manual_seed(seed)
    conv = GuidanceConv(feats.shape[1], dim, kernel)
    n = len(feats)

    def data(epoch: int):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for start in range(0, n, batch_size):
            idx = torch.from_numpy(order[start:start + batch_size])
            yield {"features": feats[idx], "targets": targets[idx]}

    settings = TrainSettings(steps=steps, lr=lr, seed=seed, desc="dinoiser conv", checkpoint_dir=checkpoint_dir,
                             progress=progress)
    run_training(conv, GuidanceConvObjective(gamma), data, settings)
    conv.layer = layer
    return conv.cpu().eval()


def save_guidance_conv(conv: GuidanceConv, path: str | Path, backbone, layer: int = -3) -> Path:
    """The conv's weights (safetensors) and a JSON beside them (model id, layer, sizes)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in conv.state_dict().items()}, str(path))
    meta = {"method": "dinoiser-guidance-conv", "model_id": backbone.model_id,
            "layer": int(getattr(conv, "layer", layer)), "width": conv.width, "dim": conv.dim, "kernel": conv.kernel}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return path


def load_guidance_conv(path: str | Path, backbone=None) -> GuidanceConv:
    """A saved :class:`GuidanceConv` (``.layer`` set from its JSON); one trained for another model is refused."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise ModelLoadError(f"guidance conv not found: {path} (and its .json)")
    meta = json.loads(meta_path.read_text())
    if backbone is not None and meta.get("model_id") != backbone.model_id:
        raise ModelLoadError(f"{path}: guidance conv trained for model {meta.get('model_id')}, "
                             f"not {backbone.model_id}")
    conv = GuidanceConv(int(meta["width"]), int(meta["dim"]), int(meta["kernel"]))
    try:
        conv.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise ModelLoadError(f"{path}: not a guidance conv of its JSON's sizes") from exc
    conv.layer = int(meta["layer"])
    return conv.eval()
