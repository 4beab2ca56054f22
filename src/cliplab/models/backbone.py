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
from .encoders import SUPPORTED, TOWERS, Hook, Tower, check_prompts, run_tower
from .fingerprint import config_json, strip_addresses, tokenizer_fingerprint, weights_digest, weights_key
from .reparam import DEFAULT_TARGETS, merge, projection_weights, register, reparametrised_names
from .runtime import Engine, check_options

PROMPTS_MODULE = "cliplab_prompts"  # the nn.ModuleDict on a derived model holding attached prompt tokens


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

    @property
    def display_name(self) -> str:
        """The model as a person named it, for tables, titles, results JSON and messages: what was given to
        ``--model`` where it was set (``recipe:NAME``), else ``ARCH:TAG`` for open_clip weights, else the name or
        path loaded. ``model_id`` stays the identity that keys the caches."""
        given = getattr(self, "_display_name", None)
        if given:
            return given
        if self.info.source == "open_clip" and self.info.pretrained:
            return f"{self.info.name}:{self.info.pretrained}"
        return self.info.name

    @display_name.setter
    def display_name(self, value: str | None) -> None:
        self._display_name = value

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

    def forward_images(self, images: torch.Tensor, normalize: bool = True, *,
                       prompts: Sequence[torch.Tensor] | None = None, hook: Hook | None = None) -> torch.Tensor:
        """Embed preprocessed images (n, 3, H, W) -> (n, d) on the backbone's device, with autograd.

        ``prompts`` (``models/encoders.py``): ``prompts[0]`` (p, width) or (n, p, width) inserted after the class
        token, ``prompts[j]`` replacing them before block j (VPT-deep / MaPLe); None uses the prompts attached
        with :meth:`set_prompts` (if any), ``[]`` none. ``hook(j, tokens)`` runs before every block.
        """
        self._check_not_trained_in_place()
        images = images.to(self.device)
        if prompts is None and hook is None:
            feats = self._image_forward(images)  # attached prompts included
        else:
            prompts = self.attached_prompts("image") if prompts is None else prompts
            feats = run_tower(self.image_tower(), images, prompts, hook=hook)
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward_texts(self, tokens: torch.Tensor, normalize: bool = True, *,
                      prompts: Sequence[torch.Tensor] | None = None, embeddings: torch.Tensor | None = None,
                      hook: Hook | None = None) -> torch.Tensor:
        """Embed token ids (m, L) -> (m, d) on the backbone's device, with autograd.

        ``prompts``: ``prompts[0]`` (p, width) or (m, p, width) inserted after the start token (the text moves
        right by p, the end-of-text pooling with it; the last p positions, padding, are dropped), ``prompts[j]``
        replacing positions 1..p before block j (MaPLe's deep text prompts); None uses the attached prompts,
        ``[]`` none. ``embeddings`` (m, L, width) replace the token-embedding lookup of ``tokens``.
        """
        self._check_not_trained_in_place()
        tokens = tokens.to(self.device)
        if embeddings is not None and embeddings.shape[:2] != tokens.shape:
            raise ValueError(f"embeddings {tuple(embeddings.shape)} do not match tokens {tuple(tokens.shape)}")
        if prompts is None and hook is None and embeddings is None:
            feats = self._text_forward(tokens)  # attached prompts included
        else:
            prompts = self.attached_prompts("text") if prompts is None else prompts
            if embeddings is not None and not prompts and hook is None:
                feats = self._text_forward_from_embeddings(embeddings.to(self.device), tokens)
            else:
                embeddings = None if embeddings is None else embeddings.to(self.device)
                feats = run_tower(self.text_tower(), tokens, prompts, embeddings=embeddings, hook=hook)
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
        token_embeddings(t), t)`` equals ``forward_texts(t)`` (attached prompts, if any, are inserted too).
        """
        return self.forward_texts(tokens, normalize, embeddings=embeddings)

    def context_embeddings(self, text: str) -> torch.Tensor:
        """The token embeddings (p, width) of ``text``'s words, start and end tokens left out: how CoOp and
        MaPLe initialise context vectors from words ("a photo of a" -> 4 vectors)."""
        sequences = self._token_sequences([text])
        if sequences is None:
            raise self._unsupported("context_embeddings", "its tokenizer cannot give a text's ids whole")
        ids = sequences[0][1:-1]
        if not ids:
            raise ValueError(f"{text!r} has no tokens between the start and end tokens")
        with torch.no_grad():
            return self._token_embeddings(torch.tensor([ids], device=self.device))[0].detach().clone()

    # -- encoder access: towers, deep prompts, reparametrisation (models/encoders.py, reparam.py) ----------
    def image_tower(self) -> Tower:
        """The image transformer run block by block (``models/encoders.py``); UnsupportedOperationError if none."""
        raise self._unsupported("block-by-block image tower (deep prompts)", f"supported: {SUPPORTED}")

    def text_tower(self) -> Tower:
        """The text transformer run block by block; UnsupportedOperationError if the model has none."""
        raise self._unsupported("block-by-block text tower (deep prompts)", f"supported: {SUPPORTED}")

    def _tower_modules(self, tower: str) -> list[tuple[str, torch.nn.Module]]:
        """``(qualified name, module)`` roots holding the weights of ``tower`` ("image" or "text")."""
        raise self._unsupported("reparametrisation", f"supported: {SUPPORTED} and open_clip ResNet image towers")

    def _bare_projections(self, tower: str) -> list[tuple[str, torch.nn.Module, str]]:
        """Output projections of ``tower`` stored as plain parameters: ``(name, module, attribute)``."""
        return []

    def _require_derived(self, what: str) -> None:
        if self._derived is None:
            raise UnsupportedOperationError(
                f"{self.info.name}: {what} changes the model, and this backbone is shared (frozen, its model_id "
                "fixed): call it on a copy, backbone.derive(tag)")

    def _check_not_trained_in_place(self) -> None:
        """Refuse to train a shared backbone: its parameters must not require grad (a derive()d copy may)."""
        if self._derived is None and torch.is_grad_enabled() and any(
                p.requires_grad for p in self.model.parameters()):
            raise UnsupportedOperationError(
                f"{self.info.name}: parameters of a shared backbone require grad; train a copy, backbone.derive(tag), "
                "whose model_id follows its weights")

    def reparametrize(self, make: Callable[[str, torch.Tensor], torch.nn.Module], *,
                      towers: Sequence[str] = TOWERS, targets: Sequence[str] = DEFAULT_TARGETS,
                      include: Callable[[str], bool] | None = None, freeze_rest: bool = True) -> list[str]:
        """Reparametrise every linear and attention projection weight of ``towers`` (derived copies only).

        ``make(name, weight)`` returns the ``nn.Module`` mapping the stored weight to the weight used
        (``torch.nn.utils.parametrize``), e.g. ``models.reparam.singular_values`` (CLIP-SVD) or ``identity``.
        ``targets``: "linear" (every ``nn.Linear``), "attention" (``in_proj_weight`` / q, k, v projection
        weights), "projection" (open_clip's bare output projections). ``include(name)`` filters by qualified
        name. The stored weights are frozen; with ``freeze_rest`` every other model parameter is too, so only the
        parametrisations' parameters train. Returns the qualified names reparametrised.
        """
        self._require_derived("reparametrize")
        weights = []
        for tower in towers:
            if tower not in TOWERS:
                raise ValueError(f"towers must be among {', '.join(TOWERS)}; got {tower!r}")
            weights += projection_weights(self._tower_modules(tower), targets, self._bare_projections(tower))
        if include is not None:
            weights = [w for w in weights if include(w[0])]
        if freeze_rest:
            self.model.requires_grad_(False)
        names = register(weights, make)
        self._digest_memo = None
        return names

    def reparametrised(self) -> list[str]:
        """Qualified names of the weights currently reparametrised."""
        return reparametrised_names(self.model)

    def merge_reparametrisations(self) -> list[str]:
        """Bake every reparametrised weight into a plain parameter (same outputs); the names merged."""
        self._require_derived("merge_reparametrisations")
        return merge(self.model)

    def set_prompts(self, *, image: Sequence[torch.Tensor] | None = None,
                    text: Sequence[torch.Tensor] | None = None) -> Backbone:
        """Attach deep prompts (each (p, width)) to a derived copy: its forwards and ``encode_images`` /
        ``encode_texts`` use them, and its ``model_id`` covers them. None leaves a tower's prompts, ``[]``
        removes them. Tensors are copied into trainable parameters (``attached_prompts`` returns them)."""
        self._require_derived("set_prompts")
        holder = getattr(self.model, PROMPTS_MODULE, None)
        if holder is None:
            holder = torch.nn.ModuleDict()
            self.model.add_module(PROMPTS_MODULE, holder)
        for modality, given in (("image", image), ("text", text)):
            if given is None:
                continue
            if not given:
                if modality in holder:
                    del holder[modality]
                continue
            if any(t.dim() != 2 for t in given):
                raise ValueError("attached prompts are (p, width) per layer, shared by every input")
            tower = self.image_tower() if modality == "image" else self.text_tower()
            check_prompts(list(given), tower, 1, self.device)
            holder[modality] = torch.nn.ParameterList(
                [torch.nn.Parameter(t.detach().clone().to(self.device).float()) for t in given])
        self._digest_memo = None
        return self

    def attached_prompts(self, modality: str) -> list[torch.Tensor]:
        """The prompts attached to ``modality`` ("image" or "text") by :meth:`set_prompts`; [] if none."""
        holder = getattr(self.model, PROMPTS_MODULE, None)
        if holder is None or modality not in holder:
            return []
        return list(holder[modality])

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
        """A shared backbone is one resource: ``sklearn.base.clone`` of a head keeps the same one (its parameters
        are frozen; one made trainable in place is an error). A :meth:`derive`d copy is trainable, so a deep copy
        is a real one (same class, tag and weights, so the same ``model_id``), never an alias."""
        if self._derived is None:
            if any(p.requires_grad for p in self.model.parameters()):
                raise UnsupportedOperationError(
                    f"{self.info.name}: cannot share a backbone whose parameters require grad; train a copy, "
                    "backbone.derive(tag)")
            return self
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone.model = copy.deepcopy(self.model, memo)
        clone.preprocess_config = copy.deepcopy(self.preprocess_config, memo)
        clone.info = copy.deepcopy(self.info, memo)
        clone._digest_memo = None
        clone.engine = self.engine.fresh()
        return clone

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r}, embed_dim={self.embed_dim})"

