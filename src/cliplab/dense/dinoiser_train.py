"""CLIP-DINOiser's two light convs on CLIP's layer -3 features: ``obj_proj`` (3x3, mimics a DINO's correlations)
and ``bkg_decoder`` (1x1, mimics FOUND's foreground).

As the authors' ``CLIP_DINOiser`` (wysoczanska/clip_dinoiser ``models/clip_dinoiser/clip_dinoiser.py``): the input
is the output of block ``layer``'s ``ln_2`` (their forward hook on ``resblocks[-3].ln_2``: the normalised stream
after that block's attention, before its MLP), patch tokens as a (width, h, w) map; ``obj_proj`` is
``Conv2d(width, dim=256, 3, padding=1, padding_mode="replicate")``; its outputs are L2-normalised per patch and
their patch-to-patch cosines are the correlations that replace DINO's at inference (thresholded at gamma and
pooled exactly as DINO's: ``cliplab.dense.dinoiser``).

Correlation conv training: fitted on unlabelled images so its correlations predict the guidance encoder's binarised
correlations ``1[A_dino > gamma]`` with binary cross-entropy, ``BCE(clamp(A_conv, eps, 1 - eps), 1[A_dino >
gamma])`` averaged over all patch pairs (:func:`correlation_loss`); CLIP and the guidance encoder stay frozen, their
features are computed once per image (model-size centre crops), and the conv trains through the one loop
(``run_training``). Where the guidance grid differs from CLIP's, the guidance features are resized bilinearly to
CLIP's grid first. Departure: the authors' ``train.py`` (published after this was first written) applies
``BCEWithLogitsLoss`` to the cosines (negatives set to 0) as if they were logits; cliplab keeps the
probability form of the paper.

Background conv (``bkg_decoder``, :class:`BackgroundConv`): ``Conv2d(width, 1, 1)`` on the L2-normalised layer
features; its sigmoid is the probability that a patch is foreground. As their ``train.py``: trained with
``BCEWithLogitsLoss`` against binary foreground targets, AdamW at lr 0.01 (their ``found_lr``), a constant rate.
Their targets are FOUND's trained decoder's saliency (``sigmoid > 0.5``, resized to CLIP's grid); here they are
``1 - background`` of FOUND's training-free step (``cliplab.dense.found``: on the user's timm DINO, or CLIP's own
last block as a documented stand-in), resized bilinearly to CLIP's grid and thresholded at 0.5: FOUND's own
decoder and bilateral solver are skipped. At inference (``cliplab.dense.dinoiser``): patches whose best class
probability is below ``delta`` (0.99) and whose foreground probability is not above 0.5 become background.

Saved as safetensors (``conv.*`` the correlation conv, ``bkg_decoder.*`` the background conv, either or both) with
a JSON beside it (model id, layer, sizes, which convs it holds); a file trained for another model is refused in one
line. ``cliplab dinoiser-train [--background]`` writes it; ``cliplab segment --method dinoiser --param conv=FILE``
uses what it holds (then no DINO checkpoint is needed).
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


class BackgroundConv(torch.nn.Module):
    """The authors' ``bkg_decoder``: a 1x1 conv from CLIP's width to one foreground logit, on L2-normalised features."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.bkg_decoder = torch.nn.Conv2d(width, 1, (1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(n, width, h, w) layer features -> (n, 1, h, w) foreground logits."""
        return self.bkg_decoder(F.normalize(features.float(), dim=1))


