"""``tiny``: a small randomly initialised CLIP built in-process, for tests and CLI try-outs."""

from __future__ import annotations

import open_clip
import torch
from open_clip.model import CLIP

from .backbone import BackboneInfo
from .openclip import OpenClipBackbone, transform_for

TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_tiny_model(seed: int = 0) -> CLIP:
    """A 2-layer ViT/2-layer text CLIP (32 px input, 64-d embeddings), weights drawn with ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**TINY_CONFIG)
    open_clip.set_model_preprocess_cfg(model, {"size": TINY_CONFIG["vision_cfg"]["image_size"]} | _OPENAI_NORM)
    return model.eval()


_OPENAI_NORM = {
    "mode": "RGB",
    "mean": open_clip.OPENAI_DATASET_MEAN,
    "std": open_clip.OPENAI_DATASET_STD,
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}


def load_tiny(seed: int = 0, device: str = "cpu") -> OpenClipBackbone:
    """The tiny backbone; its ``model_id`` is ``tiny-seed{seed}``, its weights random."""
    model = build_tiny_model(seed)
    info = BackboneInfo(name="tiny", pretrained=None, source="tiny", quick_gelu=False, random_weights=True,
                        benchmark=("tiny", "random"))
    tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CONFIG["text_cfg"]["context_length"])
    return OpenClipBackbone(model, transform_for(model), tokenizer, info, f"tiny-seed{seed}", device)
