"""FOUND's training-free background discovery (Simeoni et al., CVPR 2023) on any ViT's last attention block.

As the authors' ``compute_img_bkg_seg`` (valeoai/FOUND ``bkg_seg.py``, called by ``FoundModel.compute_background_
batch``): from the last block's [CLS]-to-patch attention ``a[h, p]`` (per head ``h``) and its patch keys
``k[h, p]``,

- heads are weighted by their attention sparsity (after CroW): ``t`` = the mean attention over all heads and
  patches of the image, ``Q[h]`` = the fraction of patches with ``a[h, p] > t``, ``beta[h] = log(sum_h' (Q[h'] +
  eps) / (Q[h] + eps))`` (eps 1e-10);
- the **seed** is the patch least attended: ``argmin_p sum_h beta[h] a[h, p]``;
- each patch's descriptor is the concatenation over heads of ``beta[h] k[h, p]``, L2-normalised;
- the **background** is every patch whose descriptor's cosine to the seed's is above ``threshold`` (0.3, theirs).

``reweight=False`` drops ``beta`` (their ``apply_weights=False``). One seed, as their code (the paper's
description also allows several); the bilateral-solver refinement of their pseudo-labels is not run.

Encoders (:func:`attention_keys`): a timm ViT given as a guidance encoder (``cliplab.dense.guidance.TimmGuidance``,
e.g. the user's DINO: the q/k of its last ``attn.qkv``, which its hook already reads; ``softmax(q k^T / sqrt(d))``
over all tokens, the class token's row), or a CLIP ViT's own last block through the dense tower (the same
computation on ``ln_1`` of the block's input with its packed ``in_proj``; HF CLIP's ``q_proj``/``k_proj``): a
documented stand-in where no self-supervised ViT is at hand. CLIP's [CLS] attention is less object-centric than
DINO's, so its masks are rougher.

What CLIP-DINOiser trained against (read from wysoczanska/clip_dinoiser ``train.py``): not these masks directly but
FOUND's *trained* 1x1 decoder on DINO ViT-S/8 keys (released ``decoder_weights.pt``, itself fitted to these masks
after the bilateral solver), ``sigmoid > 0.5`` as foreground. cliplab fits its background conv to ``1 - background``
of this step directly (``cliplab.dense.dinoiser_train``), skipping FOUND's intermediate decoder.

Outside comparison (/work/compare/found/, the authors' ``compute_img_bkg_seg`` imported from their repository,
identical random attention (softmax rows over 1 + 63 tokens) and keys, 3 images, 6 heads of 8 dims, 7x9 patches,
with and without the head weights, thresholds 0.0 / 0.3 / 0.6; background fractions 0.02-0.96): the masks are
identical (max abs difference 0.0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import CliplabError

EPS = 1e-10


def head_weights(cls_attention: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(n, heads, h, w) [CLS] attention -> (n, heads) sparsity weights ``beta`` (module docstring)."""
    n, heads = cls_attention.shape[:2]
    att = cls_attention.reshape(n, heads, -1).float()
    threshold = att.reshape(n, -1).mean(dim=1)
    q = (att > threshold[:, None, None]).sum(dim=2) / att.shape[2]
    return torch.log((q + eps).sum(dim=1, keepdim=True) / (q + eps))


