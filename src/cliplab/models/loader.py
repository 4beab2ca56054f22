"""``load_model``: one entry point from a name or path to a Backbone."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import open_clip
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.model import CLIP, CustomTextCLIP, build_model_from_openai_state_dict
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from ..errors import DeviceError, ModelLoadError, WeightsUnavailableError
from .backbone import LONG_TEXT_POLICIES, Backbone, BackboneInfo, check_long_text
from .checkpoints import (
    file_sha256,
    has_openai_layout,
    is_torchscript_archive,
    read_state_dict,
    scrub_unsafe_advice,
)
from .hf import is_hf_clip_dir, load_hf_dir
from .longtext import merge_longclip_state
from .moe import MOE_KEY, build_moe_model
from .openclip import (
    OpenClipBackbone,
    openai_checkpoint_sha256s,
    pretrained_tag_uses_quick_gelu,
    tokenizer_for,
    transform_for,
)
from .runtime import DEFAULT_PRECISION, DEFAULT_RUNTIME, check_options
from .tiny import load_tiny

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
DEFAULT_MODEL_SPEC = f"{DEFAULT_MODEL}:{DEFAULT_PRETRAINED}"
RANDOM = ("random", "none")
HUB_HOST = ("huggingface.co", 443)

OFFLINE_HINT = (
    "pass --model PATH to local weights (an open_clip .pt/.bin/.safetensors with --arch, a Hugging Face "
    "CLIPModel folder or an OpenAI .pt); for a model that carries signal without downloading, train one here "
    "with cliplab pretrain --recipe cifar10-signal (16 min on 2 idle CPU cores) and pass --model "
    "recipe:cifar10-signal; or --model tiny to try cliplab with random weights"
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """``device`` (default: :func:`default_device`) if this machine has it, else a DeviceError saying why."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"--device {device!r}: not a device name (use cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise DeviceError(f"--device {device}: only {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"--device {device}: Apple MPS is not available here; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {device}: cliplab runs on cpu, cuda or mps")
    return str(parsed)


def resolve_model_spec(name: str = DEFAULT_MODEL, pretrained: str | None = None) -> tuple[str, str | None]:
    """``(arch, tag)`` that :func:`load_model` loads for ``name`` (``ARCH`` or ``ARCH:TAG``); downloads nothing.

    An explicit tag wins (``pretrained`` or the ``:TAG`` suffix); else, for an open_clip architecture,
    :data:`DEFAULT_PRETRAINED` if open_clip lists it for the architecture, else ``openai`` if listed,
    else the first listed tag (None when open_clip lists none). ``tiny``, ``hf-hub:`` names and
    existing paths come back unchanged.
    """
    if name == "tiny" or name.startswith("hf-hub:") or Path(name).expanduser().exists():
        return name, pretrained
    if ":" in name and pretrained is None:
        name, pretrained = name.split(":", 1)
    if pretrained is None and open_clip.get_model_config(name) is not None:
        tags = open_clip.list_pretrained_tags_by_model(name)
        pretrained = next((tag for tag in (DEFAULT_PRETRAINED, "openai") if tag in tags), tags[0] if tags else None)
    return name, pretrained


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
    precision: str | None = None,
    runtime: str | None = None,
    onnx_dir: str | Path | None = None,
    long_text: str | None = None,
    long_text_positions: bool = False,
) -> Backbone:
    """Load a CLIP model as a :class:`Backbone`.

    ``name`` is one of: ``tiny``; an open_clip architecture (``ViT-B-32``) with ``pretrained`` a tag
    (default: see :func:`resolve_model_spec`; ``load_model()`` is ``ViT-B-32:laion2b_s34b_b79k``), a
    weights file or ``random``; ``ARCH:TAG``; ``hf-hub:ORG/REPO``; or a local path: a weights file
    (open_clip checkpoint with ``arch`` or ``config``, OpenAI TorchScript or state-dict ``.pt``), a
    Hugging Face CLIPModel folder, or an open_clip folder with ``open_clip_config.json``.

    QuickGELU is chosen for you: ``quick_gelu`` if given, else on for OpenAI weights (tags whose
    open_clip entry says so, TorchScript archives, files whose sha256 is an OpenAI release), else
    whatever the architecture or config says. When huggingface.co is unreachable, pretrained tags
    and ``hf-hub:`` names are read from the local Hugging Face cache (process settings untouched).

    ``precision`` (fp32, bf16, fp16 on CUDA) and ``runtime`` (torch, onnx, int8) set how
    ``encode_images``/``encode_texts`` run (default: ``models/runtime.py`` ``DEFAULT_PRECISION``,
    ``DEFAULT_RUNTIME``); ONNX exports are kept in ``onnx_dir`` (default ``<cache root>/onnx``).

    ``long_text`` (truncate, chunk, error; default truncate) sets what ``encode_texts`` does with texts
    longer than the context. ``long_text_positions=True`` stretches the text positional embedding as
    Long-CLIP does (``models/longtext.py``: 77 -> 248 tokens, new ``model_id``); a Long-CLIP checkpoint
    needs no option: its 248 positions load as they are.
    """
    device = check_device(device)
    precision, runtime = check_options(precision, runtime, device)
    if long_text is not None and long_text not in LONG_TEXT_POLICIES:
        raise ModelLoadError(f"long text {long_text!r}: use one of {', '.join(LONG_TEXT_POLICIES)}")
    try:
        backbone = _load_any(name, pretrained, device, arch, config, quick_gelu, seed, cache_dir)
    except ModelLoadError as exc:  # one line, never torch's advice to unpickle with weights_only=False
        message = scrub_unsafe_advice(str(exc))
        if message == str(exc):
            raise
        raise type(exc)(message) from exc.__cause__
    if long_text_positions:
        from .longtext import stretch_positional_embedding

        backbone = stretch_positional_embedding(backbone, inplace=True)
    if long_text is not None:
        backbone.long_text = check_long_text(long_text)
    if (precision, runtime, onnx_dir) != (DEFAULT_PRECISION, DEFAULT_RUNTIME, None):  # else its engine has them
        backbone.set_inference(precision, runtime, onnx_dir=onnx_dir)
    return backbone


def _load_any(name, pretrained, device, arch, config, quick_gelu, seed, cache_dir) -> Backbone:
    path = Path(name).expanduser()
    if name == "tiny":
        return load_tiny(seed=seed, device=device)
    if path.exists():
        return _load_path(path, arch, config, quick_gelu, device, given=name)
    if name.startswith("hf-hub:"):
        return _load_hub(name, quick_gelu, device, cache_dir)
    name, pretrained = resolve_model_spec(name, pretrained)
    if open_clip.get_model_config(name) is not None:
        return _load_arch(name, pretrained, quick_gelu, device, seed, cache_dir)
    raise ModelLoadError(
        f"unknown model {name!r}: not a file or folder, an open_clip architecture (see: cliplab models), "
        "'hf-hub:ORG/REPO' or 'tiny'"
    )


def _load_arch(arch, pretrained, quick_gelu, device, seed, cache_dir) -> Backbone:
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained is None:
        raise ModelLoadError(f"{arch}: open_clip knows no pretrained weights; pass pretrained='random' or a path")
    if pretrained.lower() in RANDOM:
        return _random_arch(arch, quick_gelu, device, seed)
    if pretrained not in tags:
        if Path(pretrained).expanduser().is_file():
            return _load_path(Path(pretrained).expanduser(), arch, None, quick_gelu, device, given=pretrained)
        raise ModelLoadError(f"{arch}: unknown pretrained tag {pretrained!r}; known: {', '.join(tags) or 'none'}")
    use_quick = pretrained_tag_uses_quick_gelu(arch, pretrained) if quick_gelu is None else quick_gelu
    if _hub_unreachable():
        model = _tag_from_cache(arch, pretrained, use_quick, cache_dir)
        tokenizer = _offline(f"the tokenizer of {arch}", _tokenizer_offline, arch, open_clip.get_model_config(arch),
                             cache_dir)
    else:
        try:
            model = open_clip.create_model(
                arch, pretrained=pretrained, force_quick_gelu=use_quick, cache_dir=cache_dir
            )
        except Exception as exc:
            raise ModelLoadError(f"cannot load {arch} ({pretrained}): {exc}") from exc
        tokenizer = open_clip.get_tokenizer(arch)
    info = BackboneInfo(name=arch, pretrained=pretrained, source="open_clip", quick_gelu=use_quick,
                        benchmark=(arch, pretrained))
    model_id = f"open_clip:{arch}:{pretrained}:qgelu{int(use_quick)}"
    return OpenClipBackbone(model, transform_for(model), tokenizer, info, model_id, device)


def _random_arch(arch, quick_gelu, device, seed) -> Backbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=bool(quick_gelu))
    info = BackboneInfo(name=arch, pretrained="random", source="open_clip", quick_gelu=bool(quick_gelu),
                        random_weights=True, benchmark=(arch, "random"))
    model_id = f"open_clip:{arch}:random-seed{seed}:qgelu{int(bool(quick_gelu))}"
    return OpenClipBackbone(model, transform_for(model), open_clip.get_tokenizer(arch), info, model_id, device)


