"""``pretrain``: CLIP's contrastive training (or fine-tuning) of an open_clip model on image-caption pairs.

The recipe follows open_clip's training code (open_clip_train/main.py, train.py, scheduler.py):
``ClipLoss`` (or ``SigLipLoss``), AdamW without weight decay on gains, biases and the logit scale,
linear warmup then cosine decay, gradient-norm clipping, the logit scale clamped to ln(100) after each
step. It runs on the one training loop (``train/engine.py``: objectives ``clip``/``siglip``), which gives
the seeding, the resumable checkpoints (``train_state/checkpoint.pt``) and the progress bar.

Departures: captions that occur several times in a batch are encoded once and gathered (the loss and its
gradients are the same; template captions repeat a lot); pairs are read streaming (``train/pairs.py``:
``PairStream``, images decoded per batch and augmented on tensors); data order and augmentation are drawn
from generators seeded by (seed, epoch) and (seed, step), so a resumed run repeats an uninterrupted one.

A run starts from random weights (``config.model``: a built-in config, an open_clip architecture or a
config JSON) or from a loaded model (``config.init_model``, a ``load_model`` spec, or ``init=`` a Backbone):
then it trains a ``derive()``d copy and the given model never changes. The held-out check during training
is the zero-shot head (``heads.create_head("zeroshot", ...)``, text weights through ``features.text``), or
image-to-text recall@1 through ``features.text`` for caption sources.
"""

from __future__ import annotations

import fcntl
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CliplabError
from .config import PretrainConfig, PretrainOptionError, resolve_model_config
from .engine import TrainSettings, get_objective, read_checkpoint, run_training, scheduled_lr
from .mixture import is_mixture, open_mixture
from .mosaic_source import check_box_source, open_source, tile_source
from .pairs import PairStream

STATE_DIR = "train_state"
CHECKPOINT = "checkpoint.pt"
WEIGHTS = "open_clip_model.safetensors"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PretrainResult:
    """Where the model was written, its held-out metric and the training history."""

    output_dir: Path
    config: PretrainConfig
    model_cfg: dict
    steps_done: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    final_metric: dict = field(default_factory=dict)
    skipped: int = 0
    resumed_from: int = 0
    notes: list[str] = field(default_factory=list)
    init_model_id: str | None = None
    preprocess: dict | None = None


def build_model(model_cfg: dict, seed: int, loss: str) -> torch.nn.Module:
    """An open_clip model with weights drawn from ``seed`` (SigLIP's logit bias and scale init for siglip)."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = dict(model_cfg)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    extra = {"init_logit_scale": math.log(10)} if loss == "siglip" else {}
    if loss == "siglip":
        cfg.setdefault("init_logit_bias", -10.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return (CustomTextCLIP if custom else CLIP)(**cfg, **extra)
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            raise PretrainOptionError(f"model config does not build an open_clip model: {exc}") from exc


def build_tokenizer(model_cfg: dict):
    """open_clip's tokenizer for the config (Hugging Face tokenizer if the text tower names one)."""
    import open_clip

    text = model_cfg["text_cfg"]
    context = text.get("context_length", 77)
    if text.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text["hf_tokenizer_name"], context_length=context)
    return open_clip.SimpleTokenizer(context_length=context)


