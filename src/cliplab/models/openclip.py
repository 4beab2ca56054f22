"""Backbones built by open_clip: named architectures, pretrained tags, hf-hub names, local files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, fields

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import TextTransformer, text_global_pool

from ..errors import DenseFeaturesUnavailableError
from .backbone import Backbone, BackboneInfo
from .encoders import Tower, run_tower
from .openclip_towers import OpenClipTextTower, OpenClipVisionTower

_PREPROCESS_KEYS = {f.name for f in fields(PreprocessCfg)}


class OpenClipBackbone(Backbone):
    """Wraps an ``open_clip`` CLIP / CustomTextCLIP model with its tokenizer and transform.

    ``preprocess_config`` defaults to the preprocessing config open_clip attached to the model.
    """

    def __init__(self, model, preprocess, tokenizer, info: BackboneInfo, model_id: str, device="cpu",
                 preprocess_config: dict | None = None):
        if preprocess_config is None:
            preprocess_config = preprocess_config_for(model)
        super().__init__(model, preprocess, info, model_id, device, tokenizer=tokenizer,
                         preprocess_config=preprocess_config)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))

    def _token_sequences(self, texts: Sequence[str]) -> list[list[int]] | None:
        return simple_token_sequences(self._tokenizer, texts)

    def _token_lengths(self, texts: Sequence[str]) -> list[int] | None:
        return open_clip_token_lengths(self._tokenizer, texts)

    def _pooling(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """Where open_clip's ``text_global_pool`` reads each row (argmax, eos, last), and the end-of-text id."""
        model = self.model
        text = getattr(model, "text", None)
        if isinstance(text, TextTransformer) and text.cls_emb is None:
            pool, eos_id = text.pool_type, getattr(text, "eos_id", None)
        elif text is None and hasattr(model, "text_pool_type"):
            pool, eos_id = model.text_pool_type, getattr(model, "text_eos_id", None)
        else:  # CoCa, Hugging Face text towers (cls / mean pooling), TorchScript
            return None
        eot = _tokenizer_eos(self._tokenizer)
        if pool == "argmax" and eot is not None:
            return tokens.argmax(dim=-1), eot
        if pool == "eos" and eos_id is not None:
            return (tokens == eos_id).int().argmax(dim=-1), int(eos_id)
        if pool == "last" and eot is not None:
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1), eot
        return None

    def _special_ids(self) -> tuple[int, int, int]:
        if not _is_plain_simple_tokenizer(self._tokenizer):
            return super()._special_ids()
        return self._tokenizer.sot_token_id, self._tokenizer.eot_token_id, 0

    def _image_forward(self, images: torch.Tensor) -> torch.Tensor:
        prompts = self.attached_prompts("image")
        return run_tower(self.image_tower(), images, prompts) if prompts else self.model.encode_image(images)

    def _text_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        prompts = self.attached_prompts("text")
        return run_tower(self.text_tower(), tokens, prompts) if prompts else self.model.encode_text(tokens)

    def image_tower(self) -> Tower:
        """open_clip's ``VisionTransformer`` block by block (ResNet towers: UnsupportedOperationError)."""
        return OpenClipVisionTower(self.info.name, self.model.visual)

    def text_tower(self) -> Tower:
        """The CLIP class's text transformer or a ``TextTransformer``, block by block."""
        return OpenClipTextTower(self.info.name, self.model)

    def _tower_modules(self, tower: str) -> list[tuple[str, torch.nn.Module]]:
        model = self.model
        if isinstance(model, torch.jit.ScriptModule):
            raise self._unsupported("reparametrisation", "a TorchScript model")
        if tower == "image":
            return [("visual", model.visual)]
        text = getattr(model, "text", None)
        if text is not None:
            return [("text", text)]
        roots = [("transformer", model.transformer)]
        if isinstance(getattr(model, "text_projection", None), torch.nn.Module):
            roots.append(("text_projection", model.text_projection))
        return roots

    def _bare_projections(self, tower: str) -> list[tuple[str, torch.nn.Module, str]]:
        model = self.model
        if tower == "image":
            return [("visual.proj", model.visual, "proj")] if hasattr(model.visual, "proj") else []
        holder = getattr(model, "text", None) or model
        prefix = "text." if holder is not model else ""
        return [(f"{prefix}text_projection", holder, "text_projection")] if hasattr(holder, "text_projection") else []

    def _text_tower(self) -> torch.nn.Module:
        """The module holding the text transformer: the CLIP itself, or CustomTextCLIP's open_clip ``text``."""
        model = self.model
        if isinstance(model, torch.jit.ScriptModule):
            raise self._unsupported("prompt learning", "a TorchScript model")
        text = getattr(model, "text", None)
        if text is None and hasattr(model, "token_embedding") and hasattr(model, "attn_mask"):
            return model
        if isinstance(text, TextTransformer):
            return text
        kind = type(text).__name__ if text is not None else type(model).__name__
        raise self._unsupported("prompt learning", f"its text tower is {kind}, not open_clip's TextTransformer")

    def _token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._text_tower().token_embedding(tokens)

    def _text_forward_from_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        tower = self._text_tower()
        if tower is self.model:  # mirrors open_clip CLIP.encode_text
            cast_dtype = tower.transformer.get_cast_dtype()
            x = embeddings.to(cast_dtype) + tower.positional_embedding.to(cast_dtype)
            x = tower.transformer(x, attn_mask=tower.attn_mask)
            x = tower.ln_final(x)
            x = text_global_pool(x, tokens, tower.text_pool_type, eos_token_id=getattr(tower, "text_eos_id", None))
            return _project(x, tower.text_projection)
        return _text_transformer_from_embeddings(tower, embeddings, tokens)

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