def _load_hub(name, quick_gelu, device, cache_dir) -> Backbone:
    repo = name.removeprefix("hf-hub:")
    if _hub_unreachable():
        model, tokenizer, weights = _hub_from_cache(name, repo, quick_gelu, cache_dir)
    else:
        from open_clip.pretrained import download_pretrained_from_hf

        try:
            model = open_clip.create_model(name, force_quick_gelu=bool(quick_gelu), cache_dir=cache_dir)
            tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
            weights = Path(download_pretrained_from_hf(repo, cache_dir=cache_dir))
        except Exception as exc:
            raise ModelLoadError(f"cannot load {name}: {exc}") from exc
    info = BackboneInfo(name=name, pretrained=None, source="open_clip", quick_gelu=quick_gelu, benchmark=(name, ""))
    model_id = f"{name}:{file_sha256(weights)[:16]}:qgelu{int(bool(quick_gelu))}"
    return OpenClipBackbone(model, transform_for(model), tokenizer, info, model_id, device)


def _load_path(path: Path, arch, config, quick_gelu, device, given: str | None = None) -> Backbone:
    given = given or str(path)
    if path.is_dir():
        if is_hf_clip_dir(path):
            return load_hf_dir(path, device, given=given)
        if (path / "open_clip_config.json").is_file():
            return _load_open_clip_dir(path, quick_gelu, device, given)
        raise ModelLoadError(
            f"{path}: folder is neither a Hugging Face CLIPModel (config.json with model_type 'clip') "
            "nor an open_clip model folder (open_clip_config.json)"
        )
    return _load_file(path, arch, config, quick_gelu, device, given)


