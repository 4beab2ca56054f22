"""OVSeg (Liang et al., CVPR 2023): CLIP classifies masked crops; mask prompt tuning; ensemble with a segmenter.

As the authors' ``open_vocab_seg/modeling/clip_adapter`` (facebookresearch/ov-seg):

- **Masked crops** (``MaskFormerClipAdapter._preprocess_image``, ``utils.crop_with_mask``): a mask is binarised at
  ``threshold`` (0.5), empty masks are dropped, the crop is the mask's bounding box (detectron2's
  ``get_bounding_boxes``: ``[x0, y0, x1 + 1, y1 + 1)``, grown about its centre by ``expand_ratio``, clipped to the
  image), pixels outside the mask are filled with the pixel mean (``mask_fill="mean"``: 0 once CLIP-normalised,
  which is what is filled here since the windows arrive normalised), and the crop is resized bicubically to the
  model's input size (masks: nearest). Boxes are masks that are 1 inside the box.
- **Mask prompt tuning** (their ``third_party/CLIP/clip/model.py: VisionTransformer.forward(x, m)``): the crop's
  mask is average-pooled per patch and rounded up (a patch with any mask pixel is kept); the patch tokens of blank
  patches are replaced by learnable tokens ``mask_embedding[0]`` (one per position) before the class token and
  positions are added, and after block ``i`` by ``mask_embedding[i + 1]`` for ``i + 1 < depth`` (default depth 3,
  zeros at init). Only the mask embedding trains (CLIP frozen), by cross-entropy of ``100 * cos`` against the
  class text weights on masked crops of a labelled set (:func:`train_mask_prompt`, the one training loop).
  open_clip ViT towers only; other towers are refused in one line.
- **Ensemble** (``ovseg_model.py``): ``p = p_seg ** (1 - lambda) * p_clip ** lambda`` (``clip_ensemble_weight``
  0.7), :func:`ensemble`.

As a dense method (``ovseg``): any registered dense method is the segmenter (``segmenter``, default maskclip);
its arg-max regions in each window are the mask proposals, each is classified by CLIP on its masked crop, and each
patch's probability is the ensemble of the segmenter's probability at that patch with its region's CLIP
probability, renormalised over the classes (the pipeline thresholds and averages probabilities); ``weights``
names a trained mask prompt (a file, or the directory ``cliplab segment-train --method ovseg`` wrote, through
``OVSeg.train_dense``). Departures: the
authors' proposals come from a trained MaskFormer with soft masks and their ensemble is per proposal (then
``einsum(mask_cls, mask_pred)``); here the proposals are the segmenter's hard regions and the ensemble is per
patch; the learned ``non_object_embedding`` (a "no object" class) is not reproduced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CliplabError, ModelLoadError
from .base import DenseContext, DenseMethod
from .registry import create_dense, register_dense

TEMPERATURE = 100.0  # their get_sim_logits: 100 * cosine


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of a non-empty boolean (H, W) mask, ``x1``/``y1`` exclusive (detectron2's boxes)."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def expand_box(box: tuple[int, int, int, int], ratio: float, height: int, width: int
               ) -> tuple[int, int, int, int]:
    """The box grown about its centre by ``ratio``, each coordinate truncated to an integer (their ``int()``),
    clipped to the image."""
    x0, y0, x1, y1 = box
    cx, cy, w, h = 0.5 * (x0 + x1), 0.5 * (y0 + y1), (x1 - x0) * ratio, (y1 - y0) * ratio
    return (max(int(cx - 0.5 * w), 0), max(int(cy - 0.5 * h), 0), min(int(cx + 0.5 * w), width),
            min(int(cy + 0.5 * h), height))


def boxes_to_masks(boxes, height: int, width: int) -> torch.Tensor:
    """(K, 4) pixel boxes ``(x0, y0, x1, y1)`` (exclusive ends) -> (K, H, W) float masks, 1 inside each box."""
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    out = torch.zeros((len(boxes), height, width))
    for k, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        out[k, max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)] = 1.0
    return out


def masked_crops(image: torch.Tensor, masks: torch.Tensor, size: tuple[int, int], *, expand_ratio: float = 1.0,
                 threshold: float = 0.5, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked crops of a CLIP-normalised image (3, H, W) for (K, H, W) masks: ``(regions (K', 3, h, w),
    region_masks (K', 1, h, w), valid (K,))``, K' the non-empty masks; outside the mask the crop is ``fill``
    (0: the pixel mean, normalised)."""
    if masks.ndim != 3 or masks.shape[-2:] != image.shape[-2:]:
        raise CliplabError(f"masks must be (K, H, W) at the image's size {tuple(image.shape[-2:])}; "
                           f"got {tuple(masks.shape)}")
    binary = masks > threshold
    valid = binary.flatten(1).any(dim=1)
    height, width = image.shape[-2:]
    regions, region_masks = [], []
    for mask in binary[valid]:
        x0, y0, x1, y1 = expand_box(mask_box(mask), expand_ratio, height, width)
        m = mask[y0:y1, x0:x1].to(image.dtype)[None]
        crop = image[:, y0:y1, x0:x1] * m + (1 - m) * fill
        regions.append(F.interpolate(crop[None], size=size, mode="bicubic", align_corners=False))
        region_masks.append(F.interpolate(m[None], size=size, mode="nearest"))
    if not regions:
        empty = image.new_zeros((0, 3, *size))
        return empty, image.new_zeros((0, 1, *size)), valid
    return torch.cat(regions), torch.cat(region_masks), valid


