"""Stable identities for cache keys: weights hashes, tokenizer ids, preprocessing-config JSON."""

from __future__ import annotations

import hashlib
import json
import re
from itertools import chain
from typing import Any

import torch

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def config_json(config: dict) -> str:
    """Canonical JSON of a config dict: sorted keys, tuples as lists, other objects as ``str``."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)


def strip_addresses(text: str) -> str:
    """``repr`` text without the memory addresses (`` at 0x7f...``) that differ between processes."""
    return _ADDRESS.sub("", text)


def _tensors(model: torch.nn.Module):
    return chain(model.named_parameters(), model.named_buffers())


def weights_key(model: torch.nn.Module) -> tuple | None:
    """A cheap key that changes whenever a parameter or buffer is replaced or modified in place.

    None where a tensor has no version counter (inference-mode tensors): then nothing is memoised.
    """
    try:
        return tuple(
            (name, id(t), t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device))
            for name, t in _tensors(model)
        )
    except RuntimeError:
        return None


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of the names, dtypes, shapes and bytes of all parameters and buffers."""
    hasher = hashlib.sha256()
    for name, tensor in _tensors(model):
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        data = tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu()
        hasher.update(data.numpy().tobytes())
    return hasher.hexdigest()[:16]


def _digest(value: Any) -> str:
    return hashlib.sha256(config_json(value).encode() if not isinstance(value, str) else value.encode()).hexdigest()


def _hf_tokenizer_parts(tokenizer: Any) -> dict:
    """What determines a transformers tokenizer's ids: its full serialised form (fast) or vocabulary (slow)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = _digest(backend.to_str())
    else:
        content = _digest(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]))
    return {
        "hf_class": type(tokenizer).__name__,
        "content": content,
        "special_tokens": {key: str(value) for key, value in getattr(tokenizer, "special_tokens_map", {}).items()},
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
        "do_lower_case": getattr(tokenizer, "do_lower_case", None),
    }


def _fn_name(fn: Any) -> str | None:
    return None if fn is None else getattr(fn, "__qualname__", type(fn).__name__)


def tokenizer_fingerprint(tokenizer: Any, context_length: int) -> str:
    """``CLASS:ctxN:HASH`` for open_clip's SimpleTokenizer/HFTokenizer/SigLipTokenizer and transformers tokenizers.

    The hash covers the vocabulary (and BPE merges or the full fast-tokenizer JSON), the text
    cleaning and special tokens: two tokenizers with one id give the same ids for every text.
    """
    parts: dict[str, Any] = {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
                             "context_length": context_length}
    if hasattr(tokenizer, "encoder") and hasattr(tokenizer, "bpe_ranks"):  # open_clip SimpleTokenizer
        parts["vocab"] = _digest(sorted(tokenizer.encoder.items(), key=lambda item: item[1]))
        parts["merges"] = _digest(sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1]))
        parts["clean"] = _fn_name(getattr(tokenizer, "clean_fn", None))
        parts["reduction"] = _fn_name(getattr(tokenizer, "reduction_fn", None))
    elif hasattr(tokenizer, "get_vocab"):  # a transformers tokenizer
        parts.update(_hf_tokenizer_parts(tokenizer))
    elif hasattr(getattr(tokenizer, "tokenizer", None), "get_vocab"):  # open_clip HFTokenizer / SigLipTokenizer
        parts.update(_hf_tokenizer_parts(tokenizer.tokenizer))
        for attr in ("tokenizer_mode", "strip_sep_token"):
            parts[attr] = getattr(tokenizer, attr, None)
        parts["clean"] = _fn_name(getattr(tokenizer, "clean_fn", None))
    elif tokenizer is not None:
        parts["repr"] = strip_addresses(repr(tokenizer))
    return f"{type(tokenizer).__name__}:ctx{context_length}:{_digest(parts)[:16]}"
