"""Convert an open_clip ViT ``CLIP`` (OpenAI key layout) into a transformers ``CLIPModel``.

Test helper only: covers what ``tests/integration/test_model_formats.py`` needs (a ViT image tower
with class token, MultiheadAttention blocks with packed q/k/v, no layer scale, no biases on the
projections), and refuses anything else rather than converting it wrongly.
"""

from __future__ import annotations

import contextlib
import re

import torch
from transformers import CLIPConfig, CLIPModel

try:  # transformers 5
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext

_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_FIXED = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip / OpenAI CLIP state dict -> transformers ``CLIPModel`` state dict.

    The values may share memory with ``state`` (``load_state_dict`` copies them into the model).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.detach().float()
        if key in _FIXED:
            out[_FIXED[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif match := _BLOCK.match(key):
            tower = "vision_model" if match.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{match.group(2)}"
            rest = match.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight / bias
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}.self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            module, _, kind = rest.rpartition(".")
            if module not in _BLOCK_PARTS:
                raise KeyError(f"cannot convert {key!r}")
            out[f"{prefix}.{_BLOCK_PARTS[module]}.{kind}"] = value
        else:
            raise KeyError(f"cannot convert {key!r}")
    return out


def hf_config_for(state: dict[str, torch.Tensor], hidden_act: str = "gelu") -> CLIPConfig:
    """A ``CLIPConfig`` whose sizes match an OpenAI-layout ViT state dict."""
    vision_width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]

    def layers(prefix: str) -> int:
        return len({k.split(".")[len(prefix.split("."))] for k in state if k.startswith(prefix + ".")})

    return CLIPConfig(
        projection_dim=state["text_projection"].shape[1],
        text_config={
            "vocab_size": state["token_embedding.weight"].shape[0],
            "hidden_size": text_width,
            "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": layers("transformer.resblocks"),
            "num_attention_heads": text_width // 64,
            "max_position_embeddings": state["positional_embedding"].shape[0],
            "hidden_act": hidden_act,
            "layer_norm_eps": 1e-5,
            "projection_dim": state["text_projection"].shape[1],
        },
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": layers("visual.transformer.resblocks"),
            "num_attention_heads": vision_width // 64,
            "image_size": patch * grid,
            "patch_size": patch,
            "hidden_act": hidden_act,
            "layer_norm_eps": 1e-5,
            "projection_dim": state["text_projection"].shape[1],
        },
    )


def to_hf_clip(state: dict[str, torch.Tensor], hidden_act: str = "gelu") -> CLIPModel:
    """A transformers ``CLIPModel`` holding exactly the weights of ``state``.

    Every parameter must be filled: only the ``position_ids`` buffers may be absent from the
    converted dict, and nothing may be left over.
    """
    with no_init_weights():  # every parameter is overwritten below; skip the slow random init
        model = CLIPModel(hf_config_for(state, hidden_act)).eval()
    result = model.load_state_dict(convert_state_dict(state), strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise KeyError(f"conversion incomplete: missing {missing}, unexpected {result.unexpected_keys}")
    return model
