"""One training loop for every method that trains: ``run_training(module, objective, data, settings)``.

What it does: trains the parameters of ``module`` that require grad (an ``nn.Module``, or a Backbone: its
``model``) with AdamW or SGD; sets the learning rate from a warm-up (linear, or constant at ``warmup_lr`` as
Dassl/CoOp) and a cosine decay; clips the gradient norm; runs the objective under bf16 autocast when asked;
shows loss, lr, the latest held-out numbers and the time left (``steady_eta``: the mean step time after the
first steps) in a progress bar; runs on CUDA when present; and, given a ``checkpoint_dir``, writes
``checkpoint.pt`` there atomically every ``checkpoint_every`` steps and/or ``checkpoint_seconds`` seconds, from
which a killed run resumes and ends with the same weights, bit for bit, as an uninterrupted one (CPU; CUDA
kernels are deterministic only where torch makes them so).

How it stays exact: torch's global RNG is reseeded from (seed, step) before each step (inside ``fork_rng``,
so the caller's RNG is untouched), so dropout, augmentation or caption draws that an objective takes from
torch's RNG depend on the step, not on history; ``data(epoch)`` must itself be seeded by the epoch. A
checkpoint holds the trained parameters and every buffer, the optimiser state, the step, the epoch and
the batches done in it; resuming calls ``data(epoch, start=k)`` when ``data`` takes ``start`` (else it
skips k batches). A checkpoint written with other result-deciding settings (or another ``identity``) is
refused, naming what differs. Checkpoints are read with ``weights_only=True``.

Two run shapes:

- step-based (``steps=N``): open_clip's schedule, ``lr(t) = lr (t+1)/W`` for ``t < W`` then
  ``lr/2 (1 + cos(pi (t-W)/(N-W)))``, updated every optimiser step; ``data(epoch)`` is called for epoch
  0, 1, ... until N steps are done (it may also be an endless stream).
- epoch-based (``epochs=E``): Dassl's per-epoch schedule (CoOp): the rate is set once an epoch;
  ``warmup_steps`` then counts epochs; epoch ``e < W`` runs at ``warmup_lr`` (constant) or
  ``lr (e+1)/W`` (linear), later epochs at ``lr/2 (1 + cos(pi (e-W)/E))`` (cosine over max_epoch, as
  Dassl's successor scheduler).

Objectives are named (``register_objective``/``get_objective``; ``clip``, ``siglip``, ``clipn`` live in
``train/objectives.py``). An objective is called ``objective(module, batch) -> (loss, logs)`` with the batch
on the device; it may define ``param_groups(module, weight_decay)`` (which parameters decay) and
``after_step(module)`` (e.g. clamp a logit scale); an objective with its own state (MLCD's cluster centres and
classifier, CLIP-Refine's frozen original) defines ``state_dict()``/``load_state_dict(state)``, kept in the checkpoint
(tensors and plain values). Example (CoOp-style, epoch-based)::

    from cliplab.train.engine import TrainSettings, get_objective, run_training

    settings = TrainSettings(epochs=50, lr=0.002, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                             warmup="constant", warmup_steps=1, warmup_lr=1e-5, seed=1,
                             checkpoint_dir=out / "train_state", desc="coop")
    def data(epoch, start=0):      # that epoch's batches, seeded by (seed, epoch)
        order = np.random.default_rng([1, epoch]).permutation(n)
        for b in range(start, n // 32):
            idx = order[b * 32:(b + 1) * 32]
            yield {"features": feats[idx], "labels": labels[idx]}
    result = run_training(prompt_learner, my_objective, data, settings, evaluate=lambda: {"val_top1": ...})
"""

from __future__ import annotations

import inspect
import io
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CliplabError
from ..fileio import atomic_write

STATE_FILE = "checkpoint.pt"
FORMAT = "cliplab-train-1"
_OBJECTIVES: dict[str, type] = {}


class TrainOptionError(CliplabError, ValueError):
    """A training setting is invalid, or differs from the checkpoint being resumed."""


# -- objective registry ------------------------------------------------------------------------
def register_objective(name: str) -> Callable[[type], type]:
    """Class decorator: register an objective class under ``name`` (``get_objective(name, **params)`` builds it)."""

    def wrap(cls: type) -> type:
        if name in _OBJECTIVES and _OBJECTIVES[name] is not cls:
            raise TrainOptionError(f"objective {name!r} is registered twice ({_OBJECTIVES[name].__name__}, "
                                   f"{cls.__name__})")
        _OBJECTIVES[name] = cls
        cls.name = name
        return cls

    return wrap


def _load_builtin_objectives() -> None:
    from . import (  # noqa: F401  (registering: clip, siglip, clipn; distill; mlcd, clip-refine, lightclip, clip-moe, cloc)
        distill,
        objectives,
        objectives_lightclip,
        objectives_mlcd,
        objectives_moe,
        objectives_refine,
        objectives_region,
    )


