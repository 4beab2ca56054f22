"""Box scoring (OvarNet's inference side, paper 9): crops embedded through the backbone, a category softmax and
attribute sigmoids against prompted text, and the masked ("federated") BCE that trains an attribute head.

Departures from OvarNet (KyanChen/OvarNet): boxes are cropped from the image and embedded whole (no RoI features
of a detector); zero-shot attribute logits are ``scale * (cos_a - mean_a cos)``, centred per box over the
attribute vocabulary, because raw CLIP cosines sit in a narrow band and ``sigmoid(scale * cos)`` would be ~1 for
every attribute; a trained :class:`AttributeHead` learns a per-attribute bias instead. Several prompts per
attribute are averaged into one text embedding (``class_weights``) where OvarNet takes the largest logit over an
attribute's prompts. OvarNet's loss of a box set without any labelled pair is NaN (a mean over nothing); here 0.

Outside comparison (/work/compare/ovarnet/compare.py, KyanChen/OvarNet at 0a2ccd8, mmdet/mmcv imports stubbed,
float64 inputs, 5 random draws of 24 boxes x 15 attributes with labels pos/neg/unknown):
``PromptHead.get_classify_loss`` vs :func:`federated_bce` for balance_unk 0, 0.15 and 1, with and without the
frequency reweighting: loss max abs difference 1.5e-7 (theirs casts the labels to float32), gradients 7.7e-10;
``PromptHead.reweight_att`` vs :func:`attribute_frequency_weights` 1.8e-7. ``OvarNet.test_box_given`` with the
detector stubbed to return cliplab's crop embeddings (tiny model, 4 boxes, 5 attributes and 4 categories, one
prompt each) vs :class:`AttributeHead` at initialisation and ``scale * x @ W``: attribute logits 3.3e-7, category
logits 4.8e-7, softmax 1.0e-7 (logits up to 2.2). With three prompts per attribute their max-over-prompts and the
averaged embedding differ by up to 0.23 in attribute probability (the departure above).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..features.text import class_weights
from ..models.backbone import Backbone
from .birdet import BACKGROUND, background_embedding, partial_object_suppression, scores_with_background
from .boxes import check_boxes

ATTRIBUTE_TEMPLATES = ("a photo of a {} object.",)


def crop_boxes(image: Image.Image, boxes: np.ndarray) -> list[Image.Image]:
    """The ``[x, y, w, h]`` boxes cut out of ``image`` (edges rounded outwards, at least one pixel)."""
    crops = []
    for x, y, w, h in np.asarray(boxes, dtype=np.float64):
        left, top = int(np.floor(x)), int(np.floor(y))
        right, bottom = max(int(np.ceil(x + w)), left + 1), max(int(np.ceil(y + h)), top + 1)
        crops.append(image.crop((left, top, min(right, image.width), min(bottom, image.height))))
    return crops


def embed_boxes(backbone: Backbone, image: Image.Image, boxes: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """L2-normalised (n, d) embeddings of the box crops: the backbone's preprocessing and ``encode_images``."""
    crops = crop_boxes(image.convert("RGB"), boxes)
    out = [np.zeros((0, backbone.embed_dim), np.float32)]
    for start in range(0, len(crops), batch_size):
        batch = torch.stack([backbone.preprocess(c) for c in crops[start:start + batch_size]])
        out.append(backbone.encode_images(batch).numpy())
    return np.concatenate(out).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def category_probabilities(features: np.ndarray, weights: np.ndarray, scale: float) -> np.ndarray:
    """``softmax(scale * x @ W)`` over categories: (n, d) x (d, C) -> (n, C)."""
    return _softmax(scale * (np.asarray(features, np.float64) @ np.asarray(weights, np.float64)))


def attribute_probabilities(features: np.ndarray, weights: np.ndarray, scale: float) -> np.ndarray:
    """Zero-shot ``sigmoid(scale * (cos_a - mean_a cos))`` per box and attribute: (n, d) x (d, A) -> (n, A)."""
    cos = np.asarray(features, np.float64) @ np.asarray(weights, np.float64)
    return _sigmoid(scale * (cos - cos.mean(axis=1, keepdims=True)))


@dataclass
class RegionScores:
    """Per box: category probabilities (n, C) and attribute probabilities (n, A; A may be 0)."""

    boxes: np.ndarray
    labels: list[str]
    categories: np.ndarray
    attributes: list[str] = field(default_factory=list)
    attribute_probs: np.ndarray | None = None
    suppressed: list[int] = field(default_factory=list)

    @property
    def predicted(self) -> list[str]:
        """The best label per box (``background`` when BIRDet's background class is among the labels)."""
        return [self.labels[int(i)] for i in self.categories.argmax(axis=1)]

    def records(self, top: int = 5) -> list[dict]:
        """JSON-ready per-box records: box, best label, top categories and every attribute probability."""
        out = []
        for k, box in enumerate(self.boxes):
            order = np.argsort(-self.categories[k])[:top]
            record = {"box": [float(v) for v in box], "label": self.labels[int(order[0])],
                      "categories": {self.labels[int(i)]: float(self.categories[k, i]) for i in order}}
            if self.attributes:
                record["attributes"] = {a: float(p) for a, p in zip(self.attributes, self.attribute_probs[k])}
            record["suppressed"] = k in self.suppressed
            out.append(record)
        return out


