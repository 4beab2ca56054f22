"""Backbones from a Hugging Face ``CLIPModel`` directory (config.json + safetensors or bin)."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from torchvision import transforms

from ..errors import ModelLoadError
from .backbone import Backbone, BackboneInfo
from .checkpoints import file_sha256
from .encoders import Tower, run_tower
from .hf_towers import HFTextTower, HFVisionTower
from .openclip import open_clip_token_lengths, simple_token_sequences

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hf_clip_dir(path: Path) -> bool:
    """A folder with a transformers ``config.json`` whose model type is CLIP."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "clip"
    except (OSError, ValueError):
        return False


class HFClipBackbone(Backbone):
    """Wraps ``transformers.CLIPModel``; tokenizes with the folder's tokenizer files.

    Without tokenizer files it falls back to open_clip's CLIP BPE tokenizer (the same vocabulary
    as OpenAI CLIP); the text tower pools at the end-of-text token, so padding ids do not matter.
    """

    def __init__(self, model, preprocess, tokenizer, info, model_id, device="cpu", preprocess_config=None):
        super().__init__(model, preprocess, info, model_id, device, tokenizer=tokenizer,
                         preprocess_config=preprocess_config)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(self._tokenizer, open_clip.SimpleTokenizer):
            return self._tokenizer(list(texts))
        out = self._tokenizer(
            list(texts), padding="max_length", truncation=True,
            max_length=self.context_length, return_tensors="pt",
        )
        return out["input_ids"]

    def _token_sequences(self, texts: Sequence[str]) -> list[list[int]] | None:
        if isinstance(self._tokenizer, open_clip.SimpleTokenizer):
            return simple_token_sequences(self._tokenizer, texts)
        tok = self._tokenizer
        if tok.bos_token_id is None or tok.eos_token_id is None or getattr(tok, "padding_side", "right") != "right":
            return None  # pack_tokens could not reproduce its ids: lengths only (_token_lengths)
        ids = tok(list(texts), truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
        if any(seq[:1] != [tok.bos_token_id] or seq[-1:] != [tok.eos_token_id] for seq in ids):
            return None  # not start ... end: chunk_tokens would misread it
        return [list(seq) for seq in ids]

    def _token_lengths(self, texts: Sequence[str]) -> list[int] | None:
        if isinstance(self._tokenizer, open_clip.SimpleTokenizer):
            return open_clip_token_lengths(self._tokenizer, texts)
        ids = self._tokenizer(list(texts), truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
        return [len(seq) for seq in ids]

    def _pooling(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """transformers' CLIP text pooling: the highest id for legacy configs (eos == 2), else the first eos."""
        text = self.model.text_model
        eos = getattr(text, "eos_token_id", text.config.eos_token_id)
        if eos == 2:
            tok_eos = self._tokenizer_eos()
            return None if tok_eos is None else (tokens.argmax(dim=-1), int(tok_eos))
        return (tokens == eos).int().argmax(dim=-1), int(eos)

    def _tokenizer_eos(self) -> int | None:
        tok = self._tokenizer
        return tok.eot_token_id if isinstance(tok, open_clip.SimpleTokenizer) else tok.eos_token_id

    def _special_ids(self) -> tuple[int, int, int]:
        tok = self._tokenizer
        if isinstance(tok, open_clip.SimpleTokenizer):
            return tok.sot_token_id, tok.eot_token_id, 0
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return tok.bos_token_id, tok.eos_token_id, pad

    def _image_forward(self, images: torch.Tensor) -> torch.Tensor:
        prompts = self.attached_prompts("image")
        if prompts:
            return run_tower(self.image_tower(), images, prompts)
        pooled = self.model.vision_model(pixel_values=images).pooler_output
        return self.model.visual_projection(pooled)

    def _text_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        prompts = self.attached_prompts("text")
        if prompts:
            return run_tower(self.text_tower(), tokens, prompts)
        pooled = self.model.text_model(input_ids=tokens).pooler_output
        return self.model.text_projection(pooled)

    def image_tower(self) -> Tower:
        """``CLIPVisionModel`` + ``visual_projection`` block by block."""
        return HFVisionTower(self.info.name, self.model)

    def text_tower(self) -> Tower:
        """``CLIPTextModel`` + ``text_projection`` block by block."""
        return HFTextTower(self.info.name, self.model)

    def _tower_modules(self, tower: str) -> list[tuple[str, torch.nn.Module]]:
        model = self.model
        if tower == "image":
            return [("vision_model", model.vision_model), ("visual_projection", model.visual_projection)]
        return [("text_model", model.text_model), ("text_projection", model.text_projection)]

    def _token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.text_model.embeddings.token_embedding(tokens)

    def _text_forward_from_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """transformers' CLIP text-model forward from ``inputs_embeds``, then the text projection."""
        text = self.model.text_model
        hidden = text.embeddings(inputs_embeds=embeddings)
        if "causal_attention_mask" in inspect.signature(text.encoder.forward).parameters:  # transformers 4.x
            from transformers.modeling_attn_mask_utils import _create_4d_causal_attention_mask

            causal = _create_4d_causal_attention_mask(tokens.shape, hidden.dtype, device=hidden.device)
            last = text.encoder(inputs_embeds=hidden, attention_mask=None, causal_attention_mask=causal)[0]
        else:  # transformers 5.x
            from transformers.masking_utils import create_causal_mask

            mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=None, cache=None)
            last = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)[0]
        last = text.final_layer_norm(last)
        ids = tokens.to(dtype=torch.int, device=last.device)
        eos = getattr(text, "eos_token_id", text.config.eos_token_id)
        # transformers pools at the highest id for configs from before the eos_token_id fix (eos == 2)
        index = ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), index]
        return self.model.text_projection(pooled)

    def _patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        hidden = vision(pixel_values=images).last_hidden_state[:, 1:]
        return self.model.visual_projection(vision.post_layernorm(hidden))

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def _logit_scale_param(self) -> torch.Tensor:
        return self.model.logit_scale


