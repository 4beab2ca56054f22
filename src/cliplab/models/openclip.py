"""Backbones built by open_clip: named architectures, pretrained tags, hf-hub names, local files."""

from __future__ import annotations

import json
from collections.abc import Sequence

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from ..errors import DenseFeaturesUnavailableError
from .backbone import Backbone, BackboneInfo


class OpenClipBackbone(Backbone):
    """Wraps an ``open_clip`` CLIP / CustomTextCLIP model with its tokenizer and transform."""

    def __init__(self, model, preprocess, tokenizer, info: BackboneInfo, model_id: str, device="cpu"):
        super().__init__(model, preprocess, info, model_id, device)
        self._tokenizer = tokenizer

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))

    def _image_forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def _text_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def _patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        proj = getattr(visual, "proj", None)
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "ln_post") or proj is None:
            raise DenseFeaturesUnavailableError(
                f"{self.info.name}: dense_features needs a ViT image tower with a projection; "
                f"this one is {type(visual).__name__}"
            )
        out = visual.forward_intermediates(
            images, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][-1] @ proj

    @property
    def preprocess_id(self) -> str:
        """The transform's repr plus open_clip's full preprocessing config (fill colour, resize mode...)."""
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        return repr(self.preprocess) + json.dumps(cfg, sort_keys=True, default=str)

    @property
    def embed_dim(self) -> int:
        visual = self.model.visual
        output_dim = getattr(visual, "output_dim", None)
        if output_dim is not None:
            return int(output_dim)
        return int(self.model.text_projection.shape[1])

    @property
    def context_length(self) -> int:
        return int(getattr(self._tokenizer, "context_length", None) or self.model.context_length)

    @property
    def _logit_scale_param(self) -> torch.Tensor:
        return self.model.logit_scale


def pretrained_tag_uses_quick_gelu(arch: str, tag: str) -> bool:
    """True where open_clip's pretrained table says the tag was trained with QuickGELU.

    open_clip only warns on a mismatch (open_clip issue 771); cliplab forces the right activation.
    """
    return bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False))


def openai_checkpoint_sha256s() -> dict[str, str]:
    """sha256 of every original OpenAI CLIP file, read from the URLs in open_clip's table.

    OpenAI publishes each checkpoint under a URL that contains its sha256, so a local file whose
    hash is in this map is an OpenAI checkpoint and was trained with QuickGELU.
    """
    found: dict[str, str] = {}
    for arch, tag in open_clip.list_pretrained():
        url = open_clip.get_pretrained_cfg(arch, tag).get("url", "") or ""
        parts = url.rstrip("/").split("/")
        if "openaipublic" in url and len(parts) >= 2 and len(parts[-2]) == 64:
            found[parts[-2]] = arch
    return found


def tokenizer_for(arch: str | None, model: torch.nn.Module):
    """open_clip's tokenizer for a built-in architecture, else CLIP's BPE at the model's length."""
    if arch and open_clip.get_model_config(arch) is not None:
        return open_clip.get_tokenizer(arch)
    context_length = int(getattr(model, "context_length", 77))
    return open_clip.SimpleTokenizer(context_length=context_length)


def transform_for(model: torch.nn.Module):
    """Evaluation transform from the preprocessing config open_clip attached to the model."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
