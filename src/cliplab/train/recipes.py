"""Named pretraining recipes, built on demand and cached by recipe hash (benchmarks and slow tests use them).

``cifar10-signal`` is the recipe that gives weights carrying signal: a small ModifiedResNet CLIP trained on
the CIFAR-10 train images (9,000 after the validation hold-out) with CIFAR-10 template captions. It was
chosen on the validation split (``scripts/pretrain_sweep.py``, results in benchmarks/results/); the test
split was never used to choose it. ``cifar10-ci`` is a 40-step version for CI. Build times (``DURATIONS``) are
measured by benchmarks/pretrain_cifar10.py and benchmarks/recipe_speed.py (steps per second, CPU seconds a step).
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
                       "checkpoint_every": 100, "checkpoint_seconds": 120.0},
    "cifar10-ci": {"source": "cifar10", "model": "cliplab-rn-32px", "templates": "cifar10", "steps": 40,
                   "batch_size": 128, "lr": 2e-3, "warmup": 5, "crop_scale": 0.5, "eval_every": 20,
                   "checkpoint_every": 20, "checkpoint_seconds": 120.0},
    # the ViT twin of cifar10-signal (issue 26: dense methods need patch tokens): patch 4 on 32 px (an 8 x 8 grid),
    # positional embeddings resampled bicubically for other grids by cliplab.models.dense; the same options as
    # cifar10-signal, not tuned separately (66.3% held-out val zero-shot: recipe_build_cifar10-vit-signal.md)
    "cifar10-vit-signal": {"source": "cifar10", "model": "cliplab-vit-32px", "templates": "cifar10", "steps": 1600,
                           "batch_size": 256, "lr": 2e-3, "warmup": 100, "crop_scale": 0.5, "eval_every": 200,
                           "checkpoint_every": 100, "checkpoint_seconds": 120.0},
}
# what a build costs, measured (benchmarks/results/): cifar10-signal took 15.5 min on 2 idle CPU cores when it was
# made (pretrain_cifar10.md, 0.58 s a step); with the load average at 7-11, 16 s a step, 5.1 CPU s a step
# (recipe_speed_cifar10-signal_12steps.md); cifar10-ci 5.3 min with the load at 5-8 (7.6 s a step, 3.2 CPU s a step,
# recipe_speed_cifar10-ci.md); cifar10-vit-signal 73.8 min, 1.88 s a step over its first 200 steps on idle cores and
# 2.3-5.3 s a step while other work shared them (recipe_build_cifar10-vit-signal.md)
DURATIONS = {"cifar10-signal": "1,600 steps: 16 min measured on 2 idle CPU cores, hours on a busy machine",
             "cifar10-ci": "40 steps: about 5 min measured on 2 busy CPU cores",
             "cifar10-vit-signal": "1,600 steps: 74 min measured on 2 shared CPU cores, 1.9 s a step while they "
                                   "were idle"}


class RecipeNotBuiltError(PretrainOptionError):
    """A recipe model was asked for without permission to train it."""


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
                 progress: bool = True, build: bool = True, announce=None, **overrides) -> Path:
    """The folder of recipe ``name``'s trained model, training it first if no finished copy is cached.

    ``build=False`` raises :class:`RecipeNotBuiltError` (saying how long a build takes and how to start one)
    instead of training; ``announce(line)`` is told before a build starts. A half-finished build (killed)
    resumes from its last checkpoint; concurrent callers wait on a lock.
    """
    config = recipe_config(name, data_root, **overrides)
    folder = recipe_folder(config, name, models_dir)
    if is_finished(folder):
        return folder
    if not build:
        raise RecipeNotBuiltError(
            f"recipe:{name} is not built yet: building it trains a model here ({DURATIONS.get(name, 'minutes')}); "
            f"build it with: cliplab pretrain --recipe {name} (or add --build-recipe to this command)")
    if announce is not None:
        announce(f"building recipe:{name} ({config.steps:,} training steps, {DURATIONS.get(name, 'minutes')}; "
                 f"checkpoints every {config.checkpoint_every} steps or {config.checkpoint_seconds / 60:g} min, an "
                 f"interrupted build resumes from the last one) into {folder}")
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
