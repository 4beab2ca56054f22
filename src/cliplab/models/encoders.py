"""Encoder access for training methods: towers run block by block with learnable tokens.

A :class:`Tower` is one transformer of a backbone split into three steps, ``begin`` (embeddings up to the
input of block 0), ``block(j)`` and ``end`` (pooling and projection), so that :func:`run_tower` can put
learnable tokens into it (prompt learning: CoOp, VPT, MaPLe) and call a hook before every block.

Prompts are a sequence ``prompts[0], ..., prompts[J-1]`` of tensors ``(p, width)`` (shared by the batch) or
``(n, p, width)`` (one set per item), all with the same ``p``:

- ``prompts[0]`` is inserted at the input, after the class token (vision; before the pre-norm ``ln_pre``, as
  VPT and MaPLe do on CLIP) or after the start token (text; before the positional embeddings are added, as
  CoOp and MaPLe do, so the context takes positions 1..p and the rest of the text moves right by p; the
  pooled end-of-text position moves with it and the last p positions, padding, are dropped);
- ``prompts[j]`` for ``1 <= j < J`` replaces the p tokens that come out of block ``j-1`` before block ``j``
  (VPT-deep / MaPLe's deep prompts: no positional embedding, no pre-norm).

The image tower's output drops the prompt tokens before pooling (class token, or the mean of the patches).
MaPLe appends its vision tokens after the patches instead of after the class token; without an attention
mask the order of tokens does not change any output, so both give the same embeddings (tested).

``reparametrize`` (``models/reparam.py``) is the other entry point: a hook on every linear and attention
projection weight.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TextTooLongError, UnsupportedOperationError

Hook = Callable[[int, torch.Tensor], "torch.Tensor | None"]
"""``hook(j, x)`` is called before block ``j`` (after that layer's prompts were put in) with the tokens
(n, L, width), prompts included; it may return replacement tokens (None keeps them)."""

TOWERS = ("image", "text")


@dataclass
class TowerState:
    """What ``begin`` hands to the blocks and to ``end``: where the prompt tokens sit and how to pool."""

    start: int  # index of the first prompt token
    count: int  # number of prompt tokens (0 without prompts)
    mask: Any = None  # the attention mask the blocks take (text towers)
    pooled: torch.Tensor | None = None  # (n,) positions the text tower pools, prompts counted


class Tower(ABC):
    """One transformer tower of a backbone, run block by block."""

    modality: str = "image"

    def __init__(self, name: str):
        self.name = name

    @property
    @abstractmethod
    def width(self) -> int:
        """Token width inside the transformer (what prompt tokens must have)."""

    @property
    @abstractmethod
    def depth(self) -> int:
        """Number of blocks."""

    @abstractmethod
    def begin(self, inputs: torch.Tensor, first: torch.Tensor | None,
              embeddings: torch.Tensor | None = None) -> tuple[torch.Tensor, TowerState]:
        """Tokens (n, L, width) entering block 0, with ``first`` (n, p, width) inserted, and the state."""

    @abstractmethod
    def block(self, j: int, x: torch.Tensor, state: TowerState) -> torch.Tensor:
        """Run block ``j`` on (n, L, width)."""

    @abstractmethod
    def end(self, x: torch.Tensor, state: TowerState) -> torch.Tensor:
        """Unnormalised embeddings (n, d) from the tokens after the last block."""


def insert_tokens(x: torch.Tensor, at: int, tokens: torch.Tensor) -> torch.Tensor:
    """``x`` (n, L, w) with ``tokens`` (n, p, w) inserted before position ``at`` -> (n, L + p, w)."""
    return torch.cat([x[:, :at], tokens.to(x.dtype), x[:, at:]], dim=1)


def replace_tokens(x: torch.Tensor, at: int, tokens: torch.Tensor) -> torch.Tensor:
    """``x`` with positions ``at .. at+p-1`` replaced by ``tokens`` (n, p, w) (out of place, autograd-safe)."""
    p = tokens.shape[1]
    return torch.cat([x[:, :at], tokens.to(x.dtype), x[:, at + p:]], dim=1)


def remove_tokens(x: torch.Tensor, at: int, count: int) -> torch.Tensor:
    """``x`` without positions ``at .. at+count-1``."""
    return x if count == 0 else torch.cat([x[:, :at], x[:, at + count:]], dim=1)


def check_prompts(prompts: Sequence[torch.Tensor] | None, tower: Tower, batch: int,
                  device: torch.device) -> list[torch.Tensor]:
    """Prompts as a list of (batch, p, width) tensors on ``device``; a ValueError naming what is wrong."""
    if prompts is None:
        return []
    if isinstance(prompts, torch.Tensor):
        raise ValueError("prompts must be a sequence of tensors (one per layer), not one tensor: wrap it in a list")
    out = []
    count = None
    if len(prompts) > tower.depth:
        raise ValueError(f"{len(prompts)} prompt layers given for a {tower.modality} tower of {tower.depth} blocks")
    for j, tokens in enumerate(prompts):
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0).expand(batch, -1, -1)
        if tokens.dim() != 3 or tokens.shape[0] != batch or tokens.shape[2] != tower.width:
            raise ValueError(f"prompts[{j}] has shape {tuple(tokens.shape)}; expected (p, {tower.width}) or "
                             f"({batch}, p, {tower.width}) for this {tower.modality} tower")
        if count is None:
            count = tokens.shape[1]
        elif tokens.shape[1] != count:
            raise ValueError(f"prompts[{j}] has {tokens.shape[1]} tokens, prompts[0] has {count}: all layers need "
                             "the same number")
        out.append(tokens.to(device))
    return out


def run_tower(tower: Tower, inputs: torch.Tensor, prompts: Sequence[torch.Tensor] | None = None, *,
              embeddings: torch.Tensor | None = None, hook: Hook | None = None) -> torch.Tensor:
    """Unnormalised embeddings (n, d) of ``inputs`` through ``tower``, with deep prompts and a per-block hook.

    ``embeddings`` (text towers only) replaces the token-embedding lookup of ``inputs`` (ids (n, L)), as
    ``Backbone.forward_text_embeddings`` does. Without prompts and hook this is the model's own forward.
    """
    layers = check_prompts(prompts, tower, inputs.shape[0], inputs.device)
    x, state = tower.begin(inputs, layers[0] if layers else None, embeddings)
    for j in range(tower.depth):
        if 0 < j < len(layers):
            x = replace_tokens(x, state.start, layers[j])
        if hook is not None:
            replaced = hook(j, x)
            x = x if replaced is None else replaced
        x = tower.block(j, x, state)
    return tower.end(x, state)


# -- text towers: where CoOp/MaPLe context tokens go ----------------------------------------------
def pooled_positions(tokens: torch.Tensor, pool: str, eos_id: int | None) -> torch.Tensor | None:
    """Where a text tower pools each row of ``tokens``: ``argmax`` (highest id, CLIP's end-of-text), ``eos``
    (first ``eos_id``), ``last``, ``first``; None for other rules (no pooling by position)."""
    n, length = tokens.shape
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos":
        if eos_id is None:
            return None
        return (tokens == eos_id).int().argmax(dim=-1)
    if pool == "last":
        return torch.full((n,), length - 1, dtype=torch.long, device=tokens.device)
    if pool == "first":
        return torch.zeros((n,), dtype=torch.long, device=tokens.device)
    return None


def insert_text_context(
    embeddings: torch.Tensor, tokens: torch.Tensor, first: torch.Tensor, pooled: torch.Tensor, pool: str, name: str,
    pad_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CoOp/MaPLe context after the start token: ``(embeddings, ids, pooled)`` of the same length L.

    ``embeddings`` (n, L, w) get ``first`` (n, p, w) at positions 1..p and lose their last p positions; ``ids``
    carry the start id at the context positions (never padding: a padding mask keeps the context visible) and
    ``pooled`` moves right by p for end-of-text pooling. A text whose pooled token would fall off the end (or,
    for other pooling rules, whose last p ids are not ``pad_id``) is an error (TextTooLongError): it has no room
    for p context tokens.
    """
    p = first.shape[1]
    length = tokens.shape[1]
    if pool in ("argmax", "eos"):
        too_long = pooled + p >= length
        if bool(too_long.any()):
            row = int(too_long.nonzero()[0, 0])
            raise TextTooLongError(f"{name}: a text of {int(pooled[row]) + 1} tokens has no room for {p} context "
                                   f"tokens in the {length}-token context ({int(too_long.sum())} text(s))")
        pooled = pooled + p
    elif pad_id is not None and bool((tokens[:, length - p:] != pad_id).any()):
        raise TextTooLongError(f"{name}: a text fills the last {p} of the {length} positions: no room for {p} "
                               "context tokens")
    if p >= length:
        raise TextTooLongError(f"{name}: {p} context tokens do not fit the {length}-token context")
    embeddings = torch.cat([embeddings[:, :1], first.to(embeddings.dtype), embeddings[:, 1:length - p]], dim=1)
    ids = torch.cat([tokens[:, :1], tokens[:, :1].expand(-1, p), tokens[:, 1:length - p]], dim=1)
    return embeddings, ids, pooled


def unsupported(name: str, what: str, why: str) -> UnsupportedOperationError:
    """The one-line refusal every tower uses."""
    return UnsupportedOperationError(f"{name}: {what} is not available for this model ({why})")


SUPPORTED = ("open_clip VisionTransformer image towers, open_clip text transformers (CLIP and TextTransformer) "
             "and Hugging Face CLIPModel")