def _load_open_clip_dir(path: Path, quick_gelu, device, given: str) -> Backbone:
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
    if not weights:
        raise ModelLoadError(f"{path}: open_clip folder has no weights (.safetensors, .bin or .pth)")
    config = path / "open_clip_config.json"
    try:
        config_json = json.loads(config.read_text())
        model_cfg = config_json.get("model_cfg", {})
        if quick_gelu is None:
            quick_gelu = bool(model_cfg.get("quick_gelu", False))
        moe = config_json.get(MOE_KEY)  # an upcycled CLIP-MoE model (models/moe.py): MoE layers, then the weights
        if moe:
            model = build_moe_model(path, moe, quick_gelu)
            _load_weights(model, read_state_dict(weights[0]), path)
        else:
            model = open_clip.create_model(f"local-dir:{path}", quick_gelu=quick_gelu)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    except ModelLoadError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError, ValueError, KeyError ...
        if "state_dict" in str(exc):
            raise ModelLoadError(f"{path}: weights do not fit open_clip_config.json: {_detail(exc)}") from exc
        raise ModelLoadError(f"{path}: cannot load open_clip folder: {_detail(exc)}") from exc
    digest = hashlib.sha256("".join([config.read_text(), *(file_sha256(p) for p in weights)]).encode()).hexdigest()
    model_name = config_json.get("model_name") or config_json.get("name") or path.name
    info = BackboneInfo(name=str(path), pretrained=None, source="local", quick_gelu=quick_gelu,
                        benchmark=(str(model_name), given))
    model_id = f"dir:{digest[:16]}:qgelu{int(quick_gelu)}"
    return OpenClipBackbone(model, transform_for(model), tokenizer, info, model_id, device)


def _load_file(path: Path, arch, config, quick_gelu, device, given: str) -> Backbone:
    sha = file_sha256(path)
    warning = None
    jit = is_torchscript_archive(path)
    openai_release = openai_checkpoint_sha256s().get(sha)
    if quick_gelu is None and (jit or openai_release):
        quick_gelu = True
    state = merge_longclip_state(read_state_dict(path))  # a Long-CLIP checkpoint: 248 positions, loaded as is
    sibling = path.parent / "open_clip_config.json"
    if config is None and arch is None and sibling.is_file():
        config = sibling  # hub downloads keep their config beside the weights
    if config is not None:
        model, arch_label, quick_gelu = _from_config(Path(config), state, quick_gelu)
    elif arch is not None:
        if open_clip.get_model_config(arch) is None:
            raise ModelLoadError(f"--arch {arch!r} is not an open_clip architecture (see: cliplab models)")
        if quick_gelu is None:
            quick_gelu = bool(open_clip.get_model_config(arch).get("quick_gelu", False))
        positions = state.get("positional_embedding")
        context = None if positions is None else int(positions.shape[0])  # 248 for Long-CLIP weights
        model = open_clip.create_model(arch, pretrained=None, quick_gelu=quick_gelu, force_context_length=context)
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
                        extra={"arch": arch_label, "sha256": sha}, benchmark=(arch_label, given))
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
    if "weights_only" in str(exc):  # torch refused a pickle: its reason, not its advice to retry unsafely
        return scrub_unsafe_advice(str(exc))
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    informative = [line for line in lines if not line.startswith("Error(s) in loading")]
    return (informative or lines or [type(exc).__name__])[0][:300]