def hf_preprocess_config(path: Path, image_size: int) -> dict:
    """The values of the folder's ``preprocessor_config.json`` that :func:`hf_preprocess` applies."""
    cfg_file = path / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    size = cfg.get("size", image_size)
    size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
    crop = cfg.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    return {
        "pipeline": "hf-clip",
        "size": int(size),
        "crop": int(crop),
        "mode": "RGB",
        "mean": [float(v) for v in cfg.get("image_mean", open_clip.OPENAI_DATASET_MEAN)],
        "std": [float(v) for v in cfg.get("image_std", open_clip.OPENAI_DATASET_STD)],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def hf_preprocess(config: dict):
    """torchvision equivalent of a CLIPImageProcessor: resize shortest side, crop, normalise (``config`` values)."""
    return transforms.Compose([
        transforms.Resize(config["size"], interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(config["crop"]),
        transforms.Lambda(_to_rgb),
        transforms.ToTensor(),
        transforms.Normalize(config["mean"], config["std"]),
    ])


def _to_rgb(image):
    return image.convert("RGB")


def _hf_tokenizer(path: Path, context_length: int):
    has_vocab = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
    if not has_vocab:
        return open_clip.SimpleTokenizer(context_length=context_length)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def hf_model_id(path: Path, weights: Path) -> str:
    """Fingerprint of the weights and of the configs that change outputs (architecture, preprocessing)."""
    parts = [file_sha256(weights)]
    parts += [(path / name).read_text() for name in ("config.json", "preprocessor_config.json")
              if (path / name).is_file()]
    return "hf:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_hf_dir(path: Path, device: str = "cpu", given: str | None = None) -> HFClipBackbone:
    """Load a transformers CLIPModel folder; weights via safetensors or ``torch.load(weights_only)``."""
    from transformers import CLIPModel

    weights = next((path / name for name in HF_WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"{path}: Hugging Face CLIP folder has no {' or '.join(HF_WEIGHT_FILES)}")
    model_id = hf_model_id(path, weights)
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True, use_safetensors=None)
    except Exception as exc:  # transformers raises many types; report them as one
        raise ModelLoadError(f"{path}: cannot load Hugging Face CLIPModel: {exc}") from exc
    model = model.float()
    image_size = int(model.config.vision_config.image_size)
    context_length = int(model.config.text_config.max_position_embeddings)
    given = given or str(path)
    info = BackboneInfo(
        name=str(path), pretrained=None, source="hf",
        quick_gelu=model.config.vision_config.hidden_act == "quick_gelu", benchmark=(given, given),
    )
    preprocess_config = hf_preprocess_config(path, image_size)
    return HFClipBackbone(model, hf_preprocess(preprocess_config), _hf_tokenizer(path, context_length), info,
                          model_id, device, preprocess_config=preprocess_config)
