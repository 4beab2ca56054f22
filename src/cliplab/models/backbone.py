"""The Backbone contract: one interface over open_clip and Hugging Face CLIP models."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class BackboneInfo:
    """Where a backbone came from; recorded in results JSON and cache keys."""

    name: str
    pretrained: str | None
    source: str  # "open_clip", "hf", "local", "openai-jit", "tiny"
    quick_gelu: bool | None = None
    random_weights: bool = False
    extra: dict = field(default_factory=dict)


class Backbone(ABC):
    """A CLIP-style dual encoder.

    ``encode_images`` and ``encode_texts`` return L2-normalised float32 tensors on the CPU;
    ``model_id`` is a stable string (architecture + weights fingerprint) keying every cache.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        info: BackboneInfo,
        model_id: str,
        device: str | torch.device = "cpu",
        text_batch_size: int = 256,
    ):
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.info = info
        self.model_id = model_id
        self.device = torch.device(device)
        self.text_batch_size = text_batch_size

    # -- to implement per source -------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (m, context_length)."""

    @abstractmethod
    def _image_forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings (n, d)."""

    @abstractmethod
    def _text_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings (m, d)."""

    @abstractmethod
    def _patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens projected into the joint space (n, num_patches, d), unnormalised."""

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Dimension of the joint embedding space."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """Number of text tokens the text tower takes."""

    @property
    @abstractmethod
    def _logit_scale_param(self) -> torch.Tensor:
        """The model's learned log temperature."""

    # -- shared behaviour ----------------------------------------------------------------
    @property
    def logit_scale(self) -> float:
        """exp(learned log temperature), 100 for trained OpenAI models (clamped as CLIP does)."""
        return float(self._logit_scale_param.detach().float().exp().clamp(max=100.0).item())

    @property
    def preprocess_id(self) -> str:
        """A stable description of the image preprocessing, part of the feature cache key."""
        return repr(self.preprocess)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of preprocessed images (n, 3, H, W) -> (n, d) L2-normalised float32."""
        feats = self._image_forward(images.to(self.device))
        return F.normalize(feats.float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed strings -> (m, d) L2-normalised float32, in batches of ``text_batch_size``."""
        texts = list(texts)
        if not texts:
            return torch.zeros((0, self.embed_dim), dtype=torch.float32)
        chunks = []
        for start in range(0, len(texts), self.text_batch_size):
            tokens = self.tokenize(texts[start : start + self.text_batch_size]).to(self.device)
            chunks.append(F.normalize(self._text_forward(tokens).float(), dim=-1).cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens after the final norm, projected into the joint space and L2-normalised.

        Shape (n, num_patches, d): the "local features" that GL-MCM and dense zero-shot
        methods score against text embeddings. ResNet towers raise DenseFeaturesUnavailableError.
        """
        tokens = self._patch_tokens(images.to(self.device))
        return F.normalize(tokens.float(), dim=-1).cpu()

    def to(self, device: str | torch.device) -> Backbone:
        """Move the model to ``device`` and return self."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def __deepcopy__(self, memo) -> Backbone:
        """Backbones are shared, read-only resources: ``sklearn.base.clone`` of a head keeps the same one."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r}, embed_dim={self.embed_dim})"
