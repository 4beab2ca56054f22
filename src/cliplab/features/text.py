"""The text side, below every head: prompt embeddings (cached per model and tokenizer) and their ensembles."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..data.prompts import class_prompts
from ..fileio import digest
from ..models.backbone import Backbone
from ..models.runtime import BASELINE, encoding_key
from .cache import DamagedShardsError, FeatureCache, cache_root


def text_cache(backbone: Backbone, cache_dir: str | Path | None = None, long_text: str | None = None) -> FeatureCache:
    """The cache space of ``backbone``'s text embeddings; the tokenizer, precision, runtime and a long-text policy
    other than truncate are part of its key (fp32 torch truncating keeps the key it had before those options)."""
    encoding = encoding_key(backbone, "text")
    policy = long_text or backbone.long_text
    extra = () if policy == "truncate" else (f"long_text={policy}",)
    meta = {"model_id": backbone.model_id, "tokenizer": backbone.tokenizer_id, "dim": backbone.embed_dim,
            "modality": "text", "encoding": encoding[0] if encoding else BASELINE, "long_text": policy}
    space = "txt-" + digest(backbone.model_id, backbone.tokenizer_id, *encoding, *extra)
    return FeatureCache(cache_root(cache_dir), space, meta)


def embed_texts(backbone: Backbone, texts: Sequence[str], cache_dir: str | Path | None = None,
                long_text: str | None = None) -> np.ndarray:
    """Embed strings (L2-normalised float32 (m, d)), caching each string's embedding on disk.

    ``long_text`` (default ``backbone.long_text``): what to do with texts over the context, see
    ``Backbone.encode_texts``."""
    texts = list(texts)
    cache = text_cache(backbone, cache_dir, long_text)
    identity = {t: hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest() for t in texts}
    identities = [identity[t] for t in texts]
    out = np.empty((len(texts), backbone.embed_dim), dtype=np.float32)
    for attempt in range(3):
        found, _ = cache.lookup(identities)
        todo = [t for t in identity if identity[t] not in found]
        if todo:
            cache.add([identity[t] for t in todo], backbone.encode_texts(todo, long_text).numpy())
            found, _ = cache.lookup(identities)
        try:
            return cache.gather([found[i] for i in identities], out)
        except DamagedShardsError:  # dropped from the index: recomputed on the next pass
            if attempt == 2:
                raise
    return out  # pragma: no cover


def embed_prompts(backbone: Backbone, prompts: Sequence[Sequence[str]],
                  cache_dir: str | Path | None = None) -> list[np.ndarray]:
    """Per-class prompt embeddings: ``prompts[c]`` (n_c strings) -> array (n_c, d), one cached batch for all."""
    flat = [p for group in prompts for p in group]
    embedded = embed_texts(backbone, flat, cache_dir)
    bounds = np.cumsum([0] + [len(group) for group in prompts])
    return [embedded[bounds[c]:bounds[c + 1]] for c in range(len(prompts))]


def ensemble(per_class: Sequence[np.ndarray], renormalize: bool = True) -> np.ndarray:
    """Class weights (d, C): the mean of each class's (L2-normalised) prompt embeddings.

    ``renormalize=True`` is CLIP's prompt ensembling (the mean scaled back to unit length);
    ``False`` keeps the plain mean, so ``x @ w_c`` is the mean of the per-prompt similarities, as
    DCLIP averages descriptor scores.
    """
    means = np.stack([np.asarray(group, dtype=np.float64).mean(axis=0) for group in per_class])
    if renormalize:
        means /= np.linalg.norm(means, axis=1, keepdims=True)
    return np.ascontiguousarray(means.T, dtype=np.float32)


def class_weights(backbone: Backbone, class_names: Sequence[str],
                  prompts: str | Path | Sequence[str] | Mapping[str, Sequence[str]],
                  renormalize: bool = True, cache_dir: str | Path | None = None) -> np.ndarray:
    """Zero-shot classifier matrix (d, C) from templates x classes or a class -> prompts mapping."""
    return ensemble(embed_prompts(backbone, class_prompts(class_names, prompts), cache_dir), renormalize)