def learning_rate(step: int, config: PretrainConfig) -> float:
    """open_clip's ``cosine_lr``: linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to 0."""
    return scheduled_lr(TrainSettings(steps=config.steps, lr=config.lr, warmup_steps=config.warmup), step)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """The usable-pair positions of ``step``: consecutive slices of one seeded permutation per epoch (what
    ``PairStream.batches`` reads; no partial batches)."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise PretrainOptionError(f"--batch-size {batch_size} is larger than the {n} usable training pairs")
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[position * batch_size:(position + 1) * batch_size]


def _has_convolutions(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != m.stride for m in module.modules())


def backbone_model_config(backbone) -> dict:
    """The open_clip model config of a loaded Backbone (what its fine-tuned folder is written with)."""
    import open_clip

    from ..models.tiny import TINY_CONFIG

    info = backbone.info
    cfg = None
    if info.source == "tiny":
        cfg = TINY_CONFIG
    elif info.source == "open_clip" and not info.name.startswith("hf-hub:"):
        cfg = open_clip.get_model_config(info.name)
    elif info.source == "local" and (Path(info.name) / "open_clip_config.json").is_file():
        cfg = json.loads((Path(info.name) / "open_clip_config.json").read_text()).get("model_cfg")
    if not isinstance(cfg, dict) or type(backbone.model).__name__ not in ("CLIP", "CustomTextCLIP"):
        raise PretrainOptionError(f"--init-model {info.name}: fine-tuning writes an open_clip folder and needs an "
                                  "open_clip model with a known config (tiny, an open_clip architecture with "
                                  "weights, or an open_clip folder); this one is "
                                  f"{info.source} {type(backbone.model).__name__}")
    cfg = json.loads(json.dumps(cfg))
    if info.quick_gelu:
        cfg["quick_gelu"] = True
    return cfg


def _check_resume(state: dict, config: PretrainConfig, path: Path) -> dict:
    """The saved identity (config, model config, start model) after checking the config repeats it."""
    try:
        identity = json.loads(state["settings"])["identity"]
        saved_identity = json.loads(identity)
        saved = PretrainConfig.from_dict(saved_identity["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CliplabError(f"{path}: not a cliplab pretrain checkpoint (an older format?); delete it to start "
                           "over") from exc
    changed = config.differences(saved)
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {getattr(saved, k)!r} -> {getattr(config, k)!r}"
                           for k in changed)
        raise PretrainOptionError(f"{path}: cannot resume with different options ({detail}); use the same "
                                  "options or another --output")
    return saved_identity


def _start_backbone(config: PretrainConfig, init, model_cfg: dict | None):
    """(the Backbone that trains, model config, the start model's id or None): a derive()d copy of the init
    model, or a fresh open_clip model from ``config.model`` wrapped so its model_id follows its weights."""
    from ..models.backbone import BackboneInfo
    from ..models.openclip import OpenClipBackbone, transform_for

    if init is None and config.init_model:
        from ..models import load_model

        init = load_model(config.init_model, device="cpu")
    if init is not None:
        cfg = backbone_model_config(init)
        working = init.derive("pretrain", trainable=True)
        if config.loss == "siglip" and getattr(working.model, "logit_bias", None) is None:
            working.model.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
            cfg["init_logit_bias"] = -10.0
        return working, cfg, init.model_id
    model = build_model(model_cfg, config.seed, config.loss)
    import open_clip

    size = _image_size(model_cfg)
    open_clip.set_model_preprocess_cfg(model, {"size": size, "mode": "RGB", "mean": OPENAI_MEAN, "std": OPENAI_STD,
                                               "interpolation": "bicubic", "resize_mode": "shortest",
                                               "fill_color": 0})
    info = BackboneInfo(name=config.model, pretrained="random", source="open_clip", quick_gelu=False,
                        random_weights=True, benchmark=(config.model, "random"))
    base = OpenClipBackbone(model, transform_for(model), build_tokenizer(model_cfg), info,
                            f"pretrain:{config.model}:seed{config.seed}")
    return base.derive("pretrain", trainable=True), model_cfg, None


def _preprocess(backbone, model_cfg: dict) -> tuple[int, tuple, tuple]:
    cfg = backbone.preprocess_config
    size = cfg.get("size", _image_size(model_cfg))
    size = int(size[0] if isinstance(size, list | tuple) else size)
    return size, tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))


def pretrain(config: PretrainConfig, output_dir: str | Path, progress: bool = True,
             callback: Callable[[int, float], None] | None = None, *, init=None) -> PretrainResult:
    """Train (or resume) a CLIP model and write an open_clip folder with a model card to ``output_dir``.

    ``init`` (a Backbone) or ``config.init_model`` (a ``load_model`` spec) fine-tunes a derived copy of that
    model instead of training ``config.model`` from random weights. ``callback(step, loss)`` runs after
    every step (tests use it to interrupt a run). One process at a time trains into a folder: a second one
    (``cliplab pretrain --recipe`` beside a command building the same recipe) is refused in one line instead of
    writing the same checkpoint.
    """
    output_dir = Path(output_dir)
    with training_lock(output_dir):
        return _pretrain(config, output_dir, progress, callback, init)


@contextmanager
def training_lock(folder: Path):
    """Hold ``.<folder>.training.lock`` beside ``folder`` while training into it; refuse if another process does."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.training.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PretrainOptionError(f"{folder} is being trained by another process: wait for it to finish (or "
                                      "stop it), then rerun to resume from its last checkpoint") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pretrain(config: PretrainConfig, output_dir: Path, progress: bool, callback, init) -> PretrainResult:
    from .export import write_model_folder

    check_box_source(config.loss, config.source)  # region objectives need a source with boxes (mosaic_source.py)
    state_path = output_dir / STATE_DIR / CHECKPOINT
    model_name, model_cfg = (config.init_model or "", None)
    if init is None and not config.init_model:
        model_name, model_cfg = resolve_model_config(config.model)
        if config.loss == "siglip":  # open_clip builds the logit bias only when the config asks for it
            model_cfg = {**model_cfg, "init_logit_bias": model_cfg.get("init_logit_bias", -10.0)}
    saved = None
    if state_path.is_file():
        saved = _check_resume(read_checkpoint(state_path), config, state_path)
        if model_cfg is not None:
            model_cfg = saved["model_cfg"]
    backbone, model_cfg, init_id = _start_backbone(config, init, model_cfg)
    if init is not None:
        model_name = init.info.name
    if saved is not None and saved.get("init_model_id") != init_id:
        raise PretrainOptionError(f"{state_path}: cannot resume from another start model "
                                  f"({saved.get('init_model_id')!r} -> {init_id!r}); use another --output")
    image_size, mean, std = _preprocess(backbone, model_cfg)
    mixed = is_mixture(config.source)  # a weighted mixture of sources (train/mixture.py)
    has_splits = mixed or bool(_source_splits(config.source))
    stream_options = {"mean": mean, "std": std}
    stream = (open_mixture if mixed else open_source)(config.source, config.split if has_splits else None, image_size,
                                                      config.templates, config.data_root, progress, **stream_options)
    eval_stream, notes = None, []
    if mixed and config.eval_split:
        notes.append("a mixture of sources trains without a held-out check (evaluate the model afterwards)")
    elif config.eval_split and has_splits:
        eval_stream = open_source(config.source, config.eval_split, image_size, config.templates, config.data_root,
                                  progress, need_captions=False, **stream_options)
        _check_disjoint(stream, eval_stream, config)
    elif config.eval_split:
        notes.append(f"{config.source} has no splits: trained on all of it, without a held-out check")
    stream.per_epoch(config.batch_size)  # refuse a batch larger than the data before anything trains
    channels_last = _has_convolutions(backbone.model.visual)
    if channels_last:  # oneDNN and cuDNN run convolutions faster in NHWC
        backbone.model.visual.to(memory_format=torch.channels_last)
    options = {k: v for k, v in config.to_dict().items() if k not in config.RESUMABLE}
    identity = json.dumps({"config": options, "model_cfg": model_cfg, "init_model_id": init_id}, sort_keys=True)
    settings = TrainSettings(
        steps=config.steps, lr=config.lr, optimizer="adamw", betas=(0.9, config.beta2), eps=config.eps,
        weight_decay=config.weight_decay, warmup_steps=config.warmup, warmup="linear", schedule="cosine",
        grad_clip=config.grad_clip, precision=config.precision, seed=config.seed, device=config.device,
        checkpoint_dir=output_dir / STATE_DIR, checkpoint_every=config.checkpoint_every,
        checkpoint_seconds=config.checkpoint_seconds, progress=progress,
        eval_every=config.eval_every if eval_stream is not None else 0, desc="pretrain", identity=identity)

    def data(epoch: int, start: int = 0):
        return stream.batches(epoch, start, seed=config.seed, batch_size=config.batch_size,
                              tokenize=backbone.tokenize, crop_scale=config.crop_scale, flip=config.flip,
                              channels_last=channels_last)

    output_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".eval-text-", dir=output_dir))
    try:
        evaluate = (lambda: held_out_metric(backbone, eval_stream, config.templates, scratch)) \
            if eval_stream is not None else None
        objective = get_objective(config.loss, **config.loss_params)
        trained = run_training(backbone, objective, data, settings, evaluate=evaluate, callback=callback)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    history = [{k: v for k, v in row.items() if k != "epoch"} for row in trained.history]
    final = {k: v for k, v in (history[-1] if history else {}).items() if k not in ("step", "seconds", "loss")}
    result = PretrainResult(output_dir, config, model_cfg, trained.steps, trained.seconds, history, final,
                            len(stream.skipped), trained.resumed_from, notes, init_id,
                            {"size": image_size, "mean": list(mean), "std": list(std)})
    backbone.to("cpu")
    write_model_folder(result, backbone.model.to(memory_format=torch.contiguous_format), model_name or config.model,
                       stream)
    return result


