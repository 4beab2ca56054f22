"""CLIP-DINOiser (Wysoczanska et al., 2024): MaskCLIP features pooled by guidance correlations.

As the authors' ``DinoCLIP.forward`` / ``compute_weighted_pool`` (wysoczanska/clip_dinoiser
``models/clip_dinoiser/clip_dinoiser.py``): patch features ``g`` of a guidance encoder are L2-normalised, their
patch-to-patch cosines ``A[n, m]`` are set to 0 where below ``gamma`` (0.2), and each patch's MaskCLIP feature
(the projected value-path token, before normalisation) is replaced by ``sum_m A[n, m] f_m / (sum_m A[n, m] + 1e-6)``;
the pooled features are then classified as MaskCLIP does (``softmax(100 * cos)``). Where the guidance grid differs
from CLIP's, the CLIP features are resized to it bilinearly (as theirs) and the pooled features back to CLIP's grid
(theirs classify on the guidance grid and upsample the scores).

Guidance (``guidance``): ``encoder``, a user-supplied self-supervised encoder (``cliplab.dense.guidance``: a
timm DINO ViT read from a local weights file, or any callable given to the Segmenter); ``clip``, CLIP's own
residual-stream tokens after block ``guidance_layer`` (default -3, the features the authors' light 3x3 conv reads;
used here untrained, without that conv); ``identity``, no pooling (A = I: exactly MaskCLIP, a check).

``conv``, the authors' light 3x3 conv on CLIP's layer -3 features trained to mimic a DINO's correlations
(``cliplab.dense.dinoiser_train``: trained on the user's unlabelled images; ``conv=FILE`` selects it, so no DINO
checkpoint is needed at inference: ``cliplab segment --method dinoiser --param conv=FILE``).

Departures: the trained 1x1 background conv / FOUND saliency is not reproduced (FOUND is not available here);
background comes from the pipeline's ``--background-threshold``. The authors' released conv weights are not read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CliplabError
from .base import DenseMethod
from .maskclip import classify_features, value_tokens
from .registry import register_dense

GUIDANCE = ("encoder", "clip", "identity", "conv")


def guidance_correlations(features: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """(n, g, h, w) guidance features -> (n, h*w, h, w) cosines between patches, those below ``gamma`` set to 0."""
    n, _, h, w = features.shape
    flat = F.normalize(features.float().flatten(2), dim=1)  # (n, g, hw)
    corrs = torch.einsum("ngp,ngq->npq", flat, flat).reshape(n, h * w, h, w)
    if gamma is not None:
        corrs = torch.where(corrs < gamma, torch.zeros_like(corrs), corrs)
    return corrs


def weighted_pool(features: torch.Tensor, corrs: torch.Tensor) -> torch.Tensor:
    """Pool (n, d, h, w) features with (n, h'*w', h', w') weights: ``sum_m A[p, m] f_m / (sum_m A[p, m] + 1e-6)``,
    the features first resized bilinearly to (h', w') where the grids differ."""
    h, w = corrs.shape[-2:]
    if features.shape[-2:] != (h, w):
        features = F.interpolate(features, size=(h, w), mode="bilinear", align_corners=False)
    pooled = torch.einsum("npij,ndij->ndp", corrs, features.float())
    norm = corrs.flatten(2).sum(-1)[:, None]  # (n, 1, hw)
    return (pooled / (norm + 1e-6)).reshape(features.shape[0], -1, h, w)


@register_dense("dinoiser", paper="Wysoczanska et al. 2024 (CLIP-DINOiser)", needs=("tower", "text_weights",
                                                                                   "guidance"))
class CLIPDINOiser(DenseMethod):
    """CLIP-DINOiser: MaskCLIP features pooled by guidance-encoder patch correlations (below gamma zeroed)."""

    def __init__(self, gamma: float = 0.2, guidance: str = "clip", guidance_layer: int = -3,
                 temperature: float = 100.0, conv: str = ""):
        self.gamma = gamma
        self.conv = conv
        self.guidance = guidance
        self.guidance_layer = guidance_layer
        self.temperature = temperature

    def setup(self, context) -> None:
        if self.guidance not in GUIDANCE:
            raise CliplabError(f"dinoiser guidance must be one of {', '.join(GUIDANCE)}; got {self.guidance!r}")
        if self.guidance == "encoder" and context.guidance is None:
            raise CliplabError("dinoiser guidance=encoder needs a guidance encoder (cliplab segment --guidance "
                               "WEIGHTS, or Segmenter(guidance=...))")
        # a trained conv file turns the default (clip) guidance into the conv's
        self.guidance_ = "conv" if self.conv and self.guidance == "clip" else self.guidance
        self.conv_ = None
        if self.guidance_ == "conv":
            if not self.conv:
                raise CliplabError("dinoiser guidance=conv needs conv=FILE (a conv trained by "
                                   "cliplab.dense.dinoiser_train.train_guidance_conv)")
            from .dinoiser_train import load_guidance_conv

            self.conv_ = load_guidance_conv(self.conv, context.backbone).to(context.backbone.device)
        super().setup(context)

    def guidance_features(self, images: torch.Tensor) -> torch.Tensor | None:
        """(n, g, h, w) guidance features of the windows (None for identity)."""
        guidance = getattr(self, "guidance_", self.guidance)
        if guidance == "identity":
            return None
        if guidance == "encoder":
            return self.context_.guidance(images)
        tower = self.context_.tower
        if guidance == "conv":
            from .dinoiser_train import clip_intermediate

            return self.conv_(clip_intermediate(tower, images, self.conv_.layer))
        h, w = tower.grid_of(images)
        last = tower.resolve_layer(self.guidance_layer)
        x = tower.embed(images)
        for index in range(last + 1):
            x = tower.block(index, x)
        return x[:, 1:].reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        context = self.context_
        tower = self._needs(context.tower, "image tower")
        weights = self._needs(context.text_weights, "text weights")
        features = value_tokens(tower, images)
        guide = self.guidance_features(images)
        if guide is not None:
            grid = features.shape[-2:]
            features = weighted_pool(features, guidance_correlations(guide, self.gamma))
            if features.shape[-2:] != grid:  # back to CLIP's patch grid, which the pipeline averages on
                features = F.interpolate(features, size=grid, mode="bilinear", align_corners=False)
        return classify_features(features, weights, self.temperature)