def ensemble(p_seg: torch.Tensor, p_clip: torch.Tensor, weight: float) -> torch.Tensor:
    """OVSeg's ``p_seg ** (1 - weight) * p_clip ** weight`` (unnormalised, as theirs)."""
    if not 0.0 <= weight <= 1.0:
        raise CliplabError(f"the OVSeg ensemble weight must lie in [0, 1]; got {weight}")
    return torch.pow(p_seg, 1 - weight) * torch.pow(p_clip, weight)


class MaskPrompt(torch.nn.Module):
    """Learnable mask tokens ``embedding`` (depth, grid positions, width), zeros at init (theirs)."""

    def __init__(self, depth: int, positions: int, width: int):
        super().__init__()
        if depth < 1:
            raise CliplabError(f"mask prompt depth must be at least 1; got {depth}")
        self.embedding = torch.nn.Parameter(torch.zeros(depth, positions, width))

    @property
    def depth(self) -> int:
        return int(self.embedding.shape[0])


def _vit(backbone):
    from ..models.dense import OpenClipTower, dense_tower

    tower = dense_tower(backbone)
    if not isinstance(tower, OpenClipTower) or getattr(tower.visual, "attn_pool", None) is not None:
        raise CliplabError(f"{backbone.info.name}: mask prompt tuning needs an open_clip ViT image tower "
                           f"(token pooling); this one is {type(getattr(backbone.model, 'visual', None)).__name__}")
    return tower


def mask_prompt_for(backbone, depth: int = 3) -> MaskPrompt:
    """A zero-initialised :class:`MaskPrompt` sized for ``backbone``'s ViT (refused in one line otherwise)."""
    tower = _vit(backbone)
    return MaskPrompt(min(depth, tower.depth + 1), tower.grid[0] * tower.grid[1], tower.visual.transformer.width)


