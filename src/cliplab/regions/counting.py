"""Counting by blockwise classification: CLIP-EBC (paper 49; the authors' ``models/clip/model.py`` is the reference).

An image is cut into ``block`` x ``block`` pixel blocks (its sides first resized to whole blocks). Each block gets
a feature in the joint space, ``f = normalize(W x)`` with ``x`` the block's CLIP embedding and ``W`` a trainable
linear map initialised to the identity; the bin prompts ("There is no object.", "There is one object.", ...,
"There are more than four objects.", :mod:`.ebc_loss`) are embedded once by the frozen text tower (the authors'
default, ``freeze_text_encoder``); ``p = softmax(s cos(f, t_k))`` with a trainable ``s = exp(logit_scale)``
initialised to 1/0.07 as theirs; the block count is ``sum_k p_k anchor_k`` and the image count the sum of the
density map.

Two ways to a block's embedding (``blocks``):

- ``tiles``: every block is cropped, resized to the model's input size and embedded by the image tower (any
  tower, ResNets included). This is the one for 32-px models (``recipe:cifar10-signal``), whose input is one
  block: a 192-px scene is 6 x 6 blocks of 32 px, each seen at the model's own resolution.
- ``patches``: the whole image goes through a ViT once (positional embeddings resampled to its grid, as the
  authors' ``_interpolate_pos_embed``), and the projected patch tokens are averaged over each block (``block`` a
  multiple of the patch size). ViT image towers only (open_clip and Hugging Face); anything else is one line.

Visual prompt tuning (``num_vpt`` > 0; ViT towers only): ``num_vpt`` learned tokens per block of the tower
(``deep_vpt``) or before the first one (shallow: the prompt outputs carry on, as theirs), inserted after the class
token, initialised uniformly in +-sqrt(6 / (3 patch + width)) as theirs. Without VPT the tower is frozen and each
block's embedding is computed once before training.

Departures from the authors' model, for a CPU budget: the image encoder stays frozen (their ResNet variants train
it, with a decoder of residual blocks); their decoder and 1x1 projection become the one identity-initialised
linear map (an untrained counter is then CLIP's own zero-shot blockwise classification); blocks come from the
model's embedding of a tile or a pooled patch grid rather than an upsampled feature map. The loss, bins, anchors
and prompts are theirs (:mod:`.ebc_loss`). Training goes through ``train.engine.run_training`` (objective
``clip-ebc``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import CliplabError, ModelMismatchError
from ..fileio import atomic_write, atomic_write_text
from ..models.backbone import Backbone
from ..train.engine import TrainResult, TrainSettings, register_objective, run_training
from .ebc_loss import (
    COUNT_LOSSES,
    average_anchors,
    bin_prompt,
    check_bins,
    ebc_loss,
    expected_count,
    fine_bins,
    middle_anchors,
)

BLOCK_MODES = ("tiles", "patches")
ANCHOR_MODES = ("average", "middle")
FORMAT = "cliplab-counter/1"
FEATURE_BATCH = 256  # tiles embedded at most this many at a time


class CountingUnsupportedError(CliplabError):
    """The counter cannot run on this model or input (one line)."""


@dataclass(frozen=True)
class CounterConfig:
    """A CLIP-EBC counter: ``block`` pixels per block, ``blocks`` tiles | patches, fine bins up to
    ``truncation``, ``anchors`` average | middle, the counted ``noun`` (and its ``plural``), ``prompt_type`` word |
    number, ``num_vpt`` prompt tokens (0: none) per block (``deep_vpt``) or shallow; the loss: ``count_loss``
    dmcount | mae | mse weighted by ``weight_count``."""

    block: int = 32
    blocks: str = "tiles"
    truncation: int = 4
    anchors: str = "average"
    noun: str = "object"
    plural: str | None = None
    prompt_type: str = "word"
    num_vpt: int = 0
    deep_vpt: bool = True
    count_loss: str = "dmcount"
    weight_count: float = 1.0

    def __post_init__(self):
        if self.blocks not in BLOCK_MODES:
            raise CliplabError(f"count blocks must be one of {', '.join(BLOCK_MODES)}; got {self.blocks!r}")
        if self.anchors not in ANCHOR_MODES:
            raise CliplabError(f"count anchors must be one of {', '.join(ANCHOR_MODES)}; got {self.anchors!r}")
        if self.count_loss not in COUNT_LOSSES:
            raise CliplabError(f"count loss must be one of {', '.join(COUNT_LOSSES)}; got {self.count_loss!r}")
        if self.block < 1 or self.num_vpt < 0 or self.truncation < 1:
            raise CliplabError("count block and truncation must be at least 1, num_vpt at least 0")

    @property
    def bins(self) -> list[tuple[float, float]]:
        return fine_bins(self.truncation)

    def prompts(self) -> list[str]:
        return [bin_prompt(low, high, self.noun, self.plural, self.prompt_type) for low, high in self.bins]


def model_input_size(backbone: Backbone) -> tuple[int, int]:
    """(height, width) of the model's input, from its preprocessing config."""
    size = backbone.preprocess_config.get("size", 224)
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


