"""``load_model``: one entry point from a name or path to a Backbone."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from dataclasses import asdict
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP, build_model_from_openai_state_dict
from open_clip.transform import PreprocessCfg

from ..errors import ModelLoadError, WeightsUnavailableError
from .backbone import Backbone, BackboneInfo
from .checkpoints import file_sha256, has_openai_layout, is_torchscript_archive, read_state_dict
from .hf import is_hf_clip_dir, load_hf_dir
from .openclip import (
    OpenClipBackbone,
    openai_checkpoint_sha256s,
    pretrained_tag_uses_quick_gelu,
    tokenizer_for,
    transform_for,
)
from .tiny import load_tiny

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
RANDOM = ("random", "none")
HUB_HOST = ("huggingface.co", 443)

OFFLINE_HINT = (
    "pass --model PATH to local weights (an open_clip .pt/.bin/.safetensors with --arch, a Hugging Face "
    "CLIPModel folder or an OpenAI .pt), or --model tiny to try cliplab with random weights"
)

log = logging.getLogger(__name__)


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    device: str | None = None,
    *,
    arch: str | None = None,
    config: str | Path | None = None,
    quick_gelu: bool | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> Backbone:
    """Load a CLIP model as a :class:`Backbone`.

    ``name`` is one of: ``tiny``; an open_clip architecture (``ViT-B-32``) with ``pretrained`` a tag
    (``openai``, ``laion2b_s34b_b79k``; default: ``openai`` where it exists, else the first tag) or
    ``random``; ``ARCH:TAG``; ``hf-hub:ORG/REPO``; or a local path: a weights file (open_clip
    checkpoint with ``arch`` or ``config``, OpenAI TorchScript or state-dict ``.pt``), a Hugging Face
    CLIPModel folder, or an open_clip folder with ``open_clip_config.json``.

    QuickGELU is chosen for you: ``quick_gelu`` if given, else on for OpenAI weights (tags whose
    open_clip entry says so, TorchScript archives, files whose sha256 is an OpenAI release), else
    whatever the architecture or config says.
    """
    device = device or default_device()
    path = Path(name).expanduser()
    if name == "tiny":
        return load_tiny(seed=seed, device=device)
    if path.exists():
        return _load_path(path, arch, config, quick_gelu, device)
    if name.startswith("hf-hub:"):
        return _load_hub(name, quick_gelu, device, cache_dir)
    if ":" in name and pretrained is None:
        name, pretrained = name.split(":", 1)
    if open_clip.get_model_config(name) is not None:
        return _load_arch(name, pretrained, quick_gelu, device, seed, cache_dir)
    raise ModelLoadError(
        f"unknown model {name!r}: not a file or folder, an open_clip architecture (see `cliplab models`), "
        "'hf-hub:ORG/REPO' or 'tiny'"
    )


def _load_arch(arch, pretrained, quick_gelu, device, seed, cache_dir) -> Backbone:
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained is None:
        if not tags:
            raise ModelLoadError(f"{arch}: open_clip knows no pretrained weights; pass pretrained='random' or a path")
        pretrained = "openai" if "openai" in tags else tags[0]
    if pretrained.lower() in RANDOM:
        return _random_arch(arch, quick_gelu, device, seed)
    if pretrained not in tags:
        if Path(pretrained).is_file():
            return _load_path(Path(pretrained), arch, None, quick_gelu, device)
        raise ModelLoadError(f"{arch}: unknown pretrained tag {pretrained!r}; known: {', '.join(tags) or 'none'}")
    use_quick = pretrained_tag_uses_quick_gelu(arch, pretrained) if quick_gelu is None else quick_gelu
    with _offline_if_unreachable() as offline:
        try:
            model = open_clip.create_model(
                arch, pretrained=pretrained, force_quick_gelu=use_quick, cache_dir=cache_dir
            )
        except Exception as exc:
            raise _weights_error(f"{arch} ({pretrained})", offline, exc) from exc
    info = BackboneInfo(name=arch, pretrained=pretrained, source="open_clip", quick_gelu=use_quick)
    model_id = f"open_clip:{arch}:{pretrained}:qgelu{int(use_quick)}"
    return OpenClipBackbone(model, transform_for(model), open_clip.get_tokenizer(arch), info, model_id, device)


def _random_arch(arch, quick_gelu, device, seed) -> Backbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=bool(quick_gelu))
    info = BackboneInfo(name=arch, pretrained="random", source="open_clip", quick_gelu=bool(quick_gelu),
                        random_weights=True)
    model_id = f"open_clip:{arch}:random-seed{seed}:qgelu{int(bool(quick_gelu))}"
    return OpenClipBackbone(model, transform_for(model), open_clip.get_tokenizer(arch), info, model_id, device)


def _load_hub(name, quick_gelu, device, cache_dir) -> Backbone:
    from open_clip.pretrained import download_pretrained_from_hf

    with _offline_if_unreachable() as offline:
        try:
            model = open_clip.create_model(name, force_quick_gelu=bool(quick_gelu), cache_dir=cache_dir)
            tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
            weights = Path(download_pretrained_from_hf(name.removeprefix("hf-hub:"), cache_dir=cache_dir))
        except Exception as exc:
            raise _weights_error(name, offline, exc) from exc
    info = BackboneInfo(name=name, pretrained=None, source="open_clip", quick_gelu=quick_gelu)
    model_id = f"{name}:{file_sha256(weights)[:16]}:qgelu{int(bool(quick_gelu))}"
    return OpenClipBackbone(model, transform_for(model), tokenizer, info, model_id, device)


def _load_path(path: Path, arch, config, quick_gelu, device) -> Backbone:
    if path.is_dir():
        if is_hf_clip_dir(path):
            return load_hf_dir(path, device)
        if (path / "open_clip_config.json").is_file():
            return _load_open_clip_dir(path, quick_gelu, device)
        raise ModelLoadError(
            f"{path}: folder is neither a Hugging Face CLIPModel (config.json with model_type 'clip') "
            "nor an open_clip model folder (open_clip_config.json)"
        )
    return _load_file(path, arch, config, quick_gelu, device)


def _load_open_clip_dir(path: Path, quick_gelu, device) -> Backbone:
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
    if not weights:
        raise ModelLoadError(f"{path}: open_clip folder has no weights (.safetensors, .bin or .pth)")
    config = path / "open_clip_config.json"
    try:
        model_cfg = json.loads(config.read_text()).get("model_cfg", {})
        if quick_gelu is None:
            quick_gelu = bool(model_cfg.get("quick_gelu", False))
        model = open_clip.create_model(f"local-dir:{path}", quick_gelu=quick_gelu)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    except Exception as exc:  # open_clip raises RuntimeError, ValueError, KeyError ...
        if "state_dict" in str(exc):
            raise ModelLoadError(f"{path}: weights do not fit open_clip_config.json: {_detail(exc)}") from exc
        raise ModelLoadError(f"{path}: cannot load open_clip folder: {_detail(exc)}") from exc
    digest = hashlib.sha256("".join([config.read_text(), *(file_sha256(p) for p in weights)]).encode()).hexdigest()
    info = BackboneInfo(name=str(path), pretrained=None, source="local", quick_gelu=quick_gelu)
    model_id = f"dir:{digest[:16]}:qgelu{int(quick_gelu)}"
    return OpenClipBackbone(model, transform_for(model), tokenizer, info, model_id, device)


def _load_file(path: Path, arch, config, quick_gelu, device) -> Backbone:
    sha = file_sha256(path)
    warning = None
    jit = is_torchscript_archive(path)
    openai_release = openai_checkpoint_sha256s().get(sha)
    if quick_gelu is None and (jit or openai_release):
        quick_gelu = True
    state = read_state_dict(path)
    sibling = path.parent / "open_clip_config.json"
    if config is None and arch is None and sibling.is_file():
        config = sibling  # hub downloads keep their config beside the weights
    if config is not None:
        model, arch_label, quick_gelu = _from_config(Path(config), state, quick_gelu)
    elif arch is not None:
        if open_clip.get_model_config(arch) is None:
            raise ModelLoadError(f"--arch {arch!r} is not an open_clip architecture (see `cliplab models`)")
        if quick_gelu is None:
            quick_gelu = bool(open_clip.get_model_config(arch).get("quick_gelu", False))
        model = open_clip.create_model(arch, pretrained=None, quick_gelu=quick_gelu)
        _load_weights(model, state, path)
        arch_label = arch
    elif has_openai_layout(state):
        if quick_gelu is None:
            warning = (f"{path.name}: activation guessed as GELU; if these are OpenAI-trained weights pass "
                       "--quick-gelu (or --arch ARCH-quickgelu)")
            log.warning(warning)
        quick_gelu = bool(quick_gelu)
        model = _from_openai_layout(state, quick_gelu, path)
        arch_label = openai_release or "openai-layout"
    else:
        raise ModelLoadError(f"{path}: cannot tell the architecture; pass --arch NAME or --config JSON")
    source = "openai-jit" if jit else "local"
    info = BackboneInfo(name=str(path), pretrained=None, source=source, quick_gelu=quick_gelu,
                        extra={"arch": arch_label, "sha256": sha})
    if warning:
        info.extra["warning"] = warning
    tokenizer = tokenizer_for(arch, model)
    model_id = f"file:{arch_label}:{sha[:16]}:qgelu{int(quick_gelu)}"
    return OpenClipBackbone(model, transform_for(model), tokenizer, info, model_id, device)


def _from_openai_layout(state, quick_gelu: bool, path: Path):
    """Infer the architecture from tensor shapes as OpenAI's ``clip.load`` does (64-wide attention heads).

    open_clip's builder casts to fp16 before loading; the weights are loaded again afterwards so
    fp32 checkpoints keep full precision.
    """
    try:
        model = build_model_from_openai_state_dict(dict(state), quick_gelu=quick_gelu, cast_dtype=None).float()
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"{path}: OpenAI-layout weights do not form a CLIP: {str(exc).splitlines()[0]}") from exc
    _load_weights(model, state, path)
    return model


def _from_config(config: Path, state, quick_gelu):
    """Build from an open_clip model-config JSON (or an ``open_clip_config.json`` with ``model_cfg``)."""
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config}: unreadable model config JSON ({exc})") from exc
    preprocess_cfg = cfg.get("preprocess_cfg", {})
    cfg = dict(cfg.get("model_cfg", cfg))
    if not all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ModelLoadError(f"{config}: model config needs embed_dim, vision_cfg and text_cfg")
    if quick_gelu is not None:
        cfg["quick_gelu"] = quick_gelu
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    model = (CustomTextCLIP if custom else CLIP)(**cfg)
    _load_weights(model, state, config)
    size = cfg["vision_cfg"].get("image_size", 224)
    defaults = {**asdict(PreprocessCfg()), **open_clip.get_model_preprocess_cfg(model)}
    open_clip.set_model_preprocess_cfg(model, {**defaults, "size": size, **preprocess_cfg})
    label = f"{config.stem}-{hashlib.sha256(config.read_bytes()).hexdigest()[:8]}"
    return model, label, bool(cfg.get("quick_gelu", False))


def _load_weights(model, state, where) -> None:
    state = open_clip.factory.convert_state_dict(model, dict(state))
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{where}: weights do not fit the architecture: {_detail(exc)}") from exc
    model.float().eval()


def _detail(exc: Exception) -> str:
    """The informative line of a (often multi-line) torch error, shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    informative = [line for line in lines if not line.startswith("Error(s) in loading")]
    return (informative or lines or [type(exc).__name__])[0][:300]


@contextlib.contextmanager
def _offline_if_unreachable():
    """Yield True (and make huggingface_hub cache-only) when the hub cannot be reached in 3 s.

    Without this, each download attempt offline retries for close to a minute before failing.
    """
    from huggingface_hub import constants

    if _uses_proxy_or_mirror():  # a direct probe says nothing about a proxy or mirror: let the hub decide
        offline = constants.HF_HUB_OFFLINE
    else:
        try:
            socket.create_connection(HUB_HOST, timeout=3).close()
            offline = constants.HF_HUB_OFFLINE
        except OSError:
            offline = True
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline
    try:
        yield offline
    finally:
        constants.HF_HUB_OFFLINE = saved


def _uses_proxy_or_mirror() -> bool:
    names = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT")
    return any(os.environ.get(name) for name in names)


def _weights_error(what: str, offline: bool, exc: Exception) -> ModelLoadError:
    if offline:
        return WeightsUnavailableError(f"no weights on disk for {what} and no network to download them: {OFFLINE_HINT}")
    return ModelLoadError(f"cannot load {what}: {exc}")