def found_background(cls_attention: torch.Tensor, keys: torch.Tensor, threshold: float = 0.3,
                     reweight: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """FOUND's background: ``cls_attention`` (n, heads, h, w), ``keys`` (n, heads, d, h, w) -> a (n, h, w) mask
    (1.0 on the background) and the (n,) seed indices (row-major patch index)."""
    if cls_attention.dim() != 4 or keys.dim() != 5 or keys.shape[:2] != cls_attention.shape[:2] \
            or keys.shape[-2:] != cls_attention.shape[-2:]:
        raise CliplabError(f"FOUND needs attention (n, heads, h, w) and keys (n, heads, d, h, w) of one grid; got "
                           f"{tuple(cls_attention.shape)} and {tuple(keys.shape)}")
    n, heads, h, w = cls_attention.shape
    att = cls_attention.float()
    desc = keys.float()
    if reweight:
        beta = head_weights(att)
        att = att * beta[:, :, None, None]
        desc = desc * beta[:, :, None, None, None]
    desc = F.normalize(desc.reshape(n, -1, h * w), dim=1)  # heads' keys concatenated per patch
    seed = att.sum(dim=1).reshape(n, -1).argmin(dim=1)
    cos = torch.einsum("ndp,nd->np", desc, desc[torch.arange(n), :, seed])
    return (cos > threshold).float().reshape(n, h, w), seed


def _cls_row(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(n, heads, tokens, d) queries and keys -> (n, heads, tokens) softmax attention of token 0 (the class)."""
    return torch.softmax(torch.einsum("nhd,nhtd->nht", q[:, :, 0] * scale, k), dim=-1)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    n, tokens, width = x.shape
    return x.reshape(n, tokens, heads, width // heads).transpose(1, 2)  # (n, heads, tokens, d)


def _patch_maps(att: torch.Tensor, k: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the last h*w tokens (the patches, after the class and any register tokens) as (n, heads, [d,] h, w)."""
    n, heads = att.shape[:2]
    att = att[:, :, -h * w:].reshape(n, heads, h, w)
    k = k[:, :, -h * w:].transpose(2, 3).reshape(n, heads, -1, h, w)
    return att, k


@torch.no_grad()
def tower_attention_keys(tower, images: torch.Tensor, layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """A CLIP ViT's block ``layer`` (default the last): [CLS] attention (n, heads, h, w) and keys
    (n, heads, d, h, w), computed from the block's own weights on ``ln_1`` of its input."""
    h, w = tower.grid_of(images)
    index = tower.resolve_layer(layer)
    x = tower.embed(images)
    for i in range(index):
        x = tower.block(i, x)
    block = tower.blocks[index]
    attn = getattr(block, "attn", None)
    if isinstance(attn, torch.nn.MultiheadAttention) and attn.in_proj_weight is not None:
        width, heads = attn.embed_dim, attn.num_heads
        q, k, _ = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).split(width, dim=-1)
    elif hasattr(block, "self_attn") and hasattr(block.self_attn, "q_proj"):  # transformers CLIP
        attn, y = block.self_attn, block.layer_norm1(x)
        q, k, heads = attn.q_proj(y), attn.k_proj(y), attn.num_heads
    else:
        raise CliplabError(f"{tower.name}: FOUND reads the last block's queries and keys, which need torch "
                           f"MultiheadAttention (packed in_proj) or transformers CLIP attention; block {index} has "
                           f"{type(attn).__name__}")
    q, k = _split_heads(q.float(), heads), _split_heads(k.float(), heads)
    att = _cls_row(q, k, 1.0 / math.sqrt(q.shape[-1]))
    return _patch_maps(att, k, h, w)


@torch.no_grad()
def timm_attention_keys(guidance, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A :class:`~cliplab.dense.guidance.TimmGuidance`'s last block: [CLS] attention (n, heads, h, w) and keys
    (n, heads, d, h, w), from the q/k its ``attn.qkv`` hook reads (CLIP-normalised windows in)."""
    attn = guidance.model.blocks[-1].attn
    if not isinstance(getattr(attn, "q_norm", torch.nn.Identity()), torch.nn.Identity):
        raise CliplabError("FOUND on a timm ViT with query/key norms is not supported (DINO has none)")
    feats = guidance(images)  # runs the model; the hook keeps qkv
    h, w = feats.shape[-2:]
    qkv = guidance._qkv.float()
    width = qkv.shape[-1] // 3
    q, k = _split_heads(qkv[..., :width], attn.num_heads), _split_heads(qkv[..., width:2 * width], attn.num_heads)
    att = _cls_row(q, k, float(getattr(attn, "scale", q.shape[-1] ** -0.5)))
    return _patch_maps(att, k, h, w)


class FoundBackground:
    """FOUND's background masks of CLIP-normalised windows (n, 3, H, W) -> (n, h, w), 1.0 on the background, from a
    timm guidance encoder (``guidance``) or, without one, the CLIP tower's own last block (``tower``)."""

    def __init__(self, tower=None, guidance=None, threshold: float = 0.3, reweight: bool = True, layer: int = -1):
        if tower is None and guidance is None:
            raise CliplabError("FOUND needs a ViT: a guidance encoder or the CLIP model's dense tower")
        self.tower, self.guidance = tower, guidance
        self.threshold, self.reweight, self.layer = threshold, reweight, layer
        self.source = "encoder" if guidance is not None else "clip"

    def attention_keys(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.guidance is not None:
            return timm_attention_keys(self.guidance, images)
        return tower_attention_keys(self.tower, images, self.layer)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        att, keys = self.attention_keys(images)
        return found_background(att, keys, self.threshold, self.reweight)[0]