def _hub_unreachable() -> bool:
    """True when huggingface_hub is set offline or huggingface.co does not answer within 3 s.

    Without this probe, each download attempt offline retries for close to a minute before failing.
    With a proxy or mirror configured a direct probe says nothing: the hub client decides.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if _uses_proxy_or_mirror():
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
    except OSError:
        return True
    return False


def _uses_proxy_or_mirror() -> bool:
    names = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT")
    return any(os.environ.get(name) for name in names)


def _unavailable(what: str, files: str = "weights") -> WeightsUnavailableError:
    return WeightsUnavailableError(f"no {files} on disk for {what} and no network to download them: {OFFLINE_HINT}")


def _offline(what: str, load: Callable[..., T], *args) -> T:
    """``load(*args)``, any failure reported as WeightsUnavailableError for ``what``."""
    try:
        return load(*args)
    except ModelLoadError:
        raise
    except Exception as exc:  # open_clip and transformers raise many types for missing files
        log.debug("offline load of %s failed: %s", what, exc)
        raise _unavailable(what, "files") from exc


def _cached_hub_file(repo: str, filenames: list[str], cache_dir: str | None) -> Path | None:
    """The first of ``filenames`` in the local Hugging Face cache of ``repo`` (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        except ValueError:  # not a valid repo id
            return None
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_weight_names(filename: str = "") -> list[str]:
    """The files open_clip's ``download_pretrained_from_hf`` tries for ``filename``, in its order."""
    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def cached_tag_weights(tag_cfg: dict, cache_dir: str | None = None) -> Path | None:
    """The weights file of an open_clip pretrained-tag entry if it is on disk: its ``hf_hub`` file in the
    Hugging Face cache, or its ``url`` download in ``cache_dir`` (default ``~/.cache/clip``); else None."""
    if tag_cfg.get("file"):
        local = Path(tag_cfg["file"])
        return local if local.is_file() else None
    if tag_cfg.get("hf_hub"):
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        found = _cached_hub_file(repo, _hub_weight_names(filename), cache_dir)
        if found is not None:
            return found
    if tag_cfg.get("url"):
        target = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])
        if target.is_file():
            return target
    return None


def _tag_from_cache(arch: str, tag: str, quick_gelu: bool, cache_dir: str | None) -> torch.nn.Module:
    """open_clip's model for ``arch:tag`` from weights already on disk, with the tag's preprocessing."""
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    weights = cached_tag_weights(tag_cfg, cache_dir)
    if weights is None:
        raise _unavailable(f"{arch} ({tag})")
    try:
        model = open_clip.create_model(arch, pretrained=str(weights), force_quick_gelu=quick_gelu)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {arch} ({tag}) from {weights}: {exc}") from exc
    # create_model merges a tag's preprocessing only when given the tag: merge it as it does
    current = open_clip.get_model_preprocess_cfg(model)
    merged = merge_preprocess_dict(current, tag_cfg)
    open_clip.set_model_preprocess_cfg(model, {**merged, "size": current.get("size", merged["size"])})
    return model


def _hub_from_cache(name: str, repo: str, quick_gelu: bool | None, cache_dir: str | None):
    """(model, tokenizer, weights path) of an ``hf-hub:`` repo from the local Hugging Face cache."""
    config = _cached_hub_file(repo, [HF_CONFIG_NAME], cache_dir)
    weights = _cached_hub_file(repo, _hub_weight_names(), cache_dir)
    if config is None or weights is None:
        raise _unavailable(name)
    snapshot = config.parent
    try:
        model = open_clip.create_model(f"local-dir:{snapshot}", load_weights=False, pretrained_text=False,
                                       force_quick_gelu=bool(quick_gelu))
        open_clip.load_checkpoint(model, str(weights))
    except Exception as exc:
        raise ModelLoadError(f"cannot load {name} from the Hugging Face cache ({snapshot}): {exc}") from exc
    model_cfg = json.loads(config.read_text()).get("model_cfg", {})
    tokenizer = _offline(f"the tokenizer of {name}", _tokenizer_offline, f"local-dir:{snapshot}", model_cfg,
                         cache_dir)
    return model.eval(), tokenizer, weights


def _tokenizer_offline(name: str, model_cfg: dict | None, cache_dir: str | None):
    """open_clip's tokenizer for ``name``; a Hugging Face tokenizer is read from the local cache only."""
    text_cfg = (model_cfg or {}).get("text_cfg", {})
    hf_name = text_cfg.get("hf_tokenizer_name")
    if not hf_name:
        return open_clip.get_tokenizer(name)
    return HFTokenizer(
        hf_name,
        context_length=text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH),
        cache_dir=cache_dir,
        tokenizer_mode=text_cfg.get("tokenizer_mode"),
        local_files_only=True,
        **text_cfg.get("tokenizer_kwargs", {}),
    )