def list_objectives() -> list[str]:
    """Names of the registered objectives, sorted."""
    _load_builtin_objectives()
    return sorted(_OBJECTIVES)


def get_objective(name: str, **params):
    """A new objective ``name`` built with ``params``; an unknown name is one line listing the known ones."""
    _load_builtin_objectives()
    if name not in _OBJECTIVES:
        raise TrainOptionError(f"unknown objective {name!r}; known: {', '.join(sorted(_OBJECTIVES))}")
    try:
        return _OBJECTIVES[name](**params)
    except TypeError as exc:
        raise TrainOptionError(f"objective {name!r}: {exc}") from exc


# -- settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    """How to train. Exactly one of ``epochs`` / ``steps``. Fields in ``RESUMABLE`` may change on resume."""

    epochs: int | None = None
    steps: int | None = None
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8  # adamw
    weight_decay: float = 0.0
    warmup_steps: int = 0  # in schedule units: steps, or epochs for epoch-based runs
    warmup: str = "linear"  # linear | constant (at warmup_lr)
    warmup_lr: float = 1e-5
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    seed: int = 0
    device: str | None = None  # None: CUDA when present, else CPU
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 0  # steps; 0 = only at the end (and by time)
    checkpoint_seconds: float = 0.0  # 0 = off
    progress: bool = True
    eval_every: int = 0  # schedule units (steps or epochs); 0 = only at the end
    desc: str = "train"
    identity: str = ""  # JSON of the caller's result-deciding options, checked on resume

    RESUMABLE = ("device", "checkpoint_dir", "checkpoint_every", "checkpoint_seconds", "progress", "eval_every",
                 "desc")

    def __post_init__(self):
        if (self.epochs is None) == (self.steps is None):
            raise TrainOptionError("give exactly one of epochs or steps")
        if (self.epochs or self.steps) < 1:
            raise TrainOptionError("epochs / steps must be at least 1")
        if self.optimizer not in ("adamw", "sgd"):
            raise TrainOptionError(f"optimizer {self.optimizer!r}: choose adamw or sgd")
        if self.warmup not in ("linear", "constant"):
            raise TrainOptionError(f"warmup {self.warmup!r}: choose linear or constant")
        if self.schedule not in ("cosine", "constant"):
            raise TrainOptionError(f"schedule {self.schedule!r}: choose cosine or constant")
        if self.precision not in ("fp32", "bf16"):
            raise TrainOptionError(f"precision {self.precision!r}: choose fp32 or bf16")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise TrainOptionError("lr must be > 0, warmup_steps and grad_clip >= 0")

    @property
    def by_epoch(self) -> bool:
        return self.epochs is not None

    @property
    def total(self) -> int:
        """Schedule length: steps, or epochs."""
        return int(self.epochs if self.by_epoch else self.steps)

    def result_options(self) -> dict:
        """The settings that decide the result (what a resume must repeat)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.RESUMABLE}
        out["betas"] = list(out["betas"])
        return out


def scheduled_lr(settings: TrainSettings, t: int) -> float:
    """The learning rate at schedule unit ``t`` (an optimiser step, or an epoch for epoch-based runs)."""
    warm, total, lr = settings.warmup_steps, settings.total, settings.lr
    if t < warm:
        return settings.warmup_lr if settings.warmup == "constant" else lr * (t + 1) / warm
    if settings.schedule == "constant":
        return lr
    horizon = total if settings.by_epoch else max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * (t - warm) / horizon)) * lr


# -- results -----------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a run did: steps and epochs done, seconds (over all its sessions), history, last loss and metrics."""

    steps: int
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    last_loss: float = float("nan")
    final_metric: dict = field(default_factory=dict)
    resumed_from: int = 0


