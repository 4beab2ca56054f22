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

Background (their ``apply_found``): where the ``conv=FILE`` also holds the 1x1 background conv (``cliplab
dinoiser-train --background``: fitted to FOUND's foreground), a patch whose best class probability is below
``delta`` (0.99) and whose foreground probability ``sigmoid(bkg_decoder(features))`` is not above 0.5 becomes
background (:func:`apply_background`): as theirs, the probability of the class named ``background`` is set to 1
(their class 0) where the labels include one; otherwise, cliplab's pipeline having no background channel, every
class's probability there is set to 0, so ``--background-threshold`` (any value above 0) labels it background
(without a threshold it would go to the first class). ``background=false`` turns it off (theirs apply it only on
datasets with a background class). Where the labels have neither, leave it off.

Departures: the authors' released conv weights are not read.

Outside comparison (/work/compare/found/compare_bkg.py, the authors' ``CLIP_DINOiser.forward`` run unchanged on
a stubbed instance, its ``forward_pass`` returning cliplab's background logits, conv correlations and MaskCLIP
features of one 16x16 window of a random ViT (4x4 patches), its ``cls_seg`` cliplab's classifier; labels
background + 3 classes; background-conv biases 0, +3, -3 and temperatures 100 and 5, so 0 to 15 of the 16 patches
are marked): the same scores as ``patch_scores`` with ``conv=FILE``, max abs difference 0.0 in every case.
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


def apply_background(scores: torch.Tensor, logits: torch.Tensor, background_index: int | None,
                     delta: float = 0.99) -> torch.Tensor:
    """The authors' background rule: where ``max_c scores < delta`` and ``sigmoid(logits) <= 0.5`` (not foreground),
    the ``background_index`` class's probability becomes 1 (others unchanged), or, without one, every class's
    becomes 0. ``scores`` (n, C, h, w) probabilities, ``logits`` (n, 1, h, w) foreground logits."""
    foreground = torch.sigmoid(logits.float()) > 0.5
    mark = (scores.max(dim=1, keepdim=True).values < delta) & ~foreground  # (n, 1, h, w)
    if background_index is None:
        return scores.masked_fill(mark, 0.0)
    out = scores.clone()
    out[:, background_index:background_index + 1] = torch.where(mark, torch.ones_like(mark, dtype=out.dtype),
                                                                out[:, background_index:background_index + 1])
    return out


@register_dense("dinoiser", paper="Wysoczanska et al. 2024 (CLIP-DINOiser)", needs=("tower", "text_weights",
                                                                                   "guidance"))
class CLIPDINOiser(DenseMethod):
    """CLIP-DINOiser: MaskCLIP features pooled by guidance-encoder patch correlations (below gamma zeroed)."""

    def __init__(self, gamma: float = 0.2, guidance: str = "clip", guidance_layer: int = -3,
                 temperature: float = 100.0, conv: str = "", background: bool = True, delta: float = 0.99):
        self.gamma = gamma
        self.conv = conv
        self.background = background
        self.delta = delta
        self.guidance = guidance
        self.guidance_layer = guidance_layer
        self.temperature = temperature

    def setup(self, context) -> None:
        if self.guidance not in GUIDANCE:
            raise CliplabError(f"dinoiser guidance must be one of {', '.join(GUIDANCE)}; got {self.guidance!r}")
        if self.guidance == "encoder" and context.guidance is None:
            raise CliplabError("dinoiser guidance=encoder needs a guidance encoder (cliplab segment --guidance "
                               "WEIGHTS, or Segmenter(guidance=...))")
        if self.guidance == "conv" and not self.conv:
            raise CliplabError("dinoiser guidance=conv needs conv=FILE (a conv trained by cliplab dinoiser-train)")
        self.conv_ = self.background_ = None
        if self.conv:
            from .dinoiser_train import load_dinoiser_convs

            self.conv_, background = load_dinoiser_convs(self.conv, context.backbone)
            if self.guidance == "conv" and self.conv_ is None:
                raise CliplabError(f"{self.conv}: holds no correlation conv (trained with --background alone)")
            if self.background and background is not None:
                self.background_ = background.to(context.backbone.device)
            if self.conv_ is not None:
                self.conv_ = self.conv_.to(context.backbone.device)
        # a file's correlation conv turns the default (clip) guidance into the conv's
        self.guidance_ = "conv" if self.conv_ is not None and self.guidance == "clip" else self.guidance
        names = [name.lower() for name in context.class_names]
        self.background_index_ = names.index("background") if "background" in names else None
        super().setup(context)

    def _intermediate(self, images: torch.Tensor, layer: int) -> torch.Tensor:
        """CLIP's layer ``ln_2`` features, computed once per batch for both convs."""
        from .dinoiser_train import clip_intermediate

        cached = getattr(self, "_seen", None)
        if cached is None or cached[0] is not images or cached[1] != layer:
            self._seen = (images, layer, clip_intermediate(self.context_.tower, images, layer))
        return self._seen[2]

    def guidance_features(self, images: torch.Tensor) -> torch.Tensor | None:
        """(n, g, h, w) guidance features of the windows (None for identity)."""
        guidance = getattr(self, "guidance_", self.guidance)
        if guidance == "identity":
            return None
        if guidance == "encoder":
            return self.context_.guidance(images)
        tower = self.context_.tower
        if guidance == "conv":
            return self.conv_(self._intermediate(images, self.conv_.layer))
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
        scores = classify_features(features, weights, self.temperature)
        background = getattr(self, "background_", None)
        if background is not None:
            logits = background(self._intermediate(images, background.layer))
            if logits.shape[-2:] != scores.shape[-2:]:
                logits = F.interpolate(logits, size=scores.shape[-2:], mode="bilinear", align_corners=False)
            scores = apply_background(scores, logits, self.background_index_, self.delta)
        self._seen = None
        return scores
