"""How a Backbone's inference runs: precision (fp32, bf16, fp16) and runtime (torch, onnx, int8).

Only ``encode_images`` and ``encode_texts`` go through an :class:`Engine`; the training methods
(``forward_*``) and ``dense_features`` always run the torch model in fp32.

- ``torch``: the model itself; ``bf16``/``fp16`` run it under ``torch.autocast`` on its device (fp16
  on CUDA only). Outputs are cast to float32 before normalising.
- ``onnx``: each tower is exported once per model (``model_id`` + weights digest) and input size with
  ``torch.onnx.export`` (the dynamo exporter, which needs ``onnxscript``), checked against torch on
  the example batch, stored atomically under ``<cache root>/onnx`` and run with onnxruntime's CPU
  provider using torch's thread count. fp32 only.
- ``int8``: torch dynamic quantisation of the ``nn.Linear`` layers of a copy of the model
  (``torch.ao.quantization.quantize_dynamic``, weights int8, activations quantised per batch); CPU,
  fp32 activations. open_clip's attention projections are not ``nn.Linear`` and stay fp32, as do the
  projections of ModifiedResNet's attention pool (it reads them as tensors).

When onnxruntime is missing or a tower cannot be exported (or quantised), one warning line on
stderr names why and that tower runs in torch fp32; :meth:`Engine.encoding_id` then says ``fp32-torch``,
so the feature caches, which key on it, never mix features of different precision or runtime.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DeviceError, UnsupportedOperationError
from ..fileio import default_cache_root, digest, temporary_name

if TYPE_CHECKING:
    from .backbone import Backbone

PRECISIONS = ("fp32", "bf16", "fp16")
RUNTIMES = ("torch", "onnx", "int8")
DEFAULT_PRECISION = "fp32"  # the one place the default is set (the CLI and load_model read it)
DEFAULT_RUNTIME = "torch"
BASELINE = "fp32-torch"  # features keyed as before precision and runtime existed
ONNX_CHECK_ATOL = 1e-3  # an export whose normalised output differs from torch by more is refused
TOWERS = ("image", "text")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger(__name__)
Runner = Callable[[torch.Tensor], torch.Tensor]


class RuntimeUnavailable(Exception):
    """A runtime cannot serve a tower; the message says why (internal: the engine falls back to torch)."""


def check_options(precision: str | None, runtime: str | None, device: str | torch.device) -> tuple[str, str]:
    """``(precision, runtime)`` with defaults filled in, or a one-line error naming the option."""
    precision = DEFAULT_PRECISION if precision is None else precision
    runtime = DEFAULT_RUNTIME if runtime is None else runtime
    if precision not in PRECISIONS:
        raise UnsupportedOperationError(f"--precision {precision}: not one of {', '.join(PRECISIONS)}")
    if runtime not in RUNTIMES:
        raise UnsupportedOperationError(f"--runtime {runtime}: not one of {', '.join(RUNTIMES)}")
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise DeviceError(f"--precision fp16 runs on CUDA only (this model is on {kind}); "
                          "use --precision bf16 or fp32")
    if runtime != "torch" and precision != "fp32":
        raise UnsupportedOperationError(f"--runtime {runtime} runs in fp32; use --precision fp32 "
                                        f"(or --runtime torch for {precision})")
    if runtime != "torch" and kind != "cpu":
        raise DeviceError(f"--runtime {runtime} runs on the CPU (this model is on {kind}); use --device cpu "
                          "or --runtime torch")
    return precision, runtime


def default_onnx_dir() -> Path:
    """``<cliplab cache root>/onnx`` (see ``fileio.default_cache_root``)."""
    return default_cache_root() / "onnx"


def encoding_key(backbone: Any, tower: str = "image") -> tuple[str, ...]:
    """The part of a feature cache key that names precision and runtime: empty for fp32 torch (the keys
    caches had before these options, so they stay valid), else ``(encoding_id,)``."""
    engine = getattr(backbone, "engine", None)
    encoding = engine.encoding_id(backbone, tower) if isinstance(engine, Engine) else BASELINE
    return () if encoding == BASELINE else (encoding,)


def onnx_missing() -> str | None:
    """Why the onnx runtime cannot be used here (a missing package), or None."""
    missing = [name for name in ("onnxruntime", "onnx", "onnxscript") if not _installed(name)]
    if missing:
        return f"{', '.join(missing)} not installed (pip install 'cliplab[onnx]')"
    return None


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or the module blocked in sys.modules
        return False


class Engine:
    """Runs a backbone's towers for inference in one precision and runtime.

    One engine belongs to one backbone (``Backbone.derive`` gives the copy a fresh one). Exported or
    quantised models are prepared on first use of a tower and rebuilt when the backbone's ``model_id``
    (its weights) or the input size changes.
    """

    def __init__(self, precision: str = DEFAULT_PRECISION, runtime: str = DEFAULT_RUNTIME,
                 onnx_dir: str | Path | None = None):
        self.precision = precision
        self.runtime = runtime
        self.onnx_dir = Path(onnx_dir) if onnx_dir is not None else None
        self._slots: dict[str, tuple[tuple, Runner | None]] = {}  # tower -> (key, runner or None: torch)
        self._quantized: tuple[str, Backbone] | None = None  # (model_id, backbone over the int8 copy)
        self._warned: set[str] = set()

    def fresh(self) -> Engine:
        """An engine with the same options and nothing prepared."""
        return Engine(self.precision, self.runtime, self.onnx_dir)

    def __repr__(self) -> str:
        return f"Engine({self.precision!r}, {self.runtime!r})"

    # -- identity ------------------------------------------------------------------------
    def encoding_id(self, backbone: Backbone, tower: str = "image") -> str:
        """``PRECISION-RUNTIME`` that ``tower`` actually runs with (``fp32-torch`` after a fallback).

        For onnx and int8 this prepares the tower (exports it once), so that a cache key never names a
        runtime the features were not made with.
        """
        if self.runtime == "torch":
            return f"{self.precision}-torch"
        runner = self._runner(backbone, tower, _example_shape(backbone, tower))
        return f"{self.precision}-{self.runtime}" if runner is not None else BASELINE

    # -- running -------------------------------------------------------------------------
    def forward(self, backbone: Backbone, tower: str, inputs: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings of ``inputs`` (images (n, 3, H, W) or token ids (m, L)), without autograd."""
        if self.runtime != "torch":
            runner = self._runner(backbone, tower, tuple(inputs.shape[1:]))
            if runner is not None:
                return runner(inputs)
        forward = backbone._image_forward if tower == "image" else backbone._text_forward
        with torch.no_grad(), self.autocast(backbone.device):
            return forward(inputs.to(backbone.device))

    def autocast(self, device: torch.device):
        """``torch.autocast`` for this precision on ``device`` (a no-op context for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        if self.precision == "fp16" and device.type != "cuda":
            raise DeviceError(f"--precision fp16 runs on CUDA only (this model is on {device.type}); "
                              "use --precision bf16 or fp32")
        return torch.autocast(device_type=device.type, dtype=_DTYPES[self.precision])

    # -- preparing onnx / int8 -----------------------------------------------------------
    def _runner(self, backbone: Backbone, tower: str, shape: tuple[int, ...]) -> Runner | None:
        key = (backbone.model_id, shape) if self.runtime == "onnx" else (backbone.model_id,)
        slot = self._slots.get(tower)
        if slot is not None and slot[0] == key:
            return slot[1]
        try:
            runner = self._prepare_onnx(backbone, tower, shape) if self.runtime == "onnx" else \
                self._prepare_int8(backbone, tower)
        except Exception as exc:  # any failure to export, load or quantise: torch is used instead
            self._warn(backbone, tower, exc)
            runner = None
        self._slots[tower] = (key, runner)
        return runner

    def _warn(self, backbone: Backbone, tower: str, exc: Exception) -> None:
        reason = str(exc) if isinstance(exc, RuntimeUnavailable) else f"{type(exc).__name__}: {_first_line(exc)}"
        message = (f"--runtime {self.runtime}: cannot run the {tower} tower of {backbone.info.name} "
                   f"({reason}); using torch fp32 instead")
        log.debug(message)
        if message not in self._warned:  # printed, not logged: the CLI silences logging without --debug
            self._warned.add(message)
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def _prepare_int8(self, backbone: Backbone, tower: str) -> Runner:
        model_id = backbone.model_id
        if self._quantized is None or self._quantized[0] != model_id:
            self._quantized = (model_id, quantized_copy(backbone))
        shadow = self._quantized[1]
        forward = shadow._image_forward if tower == "image" else shadow._text_forward

        def run(inputs: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return forward(inputs.cpu())

        return run

    def _prepare_onnx(self, backbone: Backbone, tower: str, shape: tuple[int, ...]) -> Runner:
        why = onnx_missing()
        if why:
            raise RuntimeUnavailable(why)
        folder = export_onnx(backbone, tower, shape, self.onnx_dir or default_onnx_dir())
        try:
            session = onnx_session(folder / "model.onnx")
        except Exception:  # an unreadable export: removed, so the next run exports it again
            shutil.rmtree(folder, ignore_errors=True)
            raise
        name = session.get_inputs()[0].name
        dtype = torch.float32 if tower == "image" else torch.int64

        def run(inputs: torch.Tensor) -> torch.Tensor:
            array = inputs.detach().to("cpu", dtype).contiguous().numpy()
            return torch.from_numpy(session.run(None, {name: array})[0])

        return run


# -- int8 ----------------------------------------------------------------------------------
# Modules that read their Linear children's ``weight``/``bias`` as tensors (F.multi_head_attention_forward):
# their projections must stay float (open_clip's ModifiedResNet attention pool).
_READS_CHILD_TENSORS = ("AttentionPool2d",)


def _quantizable_linears(model: torch.nn.Module) -> set[str]:
    """Names of the ``nn.Linear`` layers that dynamic quantisation may replace: exact ``nn.Linear`` (not
    ``MultiheadAttention``'s ``out_proj``, which it reads as a tensor), outside ``_READS_CHILD_TENSORS``."""
    keep = [name for name, m in model.named_modules() if type(m).__name__ in _READS_CHILD_TENSORS]
    return {name for name, m in model.named_modules()
            if type(m) is torch.nn.Linear and not any(name.startswith(p + ".") for p in keep)}


def quantized_copy(backbone: Backbone) -> Backbone:
    """A shallow copy of ``backbone`` over an int8 dynamically quantised copy of its model (CPU)."""
    model = copy.deepcopy(backbone.model).cpu().eval()
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, _quantizable_linears(model), dtype=torch.qint8)
    for module in quantized.modules():  # open_clip reads its compute dtype from an MLP weight, or from this
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            module.int8_original_dtype = torch.float32
    shadow = copy.copy(backbone)
    shadow.model = quantized
    shadow.device = torch.device("cpu")
    shadow.engine = Engine()
    return shadow