@torch.no_grad()
def held_out_metric(backbone, stream: PairStream, templates: str, cache_dir: Path) -> dict:
    """Zero-shot top-1 on a labelled stream (the zero-shot head), else image-to-text recall@1 over its captions
    (text embeddings through ``features.text``); image features from the backbone as it is now."""
    from ..features.text import embed_texts
    from ..heads import create_head

    features = torch.cat([backbone.encode_images(images) for _, images in stream.eval_batches()]).numpy()
    labels = stream.labels()
    if stream.class_names and (labels >= 0).any():
        head = create_head("zeroshot", backbone=backbone, class_names=stream.class_names, templates=templates,
                           cache_dir=cache_dir).fit()
        keep = labels >= 0
        return {"zeroshot_top1": float((head.logits(features[keep]).argmax(1) == labels[keep]).mean())}
    per_item = [stream.captions_of(int(i)) for i in stream.usable]
    captions = sorted({c for texts in per_item for c in texts})
    where = {c: k for k, c in enumerate(captions)}
    text = embed_texts(backbone, captions, cache_dir)
    best = (features @ text.T).argmax(1)
    return {"i2t_recall@1": float(np.mean([int(best[i]) in {where[c] for c in texts}
                                           for i, texts in enumerate(per_item)]))}


def _source_splits(source: str) -> dict[str, str]:
    from ..data import dataset_splits

    try:
        return dataset_splits(tile_source(source))  # a mosaic source has its tile dataset's splits
    except (OSError, ValueError):
        return {}


def _image_size(model_cfg: dict) -> int:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, list | tuple) else size)


def _check_disjoint(stream: PairStream, eval_stream: PairStream, config: PretrainConfig) -> None:
    shared = set(stream.item_ids) & set(eval_stream.item_ids)
    if shared:
        raise PretrainOptionError(f"--eval-split {config.eval_split!r} shares {len(shared)} items with "
                                  f"--split {config.split!r} (e.g. {sorted(shared)[0]}); a held-out check needs "
                                  "disjoint splits")