def background_loss(logits: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits against the 0/1 foreground targets (their ``BCEWithLogitsLoss``)."""
    return F.binary_cross_entropy_with_logits(logits.float(), foreground.float())


class BackgroundObjective:
    """BCE with logits of the background conv against FOUND's foreground (precomputed per batch)."""

    def __call__(self, module: BackgroundConv, batch: dict):
        return background_loss(module(batch["features"]), batch["targets"]), {}


def _load(item):
    from PIL import Image

    if isinstance(item, (str, Path)):
        with Image.open(item) as image:
            return image.convert("RGB")
    return item.convert("RGB")


@torch.no_grad()
def _clip_targets(backbone, images, target, *, layer: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's layer features (n, width, h, w) of each image's centre crop and ``target(batch, features)`` of each."""
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
            feats.append(f.cpu())
            targets.append(target(batch, f).cpu())
    finally:
        model.train(training)
    if not feats:
        raise CliplabError("no images to train the dinoiser conv on")
    return torch.cat(feats), torch.cat(targets)


def guidance_targets(backbone, guidance, images, *, layer: int = -3, batch_size: int = 16
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's layer features (n, width, h, w) and the guidance's correlations (n, h*w, h, w) on CLIP's grid, for
    unlabelled images (PIL images, paths, or a dataset with ``load_image``), each the model's centre crop."""
    from ..dense.dinoiser import guidance_correlations

    def target(batch, f):
        g = guidance(batch).float()
        if g.shape[-2:] != f.shape[-2:]:
            g = F.interpolate(g, size=f.shape[-2:], mode="bilinear", align_corners=False)
        return guidance_correlations(g, None)

    return _clip_targets(backbone, images, target, layer=layer, batch_size=batch_size)


def foreground_targets(backbone, found, images, *, layer: int = -3, batch_size: int = 16
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's layer features (n, width, h, w) and FOUND's foreground (n, 1, h, w) on CLIP's grid: ``1 -
    found(batch)`` resized bilinearly where the grids differ, then ``> 0.5`` (``found``: a
    :class:`cliplab.dense.found.FoundBackground`)."""

    def target(batch, f):
        fg = 1.0 - found(batch).float()[:, None]
        if fg.shape[-2:] != f.shape[-2:]:
            fg = F.interpolate(fg, size=f.shape[-2:], mode="bilinear", align_corners=False)
        return (fg > 0.5).float()

    return _clip_targets(backbone, images, target, layer=layer, batch_size=batch_size)


def _batches(tensors: tuple[torch.Tensor, torch.Tensor], seed: int, batch_size: int):
    feats, targets = tensors
    n = len(feats)

    def data(epoch: int):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for start in range(0, n, batch_size):
            idx = torch.from_numpy(order[start:start + batch_size])
            yield {"features": feats[idx], "targets": targets[idx]}

    return data


def train_guidance_conv(backbone, guidance, images, *, layer: int = -3, dim: int = 256, kernel: int = 3,
                        gamma: float = 0.2, steps: int = 200, lr: float = 1e-3, batch_size: int = 16, seed: int = 0,
                        checkpoint_dir=None, progress: bool = True) -> GuidanceConv:
    """Fit the 3x3 conv on unlabelled ``images`` to mimic ``guidance``'s correlations (module docstring)."""
    from ..train.engine import TrainSettings, run_training

    tensors = guidance_targets(backbone, guidance, images, layer=layer)
    torch.manual_seed(seed)
    conv = GuidanceConv(tensors[0].shape[1], dim, kernel)
    settings = TrainSettings(steps=steps, lr=lr, seed=seed, desc="dinoiser conv", checkpoint_dir=checkpoint_dir,
                             progress=progress)
    run_training(conv, GuidanceConvObjective(gamma), _batches(tensors, seed, batch_size), settings)
    conv.layer = layer
    return conv.cpu().eval()


def train_background_conv(backbone, images, *, guidance=None, found_threshold: float = 0.3, layer: int = -3,
                          steps: int = 200, lr: float = 1e-2, batch_size: int = 16, seed: int = 0,
                          checkpoint_dir=None, progress: bool = True) -> BackgroundConv:
    """Fit the 1x1 background conv on unlabelled ``images`` to FOUND's foreground (module docstring): FOUND runs on
    ``guidance`` (a timm guidance encoder, e.g. the user's DINO) or, without it, on CLIP's own last block."""
    from ..models.dense import dense_tower
    from ..train.engine import TrainSettings, run_training
    from .found import FoundBackground

    found = FoundBackground(tower=dense_tower(backbone), guidance=guidance, threshold=found_threshold)
    tensors = foreground_targets(backbone, found, images, layer=layer)
    torch.manual_seed(seed)
    conv = BackgroundConv(tensors[0].shape[1])
    settings = TrainSettings(steps=steps, lr=lr, seed=seed, schedule="constant", desc="dinoiser background",
                             checkpoint_dir=checkpoint_dir, progress=progress)
    run_training(conv, BackgroundObjective(), _batches(tensors, seed, batch_size), settings)
    conv.layer, conv.found = layer, {"source": found.source, "threshold": found_threshold}
    return conv.cpu().eval()


def save_guidance_conv(conv: GuidanceConv | None, path: str | Path, backbone, layer: int = -3,
                       background: BackgroundConv | None = None) -> Path:
    """The convs' weights (safetensors: ``conv.*`` and/or ``bkg_decoder.*``) and a JSON beside them (model id,
    layer, sizes, which convs it holds)."""
    from safetensors.torch import save_file

    if conv is None and background is None:
        raise CliplabError("nothing to save: neither a correlation conv nor a background conv")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module in (conv, background):
        if module is not None:
            tensors.update({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    save_file(tensors, str(path))
    first = conv if conv is not None else background
    meta = {"method": "dinoiser-guidance-conv", "model_id": backbone.model_id,
            "layer": int(getattr(first, "layer", layer)), "width": first.width,
            "correlation": conv is not None, "background": background is not None}
    if conv is not None:
        meta.update(dim=conv.dim, kernel=conv.kernel)
    if background is not None:
        meta["found"] = getattr(background, "found", None)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return path


def load_dinoiser_convs(path: str | Path, backbone=None) -> tuple[GuidanceConv | None, BackgroundConv | None]:
    """The correlation conv and the background conv of a saved file (None for the one it does not hold; ``.layer``
    set from its JSON); a file trained for another model is refused."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise ModelLoadError(f"guidance conv not found: {path} (and its .json)")
    meta = json.loads(meta_path.read_text())
    if backbone is not None and meta.get("model_id") != backbone.model_id:
        raise ModelLoadError(f"{path}: guidance conv trained for model {meta.get('model_id')}, "
                             f"not {backbone.model_id}")
    state = load_file(str(path))
    conv = background = None
    try:
        if meta.get("correlation", True):
            conv = GuidanceConv(int(meta["width"]), int(meta["dim"]), int(meta["kernel"]))
            conv.load_state_dict({k: v for k, v in state.items() if k.startswith("conv.")})
            conv.layer = int(meta["layer"])
            conv.eval()
        if meta.get("background", False):
            background = BackgroundConv(int(meta["width"]))
            background.load_state_dict({k: v for k, v in state.items() if k.startswith("bkg_decoder.")})
            background.layer, background.found = int(meta["layer"]), meta.get("found")
            background.eval()
    except (RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"{path}: not a dinoiser conv file of its JSON's sizes") from exc
    return conv, background


def load_guidance_conv(path: str | Path, backbone=None) -> GuidanceConv:
    """A saved :class:`GuidanceConv` (``.layer`` set from its JSON); one trained for another model is refused."""
    conv, _ = load_dinoiser_convs(path, backbone)
    if conv is None:
        raise ModelLoadError(f"{path}: holds only a background conv, no correlation conv")
    return conv
