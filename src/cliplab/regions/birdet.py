"""BIRDet (paper 19): an image-conditioned background embedding and partial-object suppression.

Departures: the paper learns the map from the image to its background embedding inside a detector; here, with
no detector to train, the background class embedding is the fixed mix ``normalize((1 - mix) * t_bg + mix * v)``
of the background prompt's text embedding ``t_bg`` and the whole image's embedding ``v`` (``mix = 0``: the plain
"background" prompt), so boxes that look like the image's context score as background.

No outside comparison: BIRDet's code is not public (the paper gives no repository; none found in the code index,
December 2026), so partial-object suppression follows the paper's description (tests: threshold 1 keeps every box,
a contained same-label box is dropped).
"""

from __future__ import annotations

import numpy as np

BACKGROUND = "background"


def background_embedding(text_embedding: np.ndarray, image_embedding: np.ndarray, mix: float = 0.5) -> np.ndarray:
    """``normalize((1 - mix) * t_bg + mix * v)``: the background class vector conditioned on one image (d,)."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must lie in [0, 1], got {mix}")
    vector = (1.0 - mix) * np.asarray(text_embedding, np.float64) + mix * np.asarray(image_embedding, np.float64)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def overlap_ratios(boxes: np.ndarray) -> np.ndarray:
    """``R[i, j] = area(box_i ∩ box_j) / area(box_i)`` for [x, y, w, h] boxes: how much of box i lies in box j."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
    ih = np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
    area = (b[:, 2] * b[:, 3])[:, None]
    return np.divide(iw * ih, area, out=np.zeros_like(iw), where=area > 0)


def partial_object_suppression(boxes: np.ndarray, labels: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    """Indices of the boxes kept: box i is dropped when, for a strictly larger box j of the same label,
    ``area(i ∩ j) / area(i) > threshold`` (a part of an object detected as the object). ``threshold >= 1``
    keeps every box (a ratio never exceeds 1)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels)
    ratios, area = overlap_ratios(b), b[:, 2] * b[:, 3]
    same = labels[:, None] == labels[None, :]
    larger = area[None, :] > area[:, None]
    dropped = (same & larger & (ratios > threshold)).any(axis=1)
    return np.flatnonzero(~dropped)


def scores_with_background(features: np.ndarray, weights: np.ndarray, background: np.ndarray,
                           scale: float) -> np.ndarray:
    """Category probabilities with the background vector as an extra last class: (n, C + 1)."""
    full = np.concatenate([np.asarray(weights, np.float64), np.asarray(background, np.float64)[:, None]], axis=1)
    z = scale * (np.asarray(features, np.float64) @ full)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