def encode_regions(backbone, regions: torch.Tensor, region_masks: torch.Tensor | None = None,
                   prompt: MaskPrompt | None = None) -> torch.Tensor:
    """(K, d) L2-normalised image embeddings of model-size crops on the backbone's device, with autograd to
    ``prompt``; without a prompt, CLIP's own forward (any tower)."""
    model = backbone.model
    regions = regions.to(backbone.device, torch.float32)
    if prompt is None or region_masks is None:
        return F.normalize(model.encode_image(regions).float(), dim=-1)
    tower = _vit(backbone)
    visual = tower.visual
    if tuple(regions.shape[-2:]) != tower.image_size:
        raise CliplabError(f"mask prompt crops must be {tower.image_size}; got {tuple(regions.shape[-2:])}")
    embedding = prompt.embedding.to(regions)
    if embedding.shape[1] != tower.grid[0] * tower.grid[1] or embedding.shape[2] != visual.transformer.width:
        raise CliplabError(f"the mask prompt ({tuple(embedding.shape)}) does not fit {backbone.info.name}")
    m = F.avg_pool2d(region_masks.to(regions), tower.patch, stride=tower.patch)
    m = torch.ceil(m).reshape(m.shape[0], -1, 1)  # 1: the patch holds some mask, 0: blank
    x = visual.conv1(regions)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = x * m + embedding[0][None] * (1 - m)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(visual.patch_dropout(x))
    for index in range(tower.depth):
        x = tower.block(index, x)
        if index + 1 < prompt.depth:
            x = torch.cat([x[:, :1], x[:, 1:] * m + embedding[index + 1][None] * (1 - m)], dim=1)
    if getattr(visual, "final_ln_after_pool", False):
        pooled, _ = visual._global_pool(x)
        pooled = visual.ln_post(pooled)
    else:
        pooled, _ = visual._global_pool(visual.ln_post(x))
    return F.normalize((pooled @ visual.proj).float(), dim=-1)


def region_probabilities(features: torch.Tensor, text_weights: torch.Tensor, temperature: float = TEMPERATURE
                         ) -> torch.Tensor:
    """``softmax(temperature * cos)`` of (K, d) normalised embeddings against (d, C) text weights."""
    return torch.softmax(temperature * features @ text_weights.to(features), dim=-1)


def image_tensor(backbone, image) -> torch.Tensor:
    """A PIL image as a CLIP-normalised (3, H, W) tensor at its own size."""
    config = backbone.preprocess_config
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    return (array - mean) / std


@torch.no_grad()
def classify_regions(backbone, image, class_names: list[str], *, masks=None, boxes=None, templates="imagenet7",
                     prompt: MaskPrompt | None = None, expand_ratio: float = 1.0, cache_dir=None) -> np.ndarray:
    """(K, C) class probabilities of user masks (K, H, W) or boxes (K, 4) on a PIL image, by masked crops (rows of
    empty masks are NaN)."""
    from ..features.text import class_weights
    from ..models.dense import dense_tower

    tensor = image_tensor(backbone, image)
    height, width = tensor.shape[-2:]
    if (masks is None) == (boxes is None):
        raise CliplabError("classify_regions takes masks or boxes (one of them)")
    masks = boxes_to_masks(boxes, height, width) if boxes is not None else torch.as_tensor(np.asarray(masks),
                                                                                          dtype=torch.float32)
    size = dense_tower(backbone).image_size
    regions, region_masks, valid = masked_crops(tensor, masks, size, expand_ratio=expand_ratio)
    weights = torch.from_numpy(class_weights(backbone, list(class_names), templates, cache_dir=cache_dir))
    out = np.full((len(masks), len(class_names)), np.nan, dtype=np.float32)
    if len(regions):
        feats = encode_regions(backbone, regions, region_masks, prompt).cpu()
        out[valid.numpy()] = region_probabilities(feats, weights).numpy()
    return out


def save_mask_prompt(prompt: MaskPrompt, path: str | Path, backbone) -> Path:
    """Write the mask tokens (safetensors) and a JSON beside them naming the model they were trained for."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embedding": prompt.embedding.detach().cpu().contiguous()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"method": "ovseg-mask-prompt", "model_id": backbone.model_id,
                                                      "shape": list(prompt.embedding.shape)}, indent=1))
    return path


def load_mask_prompt(path: str | Path, backbone=None) -> MaskPrompt:
    """A saved :class:`MaskPrompt`; with ``backbone``, one trained for another model is refused in one line."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"mask prompt not found: {path}")
    embedding = load_file(str(path))["embedding"]
    meta_path = path.with_suffix(".json")
    if backbone is not None and meta_path.is_file():
        trained = json.loads(meta_path.read_text()).get("model_id")
        if trained and trained != backbone.model_id:
            raise ModelLoadError(f"{path}: mask prompt trained for model {trained}, not {backbone.model_id}")
    prompt = MaskPrompt(*embedding.shape)
    with torch.no_grad():
        prompt.embedding.copy_(embedding)
    return prompt


