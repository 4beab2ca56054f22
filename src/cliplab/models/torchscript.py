"""The tensors of a TorchScript archive, read without running TorchScript.

``torch.jit.load`` executes code stored in the archive (a scripted ``__setstate__`` runs while the
module is rebuilt), so cliplab never calls it. A TorchScript archive is a zip: ``<name>/data.pkl``
pickles the module tree (script classes named ``__torch__.*``, tensors as persistent storage ids whose
bytes are ``<name>/data/<key>``), and ``<name>/code/`` holds each class's source as text, which
declares its ``__parameters__`` and ``__buffers__``. :func:`read_torchscript_state` unpickles
``data.pkl`` with an unpickler that can build only tensors, storages, ordered dicts and inert
placeholders for script objects, reads the declarations from the code text (never compiled), and
returns what ``torch.jit.load(path).state_dict()`` would: every parameter and buffer by dotted name.
An archive whose classes define ``__setstate__``/``__getstate__`` (code that would run on load) is
refused.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_CLASS = re.compile(r"^class (\w+)\((?:[\w.]+)\):\s*$", re.M)
_LIST = r"\s*=\s*\[([^\]]*)\]"
_STATE_HOOKS = re.compile(r"^\s+def (__setstate__|__getstate__)\(", re.M)


class _ScriptObject:
    """Stands in for a ``__torch__.*`` object: keeps the state pickled for it, runs nothing."""

    __slots__ = ("qualname", "state")

    def __init__(self, qualname: str):
        self.qualname = qualname
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:  # called by pickle's BUILD with the pickled state
        self.state = state


def _placeholder_class(qualname: str) -> type:
    def make(*_args: Any) -> _ScriptObject:
        return _ScriptObject(qualname)

    return type(qualname, (), {"__new__": lambda cls, *args: make(*args)})


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_rest) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: torch.Tensor, *_rest) -> torch.Tensor:
    return data


class _Unpickler(pickle.Unpickler):
    """Builds tensors, storages and ordered dicts; ``__torch__`` classes become inert placeholders."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if module.startswith("__torch__.") or module == "__torch__":
            return _placeholder_class(f"{module}.{name}")
        raise ModelLoadError(f"{self.path}: TorchScript archive refers to {module}.{name}, which cliplab does not "
                             "build (it reads only tensors from TorchScript files)")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype)):
            raise ModelLoadError(f"{self.path}: TorchScript archive has a malformed tensor reference")
        dtype, key, numel = pid[1], str(pid[2]), int(pid[4])
        if key not in self.storages:
            try:
                raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            except KeyError:
                raise ModelLoadError(f"{self.path}: TorchScript archive lacks the tensor data {key}") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) < numel * itemsize:
                raise ModelLoadError(f"{self.path}: TorchScript tensor data {key} is truncated")
            if numel == 0:
                self.storages[key] = torch.empty(0, dtype=dtype)
            else:
                self.storages[key] = torch.frombuffer(raw, dtype=torch.uint8)[: numel * itemsize].view(dtype)
        return self.storages[key]


def _declarations(archive: zipfile.ZipFile, prefix: str, path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """``{"__torch__.pkg.Class": (parameters, buffers)}`` read from the archive's code text; a class whose text
    declares no ``__parameters__``/``__buffers__`` list is left out, and all its tensors are kept."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    code_root = f"{prefix}/code/"
    for name in archive.namelist():
        if not (name.startswith(code_root) and name.endswith(".py")):
            continue
        text = archive.read(name).decode("utf-8", errors="replace")
        hook = _STATE_HOOKS.search(text)
        if hook:
            raise ModelLoadError(f"{path}: TorchScript archive defines {hook.group(1)}, code that would run on load; "
                                 "cliplab refuses it (it reads only OpenAI's CLIP checkpoints and tensor files)")
        module = name[len(code_root):-len(".py")].replace("/", ".")
        starts = list(_CLASS.finditer(text))
        for index, match in enumerate(starts):
            body = text[match.end(): starts[index + 1].start() if index + 1 < len(starts) else len(text)]
            params, buffers = _names(body, "__parameters__"), _names(body, "__buffers__")
            if params is not None and buffers is not None:  # else: keep every tensor of the class
                found[f"{module}.{match.group(1)}"] = (params, buffers)
    return found


def _names(body: str, field: str) -> list[str] | None:
    """The names a class body declares in ``field``; None when it declares none (older archives)."""
    match = re.search(rf"^\s+{field}{_LIST}", body, re.M)
    return re.findall(r'"([^"]+)"', match.group(1)) if match else None


def _flatten(obj: _ScriptObject, decls: dict, prefix: str, out: dict[str, torch.Tensor], path: Path,
             seen: set[int]) -> None:
    if id(obj) in seen:
        raise ModelLoadError(f"{path}: TorchScript module tree has a cycle; cliplab refuses it")
    seen.add(id(obj))
    if not isinstance(obj.state, dict):
        raise ModelLoadError(f"{path}: TorchScript object {obj.qualname} has custom state; cliplab refuses it")
    params, buffers = decls.get(obj.qualname, (None, None))
    keep = None if params is None else set(params) | set(buffers)
    for key, value in obj.state.items():
        if isinstance(value, _ScriptObject):
            _flatten(value, decls, f"{prefix}{key}.", out, path, seen)
        elif isinstance(value, torch.Tensor) and (keep is None or key in keep):
            out[f"{prefix}{key}"] = value


def read_torchscript_state(path: Path) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a TorchScript archive by dotted name, as ``state_dict()`` names them.

    Runs no code from the file; raises ModelLoadError (one line) for archives with state hooks, with
    pickled objects other than tensors and script modules, or without a module at the root.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                raise ModelLoadError(f"{path}: not a TorchScript archive (no single <name>/data.pkl)")
            prefix = pickles[0].split("/")[0]
            decls = _declarations(archive, prefix, path)
            root = _Unpickler(archive.read(pickles[0]), archive, prefix, path).load()
    except ModelLoadError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError,
            AttributeError, IndexError, KeyError, OSError) as exc:
        raise ModelLoadError(f"{path}: unreadable TorchScript archive ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(root, _ScriptObject):
        raise ModelLoadError(f"{path}: TorchScript archive holds no module at its root")
    state: dict[str, torch.Tensor] = {}
    _flatten(root, decls, "", state, path, set())
    return {key: value.clone() for key, value in state.items()}
