"""The Backbone contract: one interface over open_clip and Hugging Face CLIP models."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import TextTooLongError, UnsupportedOperationError
from .fingerprint import config_json, strip_addresses, tokenizer_fingerprint, weights_digest, weights_key
from .runtime import Engine, check_options


class TextTruncatedWarning(UserWarning):
    """Texts longer than the model's context were cut (end-of-text token kept)."""


class TextLengthUnknownWarning(UserWarning):
    """The tokenizer cannot say how long texts are untruncated: long ones may have been cut unseen."""


LONG_TEXT_POLICIES = ("truncate", "chunk", "error")


def check_long_text(policy: str) -> str:
    """``policy`` if it is one of :data:`LONG_TEXT_POLICIES`, else a ValueError naming them."""
    if policy not in LONG_TEXT_POLICIES:
        raise ValueError(f"long_text must be one of {', '.join(LONG_TEXT_POLICIES)}; got {policy!r}")
    return policy


@dataclass
class BackboneInfo:
    """Where a backbone came from; recorded in results JSON and cache keys.

    ``benchmark`` is ``(model, pretrained)`` as CLIP_benchmark's results JSON names the model.
    """

    name: str
    pretrained: str | None
    source: str  # "open_clip", "hf", "local", "openai-jit", "tiny"
    quick_gelu: bool | None = None
    random_weights: bool = False
    extra: dict = field(default_factory=dict)
    benchmark: tuple[str, str] | None = None