def _is_plain_simple_tokenizer(tokenizer) -> bool:
    """open_clip's CLIP BPE tokenizer that truncates (no reduction strategy): ids = start, text, end, zeros."""
    return isinstance(tokenizer, open_clip.SimpleTokenizer) and getattr(tokenizer, "reduction_fn", None) is None


def simple_token_sequences(tokenizer, texts: Sequence[str]) -> list[list[int]] | None:
    """Untruncated ids (start + text + end) from a plain SimpleTokenizer, else None."""
    if not _is_plain_simple_tokenizer(tokenizer):
        return None
    return [[tokenizer.sot_token_id, *tokenizer.encode(text), tokenizer.eot_token_id] for text in texts]


def open_clip_token_lengths(tokenizer, texts: Sequence[str]) -> list[int] | None:
    """Untruncated token counts from open_clip's tokenizers: SimpleTokenizer (any reduction) and HFTokenizer
    (its transformers tokenizer, special tokens added, after the same cleaning); None for others."""
    texts = list(texts)
    if isinstance(tokenizer, open_clip.SimpleTokenizer):
        return [len(tokenizer.encode(text)) + 2 for text in texts]
    if isinstance(tokenizer, HFTokenizer):
        cleaned = [tokenizer.clean_fn(text) for text in texts]
        if getattr(tokenizer, "tokenizer_mode", "") == "clips":  # start + text + end + the appended class token
            ids = tokenizer.tokenizer(cleaned, add_special_tokens=False, truncation=False, verbose=False)
            return [len(seq) + 3 for seq in ids["input_ids"]]
        ids = tokenizer.tokenizer(cleaned, add_special_tokens=True, truncation=False, verbose=False)
        return [len(seq) for seq in ids["input_ids"]]
    return None


def _tokenizer_eos(tokenizer) -> int | None:
    """The end-of-text id an open_clip tokenizer writes, None where unknown."""
    if isinstance(tokenizer, open_clip.SimpleTokenizer):
        return int(tokenizer.eot_token_id)
    eos = getattr(getattr(tokenizer, "tokenizer", None), "eos_token_id", None)
    return None if eos is None else int(eos)


def _project(x: torch.Tensor, projection) -> torch.Tensor:
    if projection is None:
        return x
    if isinstance(projection, torch.nn.Linear):
        return projection(x)
    return x @ projection


def _text_transformer_from_embeddings(text: TextTransformer, embeddings: torch.Tensor,
                                      tokens: torch.Tensor) -> torch.Tensor:
    """open_clip ``TextTransformer.forward`` (with ``_embeds``) starting from token embeddings."""
    cast_dtype = text.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype)
    seq_len = tokens.shape[1]
    if text.cls_emb is not None:
        x = torch.cat([x, text.cls_emb.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)], 1)
        seq_len += 1
    attn_mask = text.attn_mask
    if text.use_pad_mask or text.cls_emb is not None:
        add_mask = text._build_additive_mask(tokens, seq_len, x.dtype)
        attn_mask = add_mask if attn_mask is None else attn_mask[:seq_len, :seq_len].unsqueeze(0) + add_mask
    x = x + text.positional_embedding[:seq_len].to(cast_dtype)
    x = text.transformer(x, attn_mask=attn_mask)
    if text.cls_emb is not None:  # CoCa: the appended class token, normed after pooling
        pooled = text.ln_final(text_global_pool(x, pool_type="last"))
    else:
        x = text.ln_final(x)
        pooled = text_global_pool(x, tokens, pool_type=text.pool_type, eos_token_id=getattr(text, "eos_id", None))
    return _project(pooled, text.text_projection)


def preprocess_config_for(model: torch.nn.Module) -> dict:
    """The full evaluation preprocessing config open_clip attached to ``model`` (defaults filled in)."""
    cfg = {k: v for k, v in open_clip.get_model_preprocess_cfg(model).items() if k in _PREPROCESS_KEYS}
    return {"pipeline": "open_clip", **asdict(PreprocessCfg(**cfg))}


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
    context_length = int(getattr(model, "context_length", 77))  # a Long-CLIP checkpoint: 248
    if arch and open_clip.get_model_config(arch) is not None:
        return open_clip.get_tokenizer(arch, context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length)


def transform_for(model: torch.nn.Module):
    """Evaluation transform from the preprocessing config open_clip attached to the model."""
    cfg = {k: v for k, v in open_clip.get_model_preprocess_cfg(model).items() if k in _PREPROCESS_KEYS}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
