"""Zero-shot anomaly maps: patch features of any backbone and the WinCLIP-style prompt baseline (issue 27 item 4).

Patch features (:func:`patch_features`), two ways:

- ``dense``: patch tokens in the joint space from ``models/dense.py`` (ViTs, and open_clip ResNets through
  MaskCLIP's RN value path at stride 32): the image resized to ``size`` x ``size`` (whole patches; positional
  embeddings resampled), MaskCLIP's value path of the last block by default (``path``; zero-shot localisation
  reads it, as MaskCLIP and GL-MCM), L2-normalised, grid (size/patch)^2;
- ``windows``: any backbone (ResNets included), WinCLIP's window embeddings: the image resized to ``size``,
  windows of the model's input side every half window, each embedded as an image through ``encode_images``; the
  grid cell of half-window side takes the renormalised mean of the windows covering it (the average of window
  scores, as ``models/dense.py``'s sliding input; WinCLIP aggregates window scores harmonically and over several
  window scales: one scale and the mean here).

``auto`` picks ``dense`` where the backbone has a dense tower, else ``windows`` (for a small-input ResNet,
``windows`` gives the finer grid: half-window cells instead of stride-32 ones). The global feature is the
backbone's ``encode_images`` of the whole image.

Baseline (:class:`PromptBaseline`): WinCLIP-style compositional prompts, state words x templates for "normal"
and "anomalous" (phrasing of WinCLIP's appendix lists, a subset), each state's text embedding the renormalised
mean of its prompts; a patch's score is ``softmax(logit_scale * [f.t_normal, f.t_anomalous])[1]``, the image
score the same on the global feature (WinCLIP's zero-shot image score also adds the window maps' maximum: not
here). ``logit_scale`` is the model's own (CLIP's 100 for OpenAI weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import CliplabError, DenseFeaturesUnavailableError
from ..models.backbone import Backbone

MODES = ("auto", "dense", "windows")
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = ("a photo of a {}.", "a cropped photo of the {}.", "a close-up photo of a {}.",
             "a photo of the {} for visual inspection.", "a bright photo of a {}.", "a dark photo of the {}.")


@dataclass(frozen=True)
class PatchFeatures:
    """``global_`` (n, d) and ``patches`` (n, h, w, d), both L2-normalised float32 on the CPU; ``mode`` says how
    the patches were made and ``size`` at what input side."""

    global_: torch.Tensor
    patches: torch.Tensor
    mode: str
    size: int

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.patches.shape[1]), int(self.patches.shape[2])

    def take(self, rows) -> PatchFeatures:
        return PatchFeatures(self.global_[rows], self.patches[rows], self.mode, self.size)


def model_side(backbone: Backbone) -> int:
    """The model's square input side in pixels (its preprocessing ``size``)."""
    size = backbone.preprocess_config.get("size", 224)
    side = size if isinstance(size, int) else min(size)
    return int(side)