class Backbone(ABC):
    """A CLIP-style dual encoder.

    ``encode_images`` and ``encode_texts`` return L2-normalised float32 tensors on the CPU, without
    autograd; ``forward_images``/``forward_texts``/``forward_text_embeddings`` are their trainable,
    on-device counterparts. ``model_id`` is a stable string (architecture + weights fingerprint)
    keying every cache. Parameters are frozen on load; :meth:`derive` makes a trainable copy.
    The encoders run in the precision and runtime set by :meth:`set_inference` (``models/runtime.py``);
    ``encoding_id`` and ``text_encoding_id`` name them in the feature cache keys. ``long_text`` is the
    default policy of :meth:`encode_texts` for texts longer than ``context_length``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        info: BackboneInfo,
        model_id: str,
        device: str | torch.device = "cpu",
        text_batch_size: int = 256,
        *,
        tokenizer: Any = None,
        preprocess_config: dict | None = None,
    ):
        self.model = model.eval().to(device)
        self.model.requires_grad_(False)
        self.preprocess = preprocess
        self.info = info
        self._model_id = model_id
        self.device = torch.device(device)
        self.text_batch_size = text_batch_size
        self._tokenizer = tokenizer
        self._tokenizer_id: str | None = None
        if preprocess_config is None:  # a custom backbone: describe the transform, memory addresses removed
            preprocess_config = {"transform": strip_addresses(repr(preprocess))}
        self.preprocess_config: dict = json.loads(config_json(preprocess_config))  # JSON types only
        self._derived: tuple[str, str] | None = None  # (parent model_id, tag) for derive()d copies
        self._digest_memo: tuple[Any, str] | None = None
        self.engine = Engine()  # inference precision and runtime: set_inference()
        self.long_text = "truncate"  # encode_texts' policy for texts over the context: truncate, chunk, error
        self._warned_unknown_lengths = False  # TextLengthUnknownWarning is given once per backbone

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

    def _token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """The text tower's token-embedding lookup (m, L, width)."""
        raise self._unsupported("token_embeddings")

    def _text_forward_from_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings (m, d) from token embeddings (m, L, width)."""
        raise self._unsupported("forward_text_embeddings")

    def _token_sequences(self, texts: Sequence[str]) -> list[list[int]] | None:
        """Untruncated token ids per text, start and end tokens included; None where the tokenizer cannot say."""
        return None

    def _token_lengths(self, texts: Sequence[str]) -> list[int] | None:
        """Untruncated token counts where ``_token_sequences`` cannot give the ids; None where nothing can."""
        return None

    def _pooling(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """``(positions (m,), id)``: where the text tower pools each row of ``tokens`` and the end-of-text id it
        means to pool there; None for towers that do not pool at an end-of-text token (or unknown ones)."""
        return None

    def _tokenizer_name(self) -> str:
        tok = self._tokenizer
        inner = getattr(tok, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers tokenizer
        name = f"{type(tok).__name__}({type(inner).__name__})" if inner is not None else type(tok).__name__
        path = getattr(inner if inner is not None else tok, "name_or_path", "")
        return f"{name} {path}".strip() if isinstance(path, str) else name

    def _special_ids(self) -> tuple[int, int, int]:
        """``(start, end, pad)`` token ids."""
        raise self._unsupported("long_text='chunk'", "its tokenizer's special tokens are unknown")

    def _unsupported(self, what: str, why: str = "") -> UnsupportedOperationError:
        reason = why or f"{type(self).__name__} does not implement it"
        return UnsupportedOperationError(f"{self.info.name}: {what} is not available for this model ({reason})")

    # -- identity ------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """The cache key of the weights; for a :meth:`derive`d copy ``PARENT+TAG:HASH`` of its current weights."""
        if self._derived is None:
            return self._model_id
        parent, tag = self._derived
        return f"{parent}+{tag}:{self.weights_digest()}"

    @model_id.setter
    def model_id(self, value: str) -> None:
        """Set a fixed id (it no longer follows the weights)."""
        self._model_id = value
        self._derived = None

    def weights_digest(self) -> str:
        """sha256 (16 hex digits) of every parameter and buffer, recomputed only after a tensor changed.

        Changes are seen through each tensor's version counter and storage pointer: in-place updates
        (optimizer steps, ``load_state_dict``, ``copy_`` under ``no_grad``) and replaced tensors. Writes
        through ``tensor.data`` bypass the version counter and are not seen.
        """
        key = weights_key(self.model)
        if key is None or self._digest_memo is None or self._digest_memo[0] != key:
            self._digest_memo = (key, weights_digest(self.model))
        return self._digest_memo[1]

    @property
    def preprocess_id(self) -> str:
        """Stable JSON of ``preprocess_config``: the image preprocessing part of feature cache keys."""
        return config_json(self.preprocess_config)

    @property
    def tokenizer_id(self) -> str:
        """A stable description of the tokenizer (class, context length, vocabulary hash), part of text cache keys."""
        if self._tokenizer_id is None:
            self._tokenizer_id = tokenizer_fingerprint(self._tokenizer, self.context_length)
        return self._tokenizer_id

    @property
    def encoding_id(self) -> str:
        """``PRECISION-RUNTIME`` the image tower runs with for inference (``fp32-torch``, ``bf16-torch``,
        ``fp32-onnx``...), after any fallback; part of image cache keys."""
        return self.engine.encoding_id(self, "image")

    @property
    def text_encoding_id(self) -> str:
        """``PRECISION-RUNTIME`` the text tower runs with for inference; part of text cache keys."""
        return self.engine.encoding_id(self, "text")

    def set_inference(self, precision: str | None = None, runtime: str | None = None, *,
                      onnx_dir: str | Path | None = None) -> Backbone:
        """Run ``encode_images``/``encode_texts`` in ``precision`` (fp32, bf16, fp16 on CUDA) with ``runtime``
        (torch, onnx, int8); None means the default (``models/runtime.py``). Returns self."""
        precision, runtime = check_options(precision, runtime, self.device)
        self.engine = Engine(precision, runtime, onnx_dir)
        return self

    def benchmark_names(self) -> tuple[str, str]:
        """``(model, pretrained)`` as CLIP_benchmark writes them in its results JSON."""
        if self.info.benchmark is not None:
            return self.info.benchmark
        return self.info.name, self.info.pretrained or ""

    # -- shared behaviour ----------------------------------------------------------------
    @property
    def logit_scale(self) -> float:
        """exp(learned log temperature), 100 for trained OpenAI models (clamped as CLIP does)."""
        return float(self._logit_scale_param.detach().float().exp().clamp(max=100.0).item())

    def forward_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed preprocessed images (n, 3, H, W) -> (n, d) on the backbone's device, with autograd."""
        feats = self._image_forward(images.to(self.device))
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward_texts(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed token ids (m, L) -> (m, d) on the backbone's device, with autograd."""
        feats = self._text_forward(tokens.to(self.device))
        return F.normalize(feats, dim=-1) if normalize else feats

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """The text tower's token-embedding lookup (m, L) -> (m, L, width): what prompt learning edits."""
        return self._token_embeddings(tokens.to(self.device))

    def forward_text_embeddings(
        self, embeddings: torch.Tensor, tokens: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Run the text tower from token embeddings (m, L, width) -> (m, d), with autograd.

        ``tokens`` (m, L) are the ids the embeddings stand for: they choose the pooled position
        (end-of-text token) exactly as the model does for ids. ``forward_text_embeddings(
        token_embeddings(t), t)`` equals ``forward_texts(t)``.
        """
        if embeddings.shape[:2] != tokens.shape:
            raise ValueError(f"embeddings {tuple(embeddings.shape)} do not match tokens {tuple(tokens.shape)}")
        feats = self._text_forward_from_embeddings(embeddings.to(self.device), tokens.to(self.device))
        return F.normalize(feats, dim=-1) if normalize else feats

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of preprocessed images (n, 3, H, W) -> (n, d) L2-normalised float32."""
        feats = self.engine.forward(self, "image", images)
        return F.normalize(feats.float(), dim=-1).cpu()

    def text_lengths(self, texts: Sequence[str]) -> list[int] | None:
        """Untruncated token counts (start and end tokens included), None where the tokenizer cannot say."""
        return self._measure(list(texts))[1]

    def _measure(self, texts: list[str]) -> tuple[list[list[int]] | None, list[int] | None]:
        """``(untruncated ids or None, untruncated lengths or None)``: one tokenization pass where ids are known."""
        sequences = self._token_sequences(texts)
        if sequences is not None:
            return sequences, [len(seq) for seq in sequences]
        return None, self._token_lengths(texts)

    def _check_pooled(self, tokens: torch.Tensor, rows: Sequence[int]) -> None:
        """Raise where a truncated row lost the end-of-text token at the position the text tower pools."""
        pooling = self._pooling(tokens) if rows else None
        if pooling is None:
            return
        positions, eos = pooling
        bad = [r for r in rows if int(tokens[r, int(positions[r])]) != eos]
        if bad:
            raise self._unsupported(
                "long_text='truncate'", f"a cut text would be pooled at position {int(positions[bad[0]])}, which "
                f"holds token {int(tokens[bad[0], int(positions[bad[0]])])} instead of the end-of-text token {eos} "
                f"({len(bad)} text(s)); use long_text='chunk' or 'error'")

    def pack_tokens(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Token ids (m, context_length) from id sequences: a longer one is cut with its end-of-text token
        moved to the last position (the pooled position of argmax/EOT pooling), shorter ones padded."""
        _, eot, pad = self._special_ids()
        n = self.context_length
        out = torch.full((len(sequences), n), pad, dtype=torch.long)
        for i, seq in enumerate(sequences):
            seq = list(seq)
            if len(seq) > n:
                seq = seq[: n - 1] + [eot]
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return out

    def chunk_tokens(self, sequence: Sequence[int]) -> list[list[int]]:
        """Split one id sequence (start ... end) into context-sized pieces, each with its own start and end."""
        sot, eot, _ = self._special_ids()
        body = list(sequence)
        if body and body[0] == sot:
            body = body[1:]
        if body and body[-1] == eot:
            body = body[:-1]
        step = self.context_length - 2
        return [[sot, *body[i : i + step], eot] for i in range(0, max(len(body), 1), step)]

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        out = [F.normalize(self.engine.forward(self, "text", tokens[i : i + self.text_batch_size]).float(), dim=-1)
               for i in range(0, len(tokens), self.text_batch_size)]
        return torch.cat(out).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], long_text: str | None = None) -> torch.Tensor:
        """Embed strings -> (m, d) L2-normalised float32, in batches of ``text_batch_size``.

        Texts longer than ``context_length`` tokens follow ``long_text`` (default ``self.long_text``):
        ``truncate`` cuts them keeping the end-of-text token last, with one :class:`TextTruncatedWarning`
        naming how many were cut; ``chunk`` embeds context-sized pieces (each with start/end tokens) and
        returns their renormalised mean; ``error`` raises :class:`TextTooLongError`.
        """
        policy = check_long_text(long_text or self.long_text)
        texts = list(texts)
        if not texts:
            return torch.zeros((0, self.embed_dim), dtype=torch.float32)
        sequences, lengths = self._measure(texts)
        if sequences is None and policy == "chunk":
            raise self._unsupported("long_text='chunk'", f"its tokenizer {self._tokenizer_name()} does not give "
                                                         "untruncated token ids")
        n = self.context_length
        if lengths is None:
            if policy == "error":
                raise self._unsupported("long_text='error'", f"the untruncated token counts of its tokenizer "
                                                             f"{self._tokenizer_name()} are unknown")
            if not self._warned_unknown_lengths:
                self._warned_unknown_lengths = True
                warnings.warn(f"{self.info.name}: the untruncated token counts of its tokenizer "
                              f"{self._tokenizer_name()} are unknown; texts over the {n}-token context are cut "
                              "as the tokenizer does, unnoticed", TextLengthUnknownWarning, stacklevel=2)
        long = [] if lengths is None else [i for i, count in enumerate(lengths) if count > n]
        if long and policy == "error":
            raise TextTooLongError(f"{len(long)} text(s) exceed the {n}-token context of {self.info.name} "
                                   f"(the first has {lengths[long[0]]} tokens); use long_text='truncate' "
                                   "or 'chunk'")
        if long and policy == "chunk":
            pieces, owner = [], []
            for i, seq in enumerate(sequences):
                parts = self.chunk_tokens(seq) if len(seq) > n else [seq]
                pieces += parts
                owner += [i] * len(parts)
            feats = self._encode_tokens(self.pack_tokens(pieces))
            sums = torch.zeros((len(texts), feats.shape[1]), dtype=torch.float32)
            sums.index_add_(0, torch.tensor(owner), feats)
            return F.normalize(sums, dim=-1)
        chunks = []
        for start in range(0, len(texts), self.text_batch_size):
            stop = start + self.text_batch_size
            # the ids measured above, packed (a long one cut with end-of-text last), else the tokenizer's own cut
            tokens = self.tokenize(texts[start:stop]) if sequences is None else self.pack_tokens(sequences[start:stop])
            self._check_pooled(tokens, [i - start for i in long if start <= i < stop])
            chunks.append(F.normalize(self.engine.forward(self, "text", tokens).float(), dim=-1).cpu())
        if long:
            warnings.warn(f"{len(long)} of {len(texts)} text(s) exceed the {n}-token context of {self.info.name} "
                          "and were truncated (end-of-text token kept); use long_text='chunk' to embed them whole",
                          TextTruncatedWarning, stacklevel=2)
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

    def derive(self, tag: str = "finetune", trainable: bool = True) -> Backbone:
        """A new backbone over a deep copy of the model, for fine-tuning; this one never changes.

        Its ``model_id`` is ``f"{self.model_id}+{tag}:{weights hash}"`` and follows the copy's
        weights, so caches never serve features of weights it no longer has. Parameters require
        grad if ``trainable``.
        """
        if not tag or any(c in tag for c in "+:/\\"):
            raise ValueError(f"derive tag must be non-empty without '+', ':' or slashes; got {tag!r}")
        clone = copy.copy(self)  # same class and attributes; the model is replaced below
        clone.model = copy.deepcopy(self.model)
        clone.model.requires_grad_(trainable)
        clone.preprocess_config = copy.deepcopy(self.preprocess_config)
        model, pretrained = self.benchmark_names()
        clone.info = dataclasses.replace(
            self.info,
            extra={**self.info.extra, "derived_from": self.model_id, "derive_tag": tag},
            benchmark=(model, "+".join(p for p in (pretrained, tag) if p)),
        )
        clone._derived = (self.model_id, tag)
        clone._digest_memo = None
        clone.engine = self.engine.fresh()
        return clone

    def __deepcopy__(self, memo) -> Backbone:
        """Backbones are shared resources: ``sklearn.base.clone`` of a head keeps the same one (see :meth:`derive`)."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r}, embed_dim={self.embed_dim})"