class EBCCounter(torch.nn.Module):
    """CLIP-EBC on a frozen backbone (module docstring). ``forward(images)`` (B, 3, H, W), normalised, sides whole
    blocks -> (bin logits (B, K, h, w), block counts (B, 1, h, w))."""

    def __init__(self, backbone: Backbone, config: CounterConfig = CounterConfig(),
                 anchors: Sequence[float] | None = None):
        super().__init__()
        self.backbone, self.config = backbone, config  # the backbone is not a submodule: it never trains here
        self.bins = check_bins(config.bins)
        anchors = middle_anchors(self.bins) if anchors is None else [float(a) for a in anchors]
        if len(anchors) != len(self.bins):
            raise CliplabError(f"{len(anchors)} anchors for {len(self.bins)} count bins")
        self._check_tower()
        dim = int(backbone.embed_dim)
        self.projection = torch.nn.Linear(dim, dim)
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(dim))
            self.projection.bias.zero_()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32))
        text = torch.as_tensor(backbone.encode_texts(config.prompts()), dtype=torch.float32)
        self.register_buffer("text_features", F.normalize(text, dim=-1))
        self.vpt = torch.nn.ParameterList()
        if config.num_vpt:
            width, depth, patch = self._vpt_shape()
            bound = math.sqrt(6.0 / float(3 * patch + width))
            for _ in range(depth if config.deep_vpt else 1):
                self.vpt.append(torch.nn.Parameter(torch.empty(config.num_vpt, width).uniform_(-bound, bound)))

    # -- checks -----------------------------------------------------------------------------------------------
    def _check_tower(self) -> None:
        cfg, name = self.config, self.backbone.info.name
        if cfg.blocks == "patches":
            tower = self._dense_tower()
            if cfg.block % tower.patch[0] or cfg.block % tower.patch[1]:
                raise CountingUnsupportedError(f"{name}: count block {cfg.block} px is not a multiple of the "
                                               f"{tower.patch[0]}-px patch")
        if cfg.num_vpt:
            self._vpt_shape()

    def _dense_tower(self):
        from ..errors import DenseFeaturesUnavailableError
        from ..models.dense import dense_tower

        try:
            tower = dense_tower(self.backbone)
            tower.check_path("final")  # a ResNet tower gives only MaskCLIP's value path
            return tower
        except DenseFeaturesUnavailableError as exc:
            raise CountingUnsupportedError(f"count --blocks patches needs a ViT image tower ({exc}); use --blocks "
                                           "tiles") from exc

    def _vpt_shape(self) -> tuple[int, int, int]:
        """(width, depth, patch) of the image tower VPT goes into; one line for towers that take no prompts."""
        if self.config.blocks == "patches":
            tower = self._dense_tower()
            width = int(tower.blocks[0].ln_1.normalized_shape[0]) if hasattr(tower.blocks[0], "ln_1") else \
                int(tower.blocks[0].layer_norm1.normalized_shape[0])
            return width, tower.depth, tower.patch[0]
        try:
            tower = self.backbone.image_tower()
        except CliplabError as exc:
            raise CountingUnsupportedError(f"count --vpt needs a ViT image tower: {exc}") from exc
        patch = getattr(getattr(self.backbone.model, "visual", None), "patch_size", 16)
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        return int(tower.width), int(tower.depth), int(patch)

    @property
    def trains_encoder_input(self) -> bool:
        """True when block embeddings depend on trained parameters (VPT), so they cannot be computed once."""
        return bool(self.config.num_vpt)

    # -- block embeddings -------------------------------------------------------------------------------------
    def block_features(self, images: torch.Tensor) -> torch.Tensor:
        """Block embeddings (B, h, w, d), unnormalised, of images (B, 3, H, W) whose sides are whole blocks."""
        block = self.config.block
        batch, _, height, width = images.shape
        if height % block or width % block:
            raise CliplabError(f"image size {height}x{width} is not a whole number of {block}-px blocks")
        h, w = height // block, width // block
        images = images.to(self.backbone.device, torch.float32)
        if self.config.blocks == "patches":
            return self._patch_features(images, h, w)
        tiles = images.unfold(2, block, block).unfold(3, block, block)  # (B, 3, h, w, block, block)
        tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, block, block)
        size = model_input_size(self.backbone)
        if tuple(tiles.shape[-2:]) != size:
            tiles = F.interpolate(tiles, size=size, mode="bicubic", align_corners=False, antialias=True)
        prompts = list(self.vpt) if self.config.num_vpt else None
        feats = torch.cat([self.backbone.forward_images(chunk, normalize=False, prompts=prompts)
                           for chunk in tiles.split(FEATURE_BATCH)])
        return feats.float().reshape(batch, h, w, -1)

    def _patch_features(self, images: torch.Tensor, h: int, w: int) -> torch.Tensor:
        tower = self._dense_tower()
        gh, gw = tower.grid_of(images)
        if not self.config.num_vpt:
            tokens = tower.tokens(images)
        else:
            x, m, carried = tower.embed(images), self.config.num_vpt, None
            for j in range(tower.depth):
                if j < len(self.vpt):
                    carried = self.vpt[j].unsqueeze(0).expand(x.shape[0], -1, -1).to(x)
                x = tower.block(j, torch.cat([x[:, :1], carried, x[:, 1:]], dim=1))
                carried, x = x[:, 1:1 + m], torch.cat([x[:, :1], x[:, 1 + m:]], dim=1)
            tokens = tower.head(x).reshape(x.shape[0], gh, gw, -1)
        pooled = F.adaptive_avg_pool2d(tokens.float().permute(0, 3, 1, 2), (h, w))  # blocks are whole patches
        return pooled.permute(0, 2, 3, 1)

    # -- counting ---------------------------------------------------------------------------------------------
    def forward_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin logits (B, K, h, w), block counts (B, 1, h, w)) from block embeddings (B, h, w, d)."""
        x = F.normalize(self.projection(feats), dim=-1)
        logits = self.logit_scale.exp() * x @ self.text_features.to(x).t()
        logits = logits.permute(0, 3, 1, 2)
        _, density = expected_count(logits, self.anchors)
        return logits, density

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_features(self.block_features(images))


# -- images -> tensors ----------------------------------------------------------------------------------------
def scene_size(width: int, height: int, block: int) -> tuple[int, int]:
    """(width, height) an image is resized to: each side rounded to whole blocks, at least one."""
    return max(block, round(width / block) * block), max(block, round(height / block) * block)


def image_tensor(backbone: Backbone, image: Image.Image, block: int) -> tuple[torch.Tensor, tuple[float, float]]:
    """(normalised (3, H, W) tensor with sides in whole blocks, (x, y) scale from the image to it)."""
    from torchvision.transforms import functional as TF

    config = backbone.preprocess_config
    if "mean" not in config or "std" not in config:
        raise CountingUnsupportedError(f"{backbone.info.name}: counting needs the model's normalisation (mean, "
                                       "std), which its preprocessing config does not give")
    image = image.convert("RGB")
    size = scene_size(*image.size, block)
    resized = image if size == image.size else image.resize(size, Image.BICUBIC)
    tensor = TF.normalize(TF.to_tensor(resized), [float(v) for v in config["mean"]], [float(v) for v in config["std"]])
    return tensor, (size[0] / image.size[0], size[1] / image.size[1])


@dataclass
class CountResult:
    """One image's count: ``total`` (= ``density.sum()``), the block ``density`` (h, w), bin probabilities
    (K, h, w), the block size and the (width, height) the image was counted at."""

    total: float
    density: np.ndarray
    probabilities: np.ndarray
    block: int
    size: tuple[int, int]
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"count": self.total, "block": self.block, "counted_size": list(self.size),
                "density": np.round(self.density, 4).tolist()}


def _result(logits: torch.Tensor, density: torch.Tensor, block: int, size: tuple[int, int]) -> CountResult:
    dens = density[0, 0].double().cpu().numpy()
    return CountResult(float(dens.sum()), dens, logits.softmax(dim=1)[0].cpu().numpy(), block, size)


@torch.no_grad()
def count_images(counter: EBCCounter, images: Sequence[Image.Image]) -> list[CountResult]:
    """Count each image (module docstring): total and block density map."""
    counter.eval()
    out = []
    for image in images:
        tensor, _ = image_tensor(counter.backbone, image, counter.config.block)
        logits, density = counter(tensor.unsqueeze(0))
        out.append(_result(logits, density, counter.config.block, (int(tensor.shape[-1]), int(tensor.shape[-2]))))
    return out


@torch.no_grad()
def embed_blocks(backbone: Backbone, images: Sequence[Image.Image], config: CounterConfig = CounterConfig()
                 ) -> list[torch.Tensor]:
    """Block embeddings (h, w, d) of each image, on the CPU: what a counter without VPT computes (and
    :func:`fit_counter` / :func:`count_features` accept), so several counters on one model embed the images once."""
    if config.num_vpt:
        raise CliplabError("block embeddings with VPT depend on the trained prompts: they cannot be computed once")
    counter = EBCCounter(backbone, config)
    return [counter.block_features(image_tensor(backbone, image, config.block)[0].unsqueeze(0))[0].cpu()
            for image in images]


@torch.no_grad()
def count_features(counter: EBCCounter, features: Sequence[torch.Tensor]) -> list[CountResult]:
    """Count images from their block embeddings (:func:`embed_blocks` with the counter's config)."""
    if counter.config.num_vpt:
        raise CliplabError("a counter with VPT counts images, not precomputed block embeddings")
    counter.eval()
    out = []
    for feats in features:
        logits, density = counter.forward_features(feats.unsqueeze(0).to(counter.anchors.device))
        h, w = feats.shape[:2]
        out.append(_result(logits, density, counter.config.block, (w * counter.config.block, h * counter.config.block)))
    return out


# -- training -------------------------------------------------------------------------------------------------
@register_objective("clip-ebc")
class EBCObjective:
    """CLIP-EBC's loss (:func:`.ebc_loss.ebc_loss`) on a batch of ``features`` or ``images`` with ``target``
    block counts and ``points``."""

    def __init__(self, bins, block: int, count_loss: str = "dmcount", weight_count: float = 1.0, **dm_options):
        self.bins, self.block, self.count_loss = check_bins(bins), int(block), count_loss
        self.weight_count, self.dm_options = float(weight_count), dm_options

    def __call__(self, module: EBCCounter, batch: dict):
        if "features" in batch:
            logits, density = module.forward_features(batch["features"])
        else:
            logits, density = module(batch["images"])
        loss, info = ebc_loss(logits, density, batch["target"], batch["points"], self.bins, self.block,
                              self.count_loss, self.weight_count, **self.dm_options)
        return loss, {k: float(v) for k, v in info.items() if k != "loss"}


@dataclass
class _Prepared:
    images: list[torch.Tensor]
    targets: list[torch.Tensor]
    points: list[torch.Tensor]


def _prepare(backbone: Backbone, scenes, block: int) -> _Prepared:
    from ..data.counting import block_counts

    images, targets, points = [], [], []
    for k in range(len(scenes)):
        scene = scenes[k]
        tensor, (sx, sy) = image_tensor(backbone, scene.image, block)
        pts = np.asarray(scene.points, dtype=np.float32).reshape(-1, 2) * np.array([sx, sy], dtype=np.float32)
        images.append(tensor)
        targets.append(torch.from_numpy(block_counts(pts, tensor.shape[-2], tensor.shape[-1], block))[None])
        points.append(torch.from_numpy(pts))
    return _Prepared(images, targets, points)


def fit_counter(backbone: Backbone, scenes, config: CounterConfig = CounterConfig(),
                settings: TrainSettings | None = None, *, batch_size: int = 8,
                features: Sequence[torch.Tensor] | None = None) -> tuple[EBCCounter, TrainResult]:
    """Train a CLIP-EBC counter on ``scenes`` (items with ``image`` and ``points``, e.g. ``data.counting``'s
    train split) through the one training loop; anchors ``average`` are the mean training block counts per bin.
    Scenes of one batch must share a size. ``features``: the scenes' block embeddings from :func:`embed_blocks`
    (same config), reused instead of embedding the scenes again (not with VPT)."""
    if len(scenes) == 0:
        raise CliplabError("fit_counter needs at least one training scene")
    settings = settings or TrainSettings(epochs=20, lr=1e-2, weight_decay=1e-4, seed=0, progress=False,
                                         desc="clip-ebc")
    data = _prepare(backbone, scenes, config.block)
    bins = check_bins(config.bins)
    anchors = (average_anchors(bins, torch.cat([t.flatten() for t in data.targets])) if config.anchors == "average"
               else middle_anchors(bins))
    counter = EBCCounter(backbone, config, anchors)
    if features is not None:
        if counter.trains_encoder_input:
            raise CliplabError("fit_counter: a counter with VPT embeds the scenes itself; give no features")
        if len(features) != len(data.images):
            raise CliplabError(f"fit_counter: {len(features)} precomputed block embeddings for {len(data.images)} "
                               "scenes")
        features = [torch.as_tensor(f, dtype=torch.float32) for f in features]
    elif not counter.trains_encoder_input:
        with torch.no_grad():
            features = [counter.block_features(img.unsqueeze(0))[0].cpu() for img in data.images]
    else:
        from ..train.engine import resolve_device

        backbone.to(resolve_device(settings.device))  # prompts run through the tower on the training device
    n, seed = len(data.images), settings.seed

    def batches(epoch: int, start: int = 0):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for b in range(start, math.ceil(n / batch_size)):
            idx = order[b * batch_size:(b + 1) * batch_size]
            batch = {"target": torch.stack([data.targets[i] for i in idx]), "points": [data.points[i] for i in idx]}
            if features is not None:
                batch["features"] = torch.stack([features[i] for i in idx])
            else:
                batch["images"] = torch.stack([data.images[i] for i in idx])
            yield batch

    objective = EBCObjective(bins, config.block, config.count_loss, config.weight_count)
    result = run_training(counter, objective, batches, settings)
    counter.to(backbone.device)
    counter.eval()
    return counter, result


# -- saving ---------------------------------------------------------------------------------------------------
def save_counter(counter: EBCCounter, folder: str | Path) -> Path:
    """Write ``counter.json`` (config, bins, anchors, model id) and ``counter.safetensors`` (trained tensors)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in counter.state_dict().items()
               if k != "text_features"}
    blob = save(tensors)
    atomic_write(folder / "counter.safetensors", lambda handle: handle.write(blob))
    record = {"format": FORMAT, "config": asdict(counter.config), "anchors": counter.anchors.tolist(),
              "prompts": counter.config.prompts(), "model_id": counter.backbone.model_id,
              "model": getattr(counter.backbone, "display_name", counter.backbone.info.name)}
    atomic_write_text(folder / "counter.json", json.dumps(record, indent=2))
    return folder


def load_counter(folder: str | Path, backbone: Backbone) -> EBCCounter:
    """A counter saved by :func:`save_counter`, on ``backbone`` (which must be the model it was trained on)."""
    from safetensors.torch import load

    folder = Path(folder)
    try:
        record = json.loads((folder / "counter.json").read_text())
        tensors = load((folder / "counter.safetensors").read_bytes())
    except (OSError, ValueError) as exc:
        raise CliplabError(f"{folder}: not a saved counter ({exc})") from exc
    if record.get("format") != FORMAT:
        raise CliplabError(f"{folder}: not a saved counter (format {record.get('format')!r})")
    if record.get("model_id") != backbone.model_id:
        raise ModelMismatchError(f"{folder}: the counter was trained on {record.get('model')} "
                                 f"({record.get('model_id')}); load that model with --model")
    try:
        config = CounterConfig(**record["config"])
        counter = EBCCounter(backbone, config, record["anchors"])
        counter.load_state_dict({**tensors, "text_features": counter.text_features}, strict=True)
    except (TypeError, KeyError, RuntimeError) as exc:
        raise CliplabError(f"{folder}: damaged counter ({str(exc).splitlines()[0]})") from exc
    return counter.eval()


# -- the image-level zero-shot baseline and the density picture ---------------------------------------------
@torch.no_grad()
def zero_shot_counts(backbone: Backbone, images: Sequence[Image.Image], max_count: int = 50, noun: str = "objects",
                     template: str = "a photo of {n} {noun}.") -> np.ndarray:
    """The baseline: each whole image (the model's own preprocessing) against "a photo of N objects." for N in
    0..``max_count`` (N in digits); the count is the best-matching N."""
    texts = [template.format(n=n, noun=noun) for n in range(max_count + 1)]
    weights = torch.as_tensor(backbone.encode_texts(texts), dtype=torch.float32)
    batch = torch.stack([backbone.preprocess(image.convert("RGB")) for image in images])
    feats = torch.as_tensor(backbone.encode_images(batch), dtype=torch.float32)
    return (feats @ weights.t()).argmax(dim=1).numpy()


def density_image(result: CountResult, image: Image.Image, alpha: float = 0.55) -> Image.Image:
    """The density map coloured (viridis, 0 to the largest block count) over the image, both at counted size."""
    from matplotlib import colormaps

    density = result.density
    peak = float(density.max()) if density.size and density.max() > 0 else 1.0
    colours = (colormaps["viridis"](density / peak)[..., :3] * 255).astype(np.uint8)
    overlay = Image.fromarray(colours).resize(result.size, Image.NEAREST)
    base = image.convert("RGB").resize(result.size, Image.BICUBIC)
    return Image.blend(base, overlay, alpha)
