"""Hugging Face ``CLIPModel`` towers as :class:`~cliplab.models.encoders.Tower` s.

They mirror ``CLIPVisionModel.forward`` and ``CLIPTextModel.forward`` (transformers 4.x and 5.x), layer by
layer, with the projections of ``CLIPModel``.
"""

from __future__ import annotations

import inspect

import torch

from .encoders import Tower, TowerState, insert_text_context, insert_tokens, pooled_positions, remove_tokens


def _takes_causal_mask(layer: torch.nn.Module) -> bool:
    """transformers 4.x encoder layers take ``causal_attention_mask`` and return tuples; 5.x take kwargs."""
    return "causal_attention_mask" in inspect.signature(layer.forward).parameters


def _run_layer(layer: torch.nn.Module, x: torch.Tensor, mask, causal: bool) -> torch.Tensor:
    if _takes_causal_mask(layer):  # transformers 4.x: (hidden, attention_mask, causal_attention_mask)
        out = layer(x, None, mask if causal else None)
    elif causal:
        out = layer(x, mask, is_causal=True)
    else:
        out = layer(x, None)
    return out[0] if isinstance(out, tuple) else out


class HFVisionTower(Tower):
    """``CLIPVisionModel`` + ``visual_projection``: prompts after the class token, before ``pre_layrnorm``."""

    modality = "image"

    def __init__(self, name: str, model: torch.nn.Module):
        super().__init__(name)
        self.vision = model.vision_model
        self.projection = model.visual_projection

    @property
    def width(self) -> int:
        return int(self.vision.config.hidden_size)

    @property
    def depth(self) -> int:
        return len(self.vision.encoder.layers)

    def begin(self, inputs, first, embeddings=None):
        if embeddings is not None:
            raise ValueError("embeddings are for text towers")
        x = self.vision.embeddings(inputs)
        count = 0
        if first is not None:
            x = insert_tokens(x, 1, first)
            count = first.shape[1]
        return self.vision.pre_layrnorm(x), TowerState(start=1, count=count)

    def block(self, j, x, state):
        return _run_layer(self.vision.encoder.layers[j], x, None, causal=False)

    def end(self, x, state):
        x = remove_tokens(x, state.start, state.count)
        return self.projection(self.vision.post_layernorm(x[:, 0]))


class HFTextTower(Tower):
    """``CLIPTextModel`` + ``text_projection``: context after the start token, end-of-text pooling shifted."""

    modality = "text"

    def __init__(self, name: str, model: torch.nn.Module):
        super().__init__(name)
        self.text = model.text_model
        self.projection = model.text_projection

    @property
    def width(self) -> int:
        return int(self.text.config.hidden_size)

    @property
    def depth(self) -> int:
        return len(self.text.encoder.layers)

    def _causal_mask(self, hidden: torch.Tensor):
        if _takes_causal_mask(self.text.encoder.layers[0]):  # transformers 4.x
            from transformers.modeling_attn_mask_utils import _create_4d_causal_attention_mask

            return _create_4d_causal_attention_mask(hidden.shape[:2], hidden.dtype, device=hidden.device)
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self.text.config, inputs_embeds=hidden, attention_mask=None, cache=None)

    def begin(self, inputs, first, embeddings=None):
        text = self.text
        ids = inputs.to(dtype=torch.int)
        eos = getattr(text, "eos_token_id", text.config.eos_token_id)
        # transformers pools at the highest id for configs from before the eos_token_id fix (eos == 2)
        pooled = pooled_positions(ids, "argmax", None) if eos == 2 else pooled_positions(ids, "eos", eos)
        x = text.embeddings.token_embedding(inputs) if embeddings is None else embeddings
        count = 0
        if first is not None:
            count = first.shape[1]
            x, _, pooled = insert_text_context(x, inputs, first, pooled, "eos", self.name)
        hidden = text.embeddings(inputs_embeds=x)
        return hidden, TowerState(start=1, count=count, mask=self._causal_mask(hidden), pooled=pooled)

    def block(self, j, x, state):
        return _run_layer(self.text.encoder.layers[j], x, state.mask, causal=True)

    def end(self, x, state):
        x = self.text.final_layer_norm(x)
        return self.projection(x[torch.arange(x.shape[0], device=x.device), state.pooled.to(x.device)])