# -- helpers -----------------------------------------------------------------------------------
def torch_module(module: Any) -> torch.nn.Module:
    """The ``nn.Module`` whose parameters train: ``module`` itself, or a Backbone's ``model``."""
    if isinstance(module, torch.nn.Module):
        return module
    inner = getattr(module, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    raise TrainOptionError(f"cannot train a {type(module).__name__}: give an nn.Module or a Backbone")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when present else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on 1-d parameters, biases, norms and the logit scale/bias."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    return [g for g in ({"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay})
            if g["params"]]


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors in ``batch`` (nested dicts, lists, tuples) moved to ``device``; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def trained_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps: parameters that require grad and every persistent buffer (e.g. BN statistics)."""
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.nn.Parameter) or value.requires_grad:
            out[name] = value.detach().cpu().clone()
    return out


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint atomically (a kill mid-write leaves the previous one)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def read_checkpoint(path: str | Path) -> dict:
    """A training checkpoint, read without unpickling arbitrary objects."""
    from ..models.checkpoints import load_error_line

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for damaged files
        raise CliplabError(f"{path}: unreadable training checkpoint ({load_error_line(exc)}); "
                           "delete it to start over") from exc


ETA_SKIP = 2  # steps of a session left out of the progress bar's rate (the first ones read, allocate, compile)


def steady_eta(first: float, last: float, steps: int, remaining: int) -> float | None:
    """Seconds left for ``remaining`` steps at the mean rate of the ``steps`` steps run between times ``first``
    and ``last`` (the steps after a session's first ``ETA_SKIP``); None before any such step."""
    if steps < 1:
        return None
    return max(0.0, (last - first) / steps * max(remaining, 0))


def _eta_text(seconds: float | None) -> str:
    return "?" if seconds is None else tqdm.format_interval(round(seconds))


def _takes_start(data: Callable) -> bool:
    try:
        return "start" in inspect.signature(data).parameters
    except (TypeError, ValueError):
        return False


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


def _check_resume(state: dict, settings: TrainSettings, path: Path) -> None:
    if state.get("format") != FORMAT:
        raise CliplabError(f"{path}: not a cliplab training checkpoint (format {state.get('format')!r})")
    saved, mine = json.loads(state["settings"]), settings.result_options()
    changed = [k for k in mine if saved.get(k) != mine[k] and k != "identity"]
    if saved.get("identity", "") != mine["identity"]:
        old, new = json.loads(saved.get("identity") or "{}"), json.loads(mine["identity"] or "{}")
        changed += [f"{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)] or ["identity"]
    if changed:
        detail = ", ".join(f"{k} {saved.get(k)!r} -> {mine.get(k)!r}" if k in mine else k for k in changed)
        raise TrainOptionError(f"{path}: cannot resume with different options ({detail}); use the same options "
                               "or another checkpoint folder")


class _Modes:
    """Training mode for submodules holding a trainable parameter, eval mode for frozen ones (BN statistics
    of a frozen tower stay fixed, as Dassl leaves frozen encoders in eval mode)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.frozen = []
        for m in module.modules():
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                self.frozen.append(m)

    def train(self) -> None:
        self.module.train()
        for m in self.frozen:
            m.eval()

    def eval(self) -> None:
        self.module.eval()


# -- the loop ----------------------------------------------------------------------------------
def run_training(module: Any, objective: Callable, data: Callable[..., Iterable], settings: TrainSettings, *,
                 evaluate: Callable[[], Mapping[str, float]] | None = None,
                 callback: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``module``'s parameters that require grad on ``objective`` over ``data``; see the module docstring.

    ``evaluate()`` gives held-out numbers (run every ``eval_every`` schedule units and at the end, in eval
    mode, shown in the progress bar and kept in ``history``). ``callback(step, loss)`` runs after every step
    (tests use it to interrupt a run). The module is left in eval mode on the device it trained on.
    """
    net = torch_module(module)
    device = resolve_device(settings.device)
    if hasattr(module, "to") and not isinstance(module, torch.nn.Module):
        module.to(device)  # a Backbone: moves its model and its notion of the device
    else:
        net.to(device)
    groups = (objective.param_groups(net, settings.weight_decay) if hasattr(objective, "param_groups")
              else default_param_groups(net, settings.weight_decay))
    if not any(g["params"] for g in groups):
        raise TrainOptionError(f"{settings.desc}: no parameter requires grad; nothing to train")
    if settings.optimizer == "adamw":
        fused = device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                                      fused=fused)
    else:
        optimizer = torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = [p for p in net.parameters() if id(p) in in_groups]  # module order, as open_clip clips
    state_path = Path(settings.checkpoint_dir) / STATE_FILE if settings.checkpoint_dir else None
    step, epoch, position, history, seconds = 0, 0, 0, [], 0.0
    if state_path is not None and state_path.is_file():
        state = read_checkpoint(state_path)
        _check_resume(state, settings, state_path)
        current = net.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, value in state["model"].items():
                if name not in current:
                    raise CliplabError(f"{state_path}: holds {name!r}, which this module does not have")
                current[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        if hasattr(objective, "load_state_dict") and "objective" in state:
            objective.load_state_dict(state["objective"])
        step, epoch, position = int(state["step"]), int(state["epoch"]), int(state["position"])
        history, seconds = json.loads(state["history"]), float(state["seconds"])
    resumed_from = step
    modes = _Modes(net)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")
    began = time.perf_counter() - seconds
    last_save = time.perf_counter()
    last_loss = float("nan")
    metrics = {k: v for k, v in (history[-1] if history else {}).items() if k not in ("step", "epoch", "seconds",
                                                                                      "loss")}

    def lr_at(step_: int, epoch_: int) -> float:
        return scheduled_lr(settings, epoch_ if settings.by_epoch else step_)

    def checkpoint() -> None:
        nonlocal last_save
        if state_path is None:
            return
        save_checkpoint(state_path, {
            "format": FORMAT, "model": trained_state(net), "optimizer": optimizer.state_dict(), "step": step,
            "epoch": epoch, "position": position, "history": json.dumps(history),
            "seconds": time.perf_counter() - began, "settings": json.dumps(settings.result_options()),
            **({"objective": objective.state_dict()} if hasattr(objective, "state_dict") else {})})
        last_save = time.perf_counter()

    def run_eval(unit: int) -> None:
        nonlocal metrics
        if evaluate is None:
            return
        modes.eval()
        with torch.no_grad(), torch.autocast(**autocast):
            metrics = {k: float(v) for k, v in evaluate().items()}
        history.append({"step": step, "epoch": epoch, "seconds": round(time.perf_counter() - began, 2),
                        "loss": round(last_loss, 4), **metrics})
        modes.train()

    sized = _epoch_length(data, 0) if settings.by_epoch else None
    total = settings.steps if not settings.by_epoch else (settings.epochs * sized if sized else None)
    # tqdm's own remaining time smooths over the last few steps, the slow first ones included; the bar shows
    # ``steady_eta`` instead (the mean step time after this session's first ETA_SKIP steps)
    bar = tqdm(total=total, initial=step if total else 0, desc=settings.desc, disable=not settings.progress,
               unit="step", leave=False, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    session_steps, warm_end = 0, None
    starts = _takes_start(data)
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    already_done = _finished(settings, step, epoch)  # a finished run resumed: nothing to train, evaluate or save
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        modes.train()
        while not _finished(settings, step, epoch):
            batches = data(epoch, start=position) if starts else data(epoch)
            iterator = iter(batches)
            if not starts:
                for _ in range(position):
                    next(iterator, None)
            seen = position
            for batch in iterator:
                lr = lr_at(step, epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                torch.manual_seed(_step_seed(settings.seed, step))
                with torch.autocast(**autocast):
                    loss, logs = objective(module, to_device(batch, device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
                optimizer.step()
                if hasattr(objective, "after_step"):
                    objective.after_step(module)
                last_loss = float(loss.detach())
                if not math.isfinite(last_loss):
                    raise CliplabError(f"{settings.desc}: training diverged at step {step} (loss {last_loss}); "
                                       "lower the learning rate or lengthen the warm-up")
                step += 1
                seen += 1
                position = seen
                if not settings.by_epoch and settings.eval_every and step % settings.eval_every == 0 \
                        and step < settings.steps:
                    run_eval(step)
                session_steps += 1
                if session_steps == ETA_SKIP:
                    warm_end = time.perf_counter()
                if settings.progress:
                    eta = None if warm_end is None or not total else \
                        steady_eta(warm_end, time.perf_counter(), session_steps - ETA_SKIP, total - step)
                    bar.update(1)
                    bar.set_postfix(eta=_eta_text(eta), loss=f"{last_loss:.3f}", lr=f"{lr:.2e}",
                                    **{k: f"{v:.3f}" for k, v in metrics.items()})
                done = _finished(settings, step, epoch)
                if not done and ((settings.checkpoint_every and step % settings.checkpoint_every == 0) or
                                 (settings.checkpoint_seconds and
                                  time.perf_counter() - last_save >= settings.checkpoint_seconds)):
                    checkpoint()
                if callback is not None and not done:
                    callback(step, last_loss)
                if done:
                    break
            if seen == 0:
                raise CliplabError(f"{settings.desc}: data gave no batches for epoch {epoch}")
            if settings.by_epoch or not _finished(settings, step, epoch):
                epoch, position = epoch + 1, 0
                if settings.by_epoch and settings.eval_every and epoch % settings.eval_every == 0 \
                        and epoch < settings.epochs:
                    run_eval(epoch)
        if not already_done:
            run_eval(settings.total)
            checkpoint()
            if callback is not None:
                callback(step, last_loss)
    bar.close()
    modes.eval()
    return TrainResult(step, epoch, time.perf_counter() - began, history, last_loss, dict(metrics), resumed_from)


def _finished(settings: TrainSettings, step: int, epoch: int) -> bool:
    return epoch >= settings.epochs if settings.by_epoch else step >= settings.steps


def _epoch_length(data: Callable, epoch: int) -> int | None:
    try:
        return len(data(epoch))  # type: ignore[arg-type]
    except TypeError:
        return None


def settings_dict(settings: TrainSettings) -> dict:
    """All settings as plain JSON values (for model cards)."""
    out = asdict(settings)
    out["checkpoint_dir"] = str(out["checkpoint_dir"]) if out["checkpoint_dir"] is not None else None
    out["betas"] = list(out["betas"])
    return out