class MaskPromptObjective:
    """Cross-entropy of ``temperature * cos(crop, class)`` with the mask prompt in the image tower."""

    def __init__(self, backbone, text_weights: torch.Tensor, temperature: float = TEMPERATURE):
        self.backbone, self.text_weights, self.temperature = backbone, text_weights, temperature

    def __call__(self, module: MaskPrompt, batch: dict):
        feats = encode_regions(self.backbone, batch["regions"], batch["masks"], module)
        logits = self.temperature * feats @ self.text_weights.to(feats)
        loss = F.cross_entropy(logits, batch["labels"])
        return loss, {"acc": float((logits.argmax(1) == batch["labels"]).float().mean())}


def region_set(backbone, dataset, indices, *, expand_ratio: float = 1.0) -> tuple[torch.Tensor, ...]:
    """Masked crops of every class present in each indexed item of a segmentation set: regions, masks, labels."""
    from ..models.dense import dense_tower

    size = dense_tower(backbone).image_size
    regions, masks, labels = [], [], []
    for index in indices:
        tensor = image_tensor(backbone, dataset.load_image(int(index)))
        truth = torch.from_numpy(np.asarray(dataset.load_mask(int(index))).astype(np.int64))
        classes = [c for c in torch.unique(truth).tolist()
                   if c != dataset.ignore_index and c != dataset.background_index]
        if not classes:
            continue
        r, m, _ = masked_crops(tensor, torch.stack([(truth == c).float() for c in classes]), size,
                               expand_ratio=expand_ratio)
        regions.append(r)
        masks.append(m)
        labels.extend(classes)
    if not regions:
        raise CliplabError("no labelled regions to train the mask prompt on")
    return torch.cat(regions), torch.cat(masks), torch.tensor(labels)


def train_mask_prompt(backbone, dataset, *, depth: int = 3, epochs: int = 5, lr: float = 2e-3,
                      batch_size: int = 32, seed: int = 0, items: int | None = None, templates="imagenet7",
                      cache_dir=None, checkpoint_dir=None, progress: bool = False) -> tuple[MaskPrompt, dict]:
    """Mask prompt tuning on a labelled segmentation set (e.g. mosaic train): each class region of each item is a
    masked crop labelled by its class; only the mask tokens train (AdamW, cosine, through ``run_training``), CLIP
    stays frozen. Returns the prompt and a summary (regions, steps, last loss, seconds)."""
    import time

    from ..features.text import class_weights
    from ..train.engine import TrainSettings, run_training

    began = time.perf_counter()
    prompt = mask_prompt_for(backbone, depth)
    count = len(dataset) if items is None else min(items, len(dataset))
    regions, masks, labels = region_set(backbone, dataset, range(count))
    weights = torch.from_numpy(class_weights(backbone, list(dataset.class_names), templates, cache_dir=cache_dir))
    objective = MaskPromptObjective(backbone, weights)
    n = len(labels)
    steps = math.ceil(n / batch_size)

    def data(epoch: int, start: int = 0):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for b in range(start, steps):
            idx = torch.from_numpy(order[b * batch_size:(b + 1) * batch_size])
            yield {"regions": regions[idx], "masks": masks[idx], "labels": labels[idx]}

    identity = json.dumps({"method": "ovseg-mask-prompt", "depth": prompt.depth, "items": count,
                           "data": dataset.describe(), "batch_size": batch_size}, sort_keys=True, default=str)
    settings = TrainSettings(epochs=epochs, lr=lr, seed=seed, desc="ovseg mask prompt", progress=progress,
                             checkpoint_dir=checkpoint_dir, identity=identity)
    result = run_training(prompt, objective, data, settings)
    summary = {"windows": n, "epochs": epochs, "steps": result.steps, "loss": result.last_loss,
               "seconds": time.perf_counter() - began, "dataset": dataset.describe()}
    return prompt.cpu(), summary