def score_regions(backbone: Backbone, image: Image.Image, boxes: np.ndarray, labels: Sequence[str],
                  attributes: Sequence[str] = (), *, templates: str | Sequence[str] = "imagenet7",
                  attribute_templates: Sequence[str] = ATTRIBUTE_TEMPLATES, cache_dir: str | Path | None = None,
                  image_name: str = "image", background_mix: float | None = None,
                  suppress: float | None = None) -> RegionScores:
    """Score ``boxes`` ([x, y, w, h], checked against the image) against category and attribute prompts.

    ``background_mix`` adds BIRDet's image-conditioned background class (regions/birdet.py) as the last label;
    ``suppress`` marks boxes that partial-object suppression drops at that threshold (by predicted label;
    background boxes are never compared).
    """
    boxes = check_boxes(boxes, image.size, image_name)
    feats = embed_boxes(backbone, image, boxes)
    scale = backbone.logit_scale
    weights = class_weights(backbone, list(labels), templates, cache_dir=cache_dir)
    labels = list(labels)
    if background_mix is None:
        cats = category_probabilities(feats, weights, scale)
    else:
        text = class_weights(backbone, [BACKGROUND], templates, cache_dir=cache_dir)[:, 0]
        whole = embed_boxes(backbone, image, np.array([[0.0, 0.0, image.width, image.height]]))[0]
        cats = scores_with_background(feats, weights, background_embedding(text, whole, background_mix), scale)
        labels.append(BACKGROUND)
    suppressed: list[int] = []
    if suppress is not None:
        best = cats.argmax(axis=1)
        objects = np.flatnonzero(best < len(weights.T))
        kept = set(objects[partial_object_suppression(boxes[objects], best[objects], suppress)].tolist())
        suppressed = [int(k) for k in objects if k not in kept]
    probs = None
    if attributes:
        weights = class_weights(backbone, list(attributes), list(attribute_templates), cache_dir=cache_dir)
        probs = attribute_probabilities(feats, weights, scale)
    return RegionScores(boxes, labels, cats, list(attributes), probs, suppressed)


def federated_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *, unknown_weight: float = 0.0,
                  attribute_weights: torch.Tensor | None = None) -> torch.Tensor:
    """OvarNet's masked BCE: the mean binary cross-entropy over the (box, attribute) pairs that carry a label.

    ``mask`` (n, A) is 1 where the attribute is annotated for that box (positive or negative) and 0 where it is
    not. With the defaults unannotated pairs contribute nothing, so their logits get exactly zero gradient; no
    labelled pair gives 0. ``attribute_weights`` (A,) multiplies each labelled pair's term before the mean (the
    authors' frequency reweighting, :func:`attribute_frequency_weights`); ``unknown_weight`` adds that weight times
    the mean BCE of the unannotated pairs against 0 (the authors' ``balance_unk``; their OvarNet configs use 0.15).
    """
    mask = mask.to(logits.dtype)
    losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    if attribute_weights is not None:
        losses = losses * torch.as_tensor(attribute_weights, dtype=logits.dtype)
    loss = (losses * mask).sum() / mask.sum().clamp(min=1.0)
    if unknown_weight:
        unknown = 1.0 - mask
        negatives = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits),
                                                                         reduction="none")
        loss = loss + unknown_weight * (negatives * unknown).sum() / unknown.sum().clamp(min=1.0)
    return loss


def attribute_frequency_weights(counts: np.ndarray, power: float = 0.2) -> np.ndarray:
    """OvarNet's per-attribute loss weights from annotation counts: ``w_a = A * n_a^-power / sum_b n_b^-power``
    (rarer attributes weigh more; the weights average 1)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or not len(counts) or (counts <= 0).any():
        raise ValueError("attribute counts must be a non-empty 1-d array of positive numbers")
    raw = counts ** -float(power)
    return (len(counts) * raw / raw.sum()).astype(np.float32)


class AttributeHead(torch.nn.Module):
    """Attribute logits ``scale * x @ W + b``: W starts at the attribute prompts' text embeddings (d, A), the
    per-attribute bias b at 0; both are learned."""

    def __init__(self, text_weights: np.ndarray, scale: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.as_tensor(np.asarray(text_weights), dtype=torch.float32).clone())
        self.bias = torch.nn.Parameter(torch.zeros(self.weight.shape[1]))
        self.scale = float(scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * features @ self.weight + self.bias


def fit_attribute_head(features: np.ndarray, targets: np.ndarray, mask: np.ndarray, text_weights: np.ndarray,
                       scale: float, *, epochs: int = 100, lr: float = 1e-2, seed: int = 0, unknown_weight: float = 0.0,
                       attribute_weights: np.ndarray | None = None) -> AttributeHead:
    """Train an :class:`AttributeHead` on box features with partially annotated attributes (full-batch Adam on
    :func:`federated_bce` with ``unknown_weight`` and ``attribute_weights``)."""
    torch.manual_seed(seed)
    head = AttributeHead(text_weights, scale)
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y, m = torch.as_tensor(np.asarray(targets), dtype=torch.float32), torch.as_tensor(np.asarray(mask))
    weights = None if attribute_weights is None else torch.as_tensor(np.asarray(attribute_weights), dtype=torch.float32)
    optimiser = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        optimiser.zero_grad()
        loss = federated_bce(head(x), y, m, unknown_weight=unknown_weight, attribute_weights=weights)
        loss.backward()
        optimiser.step()
    return head.eval()