# -- onnx ----------------------------------------------------------------------------------
class _Tower(torch.nn.Module):
    """One tower of a backbone as a module (the model registered, so its weights are the graph's)."""

    def __init__(self, backbone: Backbone, tower: str):
        super().__init__()
        self.model = backbone.model
        self._forward = backbone._image_forward if tower == "image" else backbone._text_forward

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._forward(inputs)


def _example_shape(backbone: Backbone, tower: str) -> tuple[int, ...]:
    """The per-item input shape a tower gets from this backbone's preprocessing or tokenizer."""
    if tower == "text":
        return tuple(backbone.tokenize(["a photo"]).shape[1:])
    from PIL import Image

    return tuple(backbone.preprocess(Image.new("RGB", (256, 256))).shape)


def _example_inputs(backbone: Backbone, tower: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A batch of two (a batch of one would fix the exported batch size)."""
    if tower == "text":
        tokens = backbone.tokenize(["a photo of a cat.", "a blurry photo of a small dog."])
        if tuple(tokens.shape[1:]) != shape:
            raise RuntimeUnavailable(f"token ids of length {shape} are not what the tokenizer makes")
        return tokens.cpu()
    generator = torch.Generator().manual_seed(0)
    return torch.randn((2, *shape), generator=generator)


def onnx_key(backbone: Backbone, tower: str, shape: tuple[int, ...]) -> str:
    """Folder name of an export: tower, input shape, model id, weights digest and torch version."""
    return f"{tower}-{'x'.join(map(str, shape))}-" + digest(
        backbone.model_id, backbone.weights_digest(), tower, repr(shape), torch.__version__)


def export_onnx(backbone: Backbone, tower: str, shape: tuple[int, ...], root: Path) -> Path:
    """The folder holding ``model.onnx`` (+ external weights) for this tower, exported if not there yet.

    Written into a temporary sibling folder and renamed into place, so a reader never sees a partial
    export; the output is compared with torch on the example batch before it is kept.
    """
    folder = Path(root) / onnx_key(backbone, tower, shape)
    if (folder / "model.onnx").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"note: exporting the {tower} tower of {backbone.info.name} to ONNX (once; kept in {folder.parent})",
          file=sys.stderr, flush=True)
    tmp = temporary_name(folder)
    tmp.mkdir()
    try:
        inputs = _example_inputs(backbone, tower, shape)
        module = _Tower(backbone, tower).cpu().eval()
        device = backbone.device
        try:
            if device.type != "cpu":
                backbone.model.cpu()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(module, (inputs,), None, dynamo=True, verbose=False,
                                            input_names=["inputs"], output_names=["embeddings"],
                                            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
                program.save(str(tmp / "model.onnx"), external_data=True)
                expected = module(inputs)
        finally:
            backbone.model.to(device)
        _check_export(tmp / "model.onnx", inputs, expected)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process put the same export there first
            if not (folder / "model.onnx").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _check_export(path: Path, inputs: torch.Tensor, expected: torch.Tensor) -> None:
    session = onnx_session(path)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])
    normalize = torch.nn.functional.normalize
    diff = (normalize(got.float(), dim=-1) - normalize(expected.float(), dim=-1)).abs().max().item()
    if not diff <= ONNX_CHECK_ATOL:
        raise RuntimeUnavailable(f"the exported model differs from torch by {diff:.2g} (max abs, normalised)")


def onnx_session(path: Path):
    """An onnxruntime CPU session on ``path`` with torch's intra-op thread count.

    Idle threads sleep instead of spinning: the DataLoader's decoding workers share the cores (at batch 1 on
    2 cores, spinning cost about a third of the throughput; at batch 64 it gained under 10%).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else "no message")[:200]

