"""Named pretraining recipes, built on demand and cached by recipe hash (benchmarks and slow tests use them).

``cifar10-signal`` is the recipe that gives weights carrying signal: a small ModifiedResNet CLIP trained on
the CIFAR-10 train images (9,000 after the validation hold-out) with CIFAR-10 template captions. It was
chosen on the validation split (``scripts/pretrain_sweep.py``, results in benchmarks/results/); the test
split was never used to choose it. ``cifar10-ci`` is a one-minute version for CI.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from ..fileio import default_cache_root
from .config import PretrainConfig, PretrainOptionError, resolve_model_config
from .export import CARD_JSON
from .loop import WEIGHTS, pretrain

RECIPES: dict[str, dict] = {
    "cifar10-signal": {"source": "cifar10", "model": "cliplab-rn-32px", "templates": "cifar10", "steps": 1600,
                       "batch_size": 256, "lr": 2e-3, "warmup": 100, "crop_scale": 0.5, "eval_every": 200,
                       "checkpoint_every": 100},
    "cifar10-ci": {"source": "cifar10", "model": "cliplab-rn-32px", "templates": "cifar10", "steps": 40,
                   "batch_size": 128, "lr": 2e-3, "warmup": 5, "crop_scale": 0.5, "eval_every": 20,
                   "checkpoint_every": 20},
}


def recipe_config(name: str, data_root: str | Path | None = None, **overrides) -> PretrainConfig:
    """The ``PretrainConfig`` of recipe ``name`` (options in ``overrides`` replace the recipe's)."""
    if name not in RECIPES:
        raise PretrainOptionError(f"--recipe {name!r}: choose one of {', '.join(RECIPES)}")
    return PretrainConfig(**{**RECIPES[name], "data_root": str(data_root) if data_root else None, **overrides})


def recipe_folder(config: PretrainConfig, name: str, models_dir: str | Path | None = None) -> Path:
    """``<models_dir or $CLIPLAB_CACHE/models>/<name>-<recipe hash>``."""
    _, model_cfg = resolve_model_config(config.model)
    base = Path(models_dir) if models_dir is not None else default_cache_root() / "models"
    return base / f"{name}-{config.recipe_hash(model_cfg)[:16]}"


def recipe_model(name: str, data_root: str | Path | None = None, models_dir: str | Path | None = None,
                 progress: bool = True, **overrides) -> Path:
    """The folder of recipe ``name``'s trained model, training it first if no finished copy is cached.

    A half-finished build (killed) resumes from its last checkpoint; concurrent callers wait on a lock.
    """
    config = recipe_config(name, data_root, **overrides)
    folder = recipe_folder(config, name, models_dir)
    if is_finished(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_finished(folder):
            pretrain(config, folder, progress=progress)
    return folder


def is_finished(folder: Path) -> bool:
    """True when ``folder`` holds a completed model (the card is written after the weights)."""
    try:
        card = json.loads((folder / CARD_JSON).read_text())
    except (OSError, ValueError):
        return False
    return (folder / WEIGHTS).is_file() and card.get("steps") == card.get("options", {}).get("steps")
