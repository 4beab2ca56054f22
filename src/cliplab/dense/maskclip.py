"""MaskCLIP (Zhou et al., ECCV 2022): patch classification of the last block's value path by text weights.

As the authors' code (MaskCLIP's ``vit.py``; CLIP-DINOiser's ``models/maskclip/maskclip.py``: ``extract_v`` and
``MaskClipHead.cls_seg``): the input of the last block goes through its value projection and output projection
only (no query-key attention), plus the residual and the block's MLP; then ``ln_post``, the image projection,
L2 normalisation, the cosine to each class's L2-normalised text embedding, and ``softmax(100 * cosine)`` over
the classes. Positional embeddings are resampled bicubically for other grids (``cliplab.models.dense``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import DenseMethod
from .registry import register_dense


def value_tokens(tower, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """MaskCLIP's projected value-path tokens (n, d, h, w), unnormalised."""
    tokens = tower.tokens(images, "value", layer, True)
    return tokens.permute(0, 3, 1, 2)


def classify_features(features: torch.Tensor, text_weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(temperature * cos(feature, class))`` over classes: (n, d, h, w) x (d, C) -> (n, C, h, w)."""
    features = F.normalize(features.float(), dim=1)
    logits = torch.einsum("ndhw,dc->nchw", features, text_weights.to(features))
    return torch.softmax(temperature * logits, dim=1)


@register_dense("maskclip", paper="Zhou et al. 2022 (MaskCLIP)", needs=("tower", "text_weights"))
class MaskCLIP(DenseMethod):
    """MaskCLIP: last block's value path (no query-key attention), patches classified by the text weights."""

    def __init__(self, temperature: float = 100.0, layer: int = -1):
        self.temperature = temperature
        self.layer = layer

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        context = self.context_
        tower = self._needs(context.tower, "image tower")
        weights = self._needs(context.text_weights, "text weights")
        return classify_features(value_tokens(tower, images, self.layer), weights, self.temperature)