def resolve_mode(backbone: Backbone, mode: str) -> str:
    if mode not in MODES:
        raise CliplabError(f"patch feature mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode != "windows":
        from ..models.dense import dense_tower

        try:
            dense_tower(backbone)
            return "dense"
        except DenseFeaturesUnavailableError:
            if mode == "dense":
                raise
    return "windows"


def _encode(backbone: Backbone, tensors: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    out = [backbone.encode_images(torch.stack(tensors[i:i + batch_size])) for i in range(0, len(tensors), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def patch_features(backbone: Backbone, images: Sequence[Image.Image], *, mode: str = "auto", size: int | None = None,
                   path: str = "value", batch_size: int = 256) -> PatchFeatures:
    """Global and patch features of ``images`` (module docstring). ``size``: the input side (default: the model's
    for ``dense``, four times it for ``windows``)."""
    if not images:
        raise CliplabError("no images to score")
    mode = resolve_mode(backbone, mode)
    side = model_side(backbone)
    images = [image.convert("RGB") for image in images]
    global_ = _encode(backbone, [backbone.preprocess(image) for image in images], batch_size)
    if mode == "dense":
        from ..models.dense import DenseSpec, dense_tokens, dense_transform

        size = int(size or side)
        spec = DenseSpec(path=path, input="aspect", resolution=size)
        transform = dense_transform(backbone, spec)
        tensors = [transform(image.resize((size, size), Image.BICUBIC)) for image in images]
        patches = torch.cat([dense_tokens(backbone, torch.stack(tensors[i:i + batch_size]), spec)
                             for i in range(0, len(tensors), batch_size)])
        return PatchFeatures(global_, patches.float(), mode, size)
    return PatchFeatures(global_, _window_patches(backbone, images, int(size or 4 * side), side, batch_size),
                         mode, int(size or 4 * side))


def _window_patches(backbone: Backbone, images: Sequence[Image.Image], size: int, window: int, batch_size: int
                    ) -> torch.Tensor:
    """The image resized to ``size`` and normalised once; windows of the model's side are slices of it (what the
    model's own transform gives a crop of exactly its input side: no further resize), embedded in batches."""
    from torchvision.transforms import functional as TF

    from ..models.dense import window_starts

    stride = max(1, window // 2)
    if size < window or size % stride:
        raise CliplabError(f"windows: the input side {size} must be at least the window {window} and a multiple "
                           f"of the stride {stride}")
    config = backbone.preprocess_config
    if "mean" not in config or "std" not in config:
        raise CliplabError(f"{backbone.info.name}: window features need the model's normalisation (mean, std)")
    mean, std = [float(v) for v in config["mean"]], [float(v) for v in config["std"]]
    starts = window_starts(size, window, stride)
    offsets = [(top, left) for top in starts for left in starts]
    cells = size // stride
    crops = []
    for image in images:
        tensor = TF.normalize(TF.to_tensor(image.resize((size, size), Image.BICUBIC)), mean, std)
        crops.extend(tensor[:, top:top + window, left:left + window] for top, left in offsets)
    embedded = _encode(backbone, crops, batch_size).reshape(len(images), len(offsets), -1)
    total = torch.zeros((len(images), cells, cells, embedded.shape[-1]))
    for k, (top, left) in enumerate(offsets):
        total[:, top // stride:-(-(top + window) // stride), left // stride:-(-(left + window) // stride)] += \
            embedded[:, k, None, None]
    return F.normalize(total, dim=-1)


def upsample(maps: torch.Tensor, size: int | tuple[int, int], align_corners: bool = True) -> torch.Tensor:
    """(..., h, w) -> (..., H, W) bilinear (``align_corners=True`` as the authors' Bayes-PFL maps)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=align_corners)
    return out.reshape(*lead, *size)


@dataclass(frozen=True)
class AnomalyScores:
    """``scores`` (n,) image anomaly scores and ``maps`` (n, H, W) pixel scores, numpy-ready CPU tensors."""

    scores: torch.Tensor
    maps: torch.Tensor


class PromptBaseline:
    """The WinCLIP-style zero-shot prompt baseline (module docstring) for ``object_name``."""

    def __init__(self, backbone: Backbone, object_name: str = "texture"):
        if not str(object_name).strip():
            raise CliplabError("the object name must not be empty (e.g. --object texture)")
        self.backbone, self.object_name = backbone, str(object_name).strip()
        states = []
        for words in (NORMAL_STATES, ANOMALOUS_STATES):
            prompts = [t.format(w.format(self.object_name)) for w in words for t in TEMPLATES]
            states.append(F.normalize(backbone.encode_texts(prompts).float().mean(0), dim=-1))
        self.text = torch.stack(states)  # (2, d): normal, anomalous
        self.logit_scale = float(backbone.logit_scale)

    def score(self, features: PatchFeatures, out_size: int | tuple[int, int]) -> AnomalyScores:
        image = torch.softmax(self.logit_scale * features.global_ @ self.text.T, dim=-1)[:, 1]
        patch = torch.softmax(self.logit_scale * features.patches @ self.text.T, dim=-1)[..., 1]
        return AnomalyScores(image, upsample(patch, out_size))
