"""Long-CLIP's knowledge-preserving stretching of the text positional embedding (paper 14).

Long-CLIP (Zhang et al. 2024; ``beichenzbc/Long-CLIP``, ``model/longclip.py``) keeps the first
``keep=20`` learned positions, which are well trained, and stretches the remaining ``L - keep`` by
``factor=4`` with linear interpolation: position ``keep + factor*i + j`` is
``p[keep+i] + j/factor * (p[keep+i+1] - p[keep+i])``; after the last learned position it extrapolates
with the last difference, as their code does. 77 positions become ``20 + 57*4 = 248``. The causal
attention mask and the tokenizer's context length grow with it, and the model id changes, so no cache
mixes features of the stretched and the original model. Without Long-CLIP's fine-tuning the stretched
model is a zero-shot approximation; a Long-CLIP checkpoint (248 positions already) loads as is
(``models/loader.py``: its ``positional_embedding_res`` is merged as Long-CLIP's ``mask1``/``mask2`` do).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from open_clip.transformer import TextTransformer

from .backbone import Backbone

LONGCLIP_KEEP = 20  # Long-CLIP's mask1: positions [0, 20) from positional_embedding, the rest from _res


def stretched_positions(positions: torch.Tensor, keep: int = 20, factor: int = 4) -> torch.Tensor:
    """(L, d) -> (keep + factor * (L - keep), d): the first ``keep`` rows as they are, the rest interpolated."""
    length = positions.shape[0]
    if not 0 < keep < length - 1 or factor < 1:
        raise ValueError(f"need 0 < keep < {length - 1} and factor >= 1; got keep={keep}, factor={factor}")
    base = positions[keep:]
    following = torch.cat([base[1:], (2 * base[-1] - base[-2])[None]])  # extrapolate after the last position
    frac = torch.arange(factor, dtype=positions.dtype, device=positions.device) / factor
    rows = base[:, None, :] + frac[None, :, None] * (following - base)[:, None, :]
    return torch.cat([positions[:keep], rows.reshape(-1, positions.shape[1])])


def merge_longclip_state(state: dict) -> dict:
    """A Long-CLIP state dict in CLIP's layout: ``positional_embedding_res`` folded into ``positional_embedding``
    (rows < 20 from the first, the rest from the second, as Long-CLIP's ``encode_text`` adds them)."""
    if "positional_embedding_res" not in state:
        return state
    state = dict(state)
    res = state.pop("positional_embedding_res")
    state["positional_embedding"] = torch.cat([state["positional_embedding"][:LONGCLIP_KEEP], res[LONGCLIP_KEEP:]])
    return state


def _causal_mask(n: int) -> torch.Tensor:
    return torch.empty(n, n).fill_(float("-inf")).triu_(1)


def _text_holder(backbone: Backbone) -> torch.nn.Module:
    """The module owning the text positional embedding: an open_clip CLIP or CustomTextCLIP's TextTransformer."""
    model = backbone.model
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer) and text.cls_emb is None:
        return text
    if text is None and isinstance(getattr(model, "positional_embedding", None), torch.nn.Parameter) \
            and hasattr(model, "attn_mask") and hasattr(model, "token_embedding"):
        return model
    kind = type(text).__name__ if text is not None else type(model).__name__
    raise backbone._unsupported("Long-CLIP positional stretching",
                                f"its text tower is {kind}, not an open_clip CLIP text transformer")


def stretch_positional_embedding(backbone: Backbone, keep: int = 20, factor: int = 4, *,
                                 inplace: bool = False) -> Backbone:
    """A backbone whose text tower takes ``keep + factor * (L - keep)`` tokens (248 for CLIP's 77).

    Returns a new backbone (the given one is untouched) unless ``inplace``. Its ``model_id`` is
    ``PARENT+longpos{keep}x{factor}`` (a ``derive``d backbone's id follows its weights anyway), its
    tokenizer makes ``context_length`` tokens, and ``info.benchmark``'s pretrained name says
    ``+longpos``. Raises UnsupportedOperationError for other text towers (Hugging Face, CoCa, TorchScript).
    """
    if isinstance(backbone.model, torch.jit.ScriptModule):
        raise backbone._unsupported("Long-CLIP positional stretching", "a TorchScript model")
    _text_holder(backbone)  # refuse before copying
    if not inplace:
        clone = copy.copy(backbone)
        clone.model = copy.deepcopy(backbone.model)
        clone.preprocess_config = copy.deepcopy(backbone.preprocess_config)
        clone.engine = backbone.engine.fresh()
        clone._digest_memo = None
        backbone = clone
    holder = _text_holder(backbone)
    old = holder.positional_embedding
    with torch.no_grad():
        new = stretched_positions(old.detach(), keep, factor)
    n = new.shape[0]
    holder.positional_embedding = torch.nn.Parameter(new, requires_grad=old.requires_grad)
    holder.context_length = n
    if hasattr(holder, "num_pos"):
        holder.num_pos = n
    if getattr(holder, "attn_mask", None) is not None:
        holder.attn_mask = _causal_mask(n).to(holder.attn_mask.device, holder.attn_mask.dtype)
    if holder is not backbone.model:
        backbone.model.context_length = n
    tokenizer = copy.copy(backbone._tokenizer)
    if tokenizer is None or not hasattr(tokenizer, "context_length"):
        raise backbone._unsupported("Long-CLIP positional stretching", "its tokenizer has no context_length")
    tokenizer.context_length = n
    backbone._tokenizer = tokenizer
    backbone._tokenizer_id = None
    parent_id = backbone.model_id
    if backbone._derived is None:
        backbone.model_id = f"{parent_id}+longpos{keep}x{factor}"
    model, pretrained = backbone.benchmark_names()
    backbone.info = dataclasses.replace(
        backbone.info,
        extra={**backbone.info.extra, "long_text_positions": {"keep": keep, "factor": factor, "from": old.shape[0],
                                                              "to": n, "parent": parent_id}},
        benchmark=(model, "+".join(p for p in (pretrained, "longpos") if p)),
    )
    return backbone