PROMPT_FILE = "mask_prompt.safetensors"


def _prompt_path(weights: str | Path) -> Path:
    path = Path(weights)
    return path / PROMPT_FILE if path.is_dir() else path


@register_dense("ovseg", paper="Liang et al. 2023 (OVSeg)", needs=("tower", "text_weights", "guidance"))
class OVSeg(DenseMethod):
    """OVSeg: a segmenter's regions classified by CLIP on masked crops, ensembled p_seg^(1-l) * p_clip^l."""

    def __init__(self, segmenter: str = "maskclip", ensemble_weight: float = 0.7, weights: str = "",
                 expand_ratio: float = 1.0, temperature: float = 100.0):
        self.segmenter = segmenter
        self.ensemble_weight = ensemble_weight
        self.weights = weights
        self.expand_ratio = expand_ratio
        self.temperature = temperature

    def setup(self, context: DenseContext) -> None:
        if self.segmenter == "ovseg":
            raise CliplabError("ovseg's segmenter must be another dense method (maskclip, dinoiser, ...)")
        if not 0.0 <= self.ensemble_weight <= 1.0:
            raise CliplabError(f"ovseg ensemble_weight must lie in [0, 1]; got {self.ensemble_weight}")
        self.segmenter_ = create_dense(self.segmenter)
        self.segmenter_.setup(DenseContext(context.backbone, context.class_names,
                                           text_weights=context.text_weights if "text_weights"
                                           in self.segmenter_.needs else None,
                                           tower=context.tower if "tower" in self.segmenter_.needs else None,
                                           guidance=context.guidance if "guidance" in self.segmenter_.needs
                                           else None, cache_dir=context.cache_dir))
        self.prompt_ = load_mask_prompt(_prompt_path(self.weights), context.backbone) if self.weights else None
        super().setup(context)

    @classmethod
    def train_dense(cls, backbone, dataset, out_dir: str | Path, *, epochs: int = 5, batch_size: int = 32,
                    lr: float = 2e-3, seed: int = 0, progress: bool = False) -> dict:
        """Mask prompt tuning on a labelled set, saved in ``out_dir`` (``cliplab segment-train --method ovseg``);
        ``cliplab segment --method ovseg --param weights=out_dir`` uses it. Returns the training summary."""
        out_dir = Path(out_dir)
        prompt, summary = train_mask_prompt(backbone, dataset, epochs=epochs, lr=lr, batch_size=batch_size,
                                            seed=seed, checkpoint_dir=out_dir / "train_state", progress=progress)
        save_mask_prompt(prompt, out_dir / PROMPT_FILE, backbone)
        (out_dir / "train.json").write_text(json.dumps(summary, indent=1, default=str))
        return summary

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        context = self.context_
        tower = self._needs(context.tower, "image tower")
        weights = self._needs(context.text_weights, "text weights")
        p_seg = self.segmenter_.patch_scores(images).float()
        if self.ensemble_weight == 0.0:
            return p_seg
        ph, pw = tower.patch
        regions_of = p_seg.argmax(dim=1)  # (n, h, w) the segmenter's hard regions
        p_clip = torch.empty_like(p_seg)
        for i in range(images.shape[0]):
            classes = torch.unique(regions_of[i])
            patch_masks = torch.stack([(regions_of[i] == c) for c in classes]).float()  # (K, h, w)
            pixel_masks = patch_masks.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)
            crops, crop_masks, _ = masked_crops(images[i], pixel_masks, tower.image_size,
                                                expand_ratio=self.expand_ratio)
            feats = encode_regions(context.backbone, crops, crop_masks, self.prompt_)
            probs = region_probabilities(feats, weights, self.temperature).to(p_seg)  # (K, C)
            p_clip[i] = torch.einsum("kc,khw->chw", probs, patch_masks.to(p_seg))
        out = ensemble(p_seg, p_clip, self.ensemble_weight)
        return out / out.sum(dim=1, keepdim=True).clamp_min(1e-12)
