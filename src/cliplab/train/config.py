"""What a pretraining run is: its options (``PretrainConfig``), its model config, and the hash of both."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import CliplabError
from ..fileio import digest

# Built-in small configs for 32 px images (CIFAR-sized). Text towers are narrow and short: training
# captions are short, and the token table (49,408 x width) dominates a small model's optimiser step.
BUILTIN_CONFIGS: dict[str, dict] = {
    "cliplab-vit-32px": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 192, "layers": 6, "head_width": 64,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    },
    "cliplab-rn-32px": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 32, "layers": [2, 2, 2, 2], "width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    },
}


class PretrainOptionError(CliplabError, ValueError):
    """A pretraining option is invalid, or differs from the run being resumed."""


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that decides a run's result. Two runs with equal configs give equal weights.

    ``source`` is a named dataset or a path (manifest with captions, COCO captions, folder); labelled
    sources without captions get captions from ``templates`` x class names. ``model`` is an open_clip
    architecture name, a model-config JSON path, or a built-in config (``BUILTIN_CONFIGS``);
    ``init_model``, a ``load_model`` spec, fine-tunes that model instead (``model`` is then not used).
    """

    source: str
    model: str = "cliplab-vit-32px"
    split: str = "train"
    eval_split: str | None = "val"
    templates: str = "cifar10"
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0
    loss: str = "clip"
    crop_scale: float = 0.5
    flip: bool = True
    seed: int = 0
    eval_every: int = 200
    checkpoint_every: int = 200
    device: str = "cpu"
    precision: str = "fp32"
    data_root: str | None = None
    init_model: str | None = None  # a load_model spec to fine-tune (None: random weights of ``model``)
    checkpoint_seconds: float = 0.0  # also checkpoint when this many seconds passed since the last one (0: off)
    loss_params: dict = field(default_factory=dict)  # the objective's parameters (train/objective_params.py)

    # Options that change neither weights nor data order: a resumed run may change them.
    RESUMABLE = ("eval_every", "checkpoint_every", "device", "data_root", "checkpoint_seconds")

    def __post_init__(self):
        if self.loss not in ("clip", "siglip", "mlcd", "clip-refine", "lightclip", "cloc", "grain",
                             "clip-moe"):  # objectives of train/engine.py
            raise PretrainOptionError(f"--loss {self.loss!r}: choose clip, siglip, mlcd, clip-refine, lightclip, cloc, "
                                      "grain or clip-moe (an upcycled --init-model: cliplab moe-upcycle)")
        if self.loss_params:
            from .objective_params import check_objective_params

            check_objective_params(self.loss, self.loss_params)
        if self.precision not in ("fp32", "bf16"):
            raise PretrainOptionError(f"--precision {self.precision!r}: choose fp32 or bf16")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise PretrainOptionError(f"--{name.replace('_', '-')} must be at least 1")
        if self.batch_size < 2:
            raise PretrainOptionError("--batch-size must be at least 2 (a contrastive loss needs negatives)")
        if not 0 < self.crop_scale <= 1:
            raise PretrainOptionError("--crop-scale must be in (0, 1]")
        if self.warmup < 0 or self.lr <= 0:
            raise PretrainOptionError("--warmup must be >= 0 and --lr > 0")

    def to_dict(self) -> dict:
        """The options as a dict; ``loss_params`` only when given (runs without keep their hashes and identity)."""
        data = asdict(self)
        if not data["loss_params"]:
            del data["loss_params"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PretrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def differences(self, other: PretrainConfig) -> list[str]:
        """Names of the options that change the result and differ between the two configs."""
        mine, theirs = asdict(self), asdict(other)
        return [k for k in mine if k not in self.RESUMABLE and mine[k] != theirs[k]]

    def recipe_hash(self, model_cfg: dict) -> str:
        """A digest of what decides the weights: the options (not where or how fast) and the model config."""
        options = {k: v for k, v in self.to_dict().items() if k not in self.RESUMABLE}
        if options["init_model"] is None:  # runs from random weights keep the hashes they had before the option
            del options["init_model"]
        return digest(json.dumps(options, sort_keys=True), json.dumps(model_cfg, sort_keys=True))


def resolve_model_config(model: str) -> tuple[str, dict]:
    """(name, open_clip model config) for a built-in config, an open_clip architecture or a JSON file."""
    import open_clip

    if model in BUILTIN_CONFIGS:
        return model, json.loads(json.dumps(BUILTIN_CONFIGS[model]))
    path = Path(model)
    if path.suffix == ".json" or path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PretrainOptionError(f"{model}: unreadable model config JSON ({exc})") from exc
        cfg = cfg.get("model_cfg", cfg)
        if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise PretrainOptionError(f"{model}: model config needs embed_dim, vision_cfg and text_cfg")
        return path.stem, cfg
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        known = ", ".join(BUILTIN_CONFIGS)
        raise PretrainOptionError(f"--model {model!r}: not a built-in config ({known}), an open_clip "
                                  "architecture (see: cliplab models) or a config JSON file")
    return model, json.loads(json.dumps(cfg))
