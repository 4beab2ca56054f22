"""open_clip's ViT image tower and text transformers as :class:`~cliplab.models.encoders.Tower` s.

Each mirrors open_clip's own forward step for step (``VisionTransformer.forward``, ``CLIP.encode_text``,
``TextTransformer.forward``), so that without prompts the outputs are the model's to float precision.
"""

from __future__ import annotations

import torch
from open_clip.transformer import TextTransformer, VisionTransformer

from .encoders import (
    SUPPORTED,
    Tower,
    TowerState,
    insert_text_context,
    insert_tokens,
    pooled_positions,
    remove_tokens,
    unsupported,
)


def _run_block(transformer, j: int, x: torch.Tensor, mask) -> torch.Tensor:
    """Block ``j`` of an open_clip ``Transformer`` on batch-first tokens, whatever layout it runs in."""
    block = transformer.resblocks[j]
    if not getattr(transformer, "batch_first", True):
        return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    return block(x, attn_mask=mask)


class OpenClipVisionTower(Tower):
    """open_clip ``VisionTransformer``: prompts after the class token, before ``ln_pre``; pooled without them."""

    modality = "image"

    def __init__(self, name: str, visual: torch.nn.Module):
        super().__init__(name)
        if not isinstance(visual, VisionTransformer):
            raise unsupported(name, "block-by-block image tower (deep prompts)",
                              f"its image tower is {type(visual).__name__}; supported: {SUPPORTED}")
        self.visual = visual

    @property
    def width(self) -> int:
        return int(self.visual.transformer.width)

    @property
    def depth(self) -> int:
        return len(self.visual.transformer.resblocks)

    def begin(self, inputs, first, embeddings=None):
        if embeddings is not None:
            raise ValueError("embeddings are for text towers")
        visual = self.visual
        x = visual.conv1(inputs)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)
        count = 0
        if first is not None:
            x = insert_tokens(x, 1, first)
            count = first.shape[1]
        return visual.ln_pre(x), TowerState(start=1, count=count)

    def block(self, j, x, state):
        return _run_block(self.visual.transformer, j, x, None)

    def end(self, x, state):
        visual = self.visual
        pooled, _ = visual._pool(remove_tokens(x, state.start, state.count))
        return pooled @ visual.proj if visual.proj is not None else pooled


class OpenClipTextTower(Tower):
    """open_clip's text transformer: the ``CLIP`` class (attributes on the model) or a ``TextTransformer``."""

    modality = "text"

    def __init__(self, name: str, model: torch.nn.Module):
        super().__init__(name)
        if isinstance(model, torch.jit.ScriptModule):
            raise unsupported(name, "block-by-block text tower", f"a TorchScript model; supported: {SUPPORTED}")
        text = getattr(model, "text", None)
        if isinstance(text, TextTransformer):
            self.holder = text
            self.pool, self.eos_id = text.pool_type, getattr(text, "eos_id", None)
            self.cls_emb = text.cls_emb
            self.pad_mask = bool(text.use_pad_mask or text.cls_emb is not None)
        elif text is None and hasattr(model, "token_embedding") and hasattr(model, "attn_mask"):
            self.holder = model
            self.pool, self.eos_id = model.text_pool_type, getattr(model, "text_eos_id", None)
            self.cls_emb = None
            self.pad_mask = False
        else:
            kind = type(text).__name__ if text is not None else type(model).__name__
            raise unsupported(name, "block-by-block text tower", f"its text tower is {kind}; supported: {SUPPORTED}")
        if self.cls_emb is None and self.pool not in ("argmax", "eos", "last", "first"):
            raise unsupported(name, "block-by-block text tower", f"text pooling {self.pool!r}")

    @property
    def width(self) -> int:
        return int(self.holder.transformer.width)

    @property
    def depth(self) -> int:
        return len(self.holder.transformer.resblocks)

    def begin(self, inputs, first, embeddings=None):
        holder = self.holder
        cast = holder.transformer.get_cast_dtype()
        x = holder.token_embedding(inputs) if embeddings is None else embeddings
        x = x.to(cast)
        ids = inputs
        pooled = None if self.cls_emb is not None else pooled_positions(inputs, self.pool, self.eos_id)
        count = 0
        if first is not None:
            count = first.shape[1]
            pool = "last" if self.cls_emb is not None else self.pool
            positions = pooled if pooled is not None else torch.zeros(len(inputs), dtype=torch.long)
            x, ids, shifted = insert_text_context(x, inputs, first, positions, pool, self.name,
                                                  getattr(holder, "pad_id", None))
            pooled = shifted if pooled is not None else None
        seq_len = ids.shape[1]
        if self.cls_emb is not None:  # CoCa: a class token appended after the text, pooled last
            x = torch.cat([x, self.cls_emb.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
            seq_len += 1
        mask = holder.attn_mask
        if self.pad_mask:
            extra = holder._build_additive_mask(ids, seq_len, x.dtype)
            mask = extra if mask is None else mask[:seq_len, :seq_len].unsqueeze(0) + extra
        x = x + holder.positional_embedding[:seq_len].to(cast)
        return x, TowerState(start=1, count=count, mask=mask, pooled=pooled)

    def block(self, j, x, state):
        return _run_block(self.holder.transformer, j, x, state.mask)

    def end(self, x, state):
        holder = self.holder
        if self.cls_emb is not None:
            pooled = holder.ln_final(x[:, -1])
        else:
            x = holder.ln_final(x)
            pooled = x[torch.arange(x.shape[0], device=x.device), state.pooled.to(x.device)]
        projection = holder.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection
