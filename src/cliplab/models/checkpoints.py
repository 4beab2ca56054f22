"""Reading CLIP weight files safely: safetensors, ``torch.load(weights_only=True)``, TorchScript.

Nothing here unpickles arbitrary Python objects or runs code from a file. OpenAI's original ``.pt``
files are TorchScript archives: their tensors are read by ``models/torchscript.py`` without
``torch.jit.load`` (which would run a scripted ``__setstate__``); only archives whose tensors form
OpenAI's CLIP layout are accepted.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .torchscript import read_torchscript_state

OPENAI_LAYOUT_KEYS = ("token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, memoised per (path, size, mtime) within the process."""
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files holding a ``constants.pkl`` and compiled ``code/``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("/constants.pkl") for name in names) and any("/code/" in name for name in names)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from ``{"state_dict": ...}`` and ``module.``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif is_torchscript_archive(path):
            state = read_torchscript_state(path)
            if not has_openai_layout(state):
                raise ModelLoadError(f"{path}: a TorchScript archive that is not an OpenAI CLIP checkpoint; cliplab "
                                     "runs no TorchScript: save the model's state_dict as .safetensors instead")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # corrupt or unsafe files surface as many exception types
        raise ModelLoadError(f"{path}: not a readable weights file ({load_error_line(exc)}); cliplab reads "
                             "safetensors, TorchScript and tensor-only torch checkpoints, and never unpickles objects"
                             ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ModelLoadError(f"{path}: holds no state dict of tensors")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        state.pop(key, None)
    return state


def load_error_line(exc: BaseException) -> str:
    """``Type: line`` of a torch load error without torch's advice to retry with ``weights_only=False``
    (which would run arbitrary code): its messages span many lines, the informative one in the middle."""
    line = _informative(str(exc))
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


_TORCH_REFUSAL = "Weights only load failed"


def scrub_unsafe_advice(message: str) -> str:
    """One line: a message that embeds torch's refusal keeps its own text and the refusal's informative
    line, without the advice to load with ``weights_only=False``; other messages keep their first line."""
    if _TORCH_REFUSAL not in message and "weights_only" not in message:
        return message.splitlines()[0] if message.strip() else message
    start = message.find(_TORCH_REFUSAL)
    head, torch_text = (message[:start], message[start:]) if start >= 0 else ("", message)
    line = _informative(torch_text) or "not a tensor-only file"
    return f"{head}{line} (cliplab loads tensors only and never unpickles objects)"


def _informative(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return f"it pickles {refused.group(1)}, which is not a tensor"
    for line in text.splitlines():
        line = line.strip().split("(Could this error message be improved")[0].strip()
        line = line.removeprefix("WeightsUnpickler error:").strip()
        skip = ("please", "(1)", "(2)", "check", "weights only load failed")
        if line and "weights_only" not in line and not line.lower().startswith(skip):
            return line[:200]
    return ""


def has_openai_layout(state: dict[str, torch.Tensor]) -> bool:
    """The key layout of OpenAI's CLIP (also open_clip's built-in CLIP class)."""
    vision = "visual.conv1.weight" in state or "visual.layer1.0.conv1.weight" in state
    return vision and all(key in state for key in OPENAI_LAYOUT_KEYS)
