"""``pretrain``: CLIP's contrastive training of an open_clip model on image-caption pairs, resumable.

The recipe follows open_clip's training code (open_clip_train/main.py, train.py, scheduler.py):
``ClipLoss`` (or ``SigLipLoss``), AdamW without weight decay on gains, biases and the logit scale,
linear warmup then cosine decay, gradient-norm clipping, the logit scale clamped to ln(100) after each
step. Departures: captions that occur several times in a batch are encoded once and gathered (the
loss and its gradients are the same; template captions repeat a lot); images are decoded once into
a uint8 bank and augmented on tensors; data order and augmentation are drawn from generators seeded
by (seed, epoch) and (seed, step), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import CliplabError
from ..fileio import atomic_write
from .augment import random_resized_crop, to_model_input
from .config import PretrainConfig, PretrainOptionError, resolve_model_config
from .pairs import PairBank, load_bank

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


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on 1-d parameters, biases, norms and the logit scale/bias."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def learning_rate(step: int, config: PretrainConfig) -> float:
    """open_clip's ``cosine_lr``: linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to 0."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * config.lr


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """The items of ``step``: consecutive slices of one seeded permutation per epoch (no partial batches)."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise PretrainOptionError(f"--batch-size {batch_size} is larger than the {n} usable training pairs")
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[position * batch_size:(position + 1) * batch_size]


def _has_convolutions(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != m.stride for m in module.modules())


def _loss_fn(name: str):
    from open_clip.loss import ClipLoss, SigLipLoss

    return SigLipLoss() if name == "siglip" else ClipLoss()


class _Trainer:
    def __init__(self, config: PretrainConfig, model_cfg: dict, bank: PairBank, device: torch.device):
        self.config, self.model_cfg, self.bank, self.device = config, model_cfg, bank, device
        self.model = build_model(model_cfg, config.seed, config.loss).to(device)
        self.tokenizer = build_tokenizer(model_cfg)
        self.tokens = self.tokenizer(bank.captions)
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, config.weight_decay), lr=config.lr,
                                           betas=(0.9, config.beta2), eps=config.eps, fused=True)
        self.channels_last = _has_convolutions(self.model.visual)
        if self.channels_last:  # oneDNN and cuDNN run convolutions faster in NHWC
            self.model.visual.to(memory_format=torch.channels_last)
        self.loss = _loss_fn(config.loss)
        self.mean = torch.tensor(OPENAI_MEAN, device=device)
        self.std = torch.tensor(OPENAI_STD, device=device)
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    def step(self, step: int) -> float:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        items = batch_indices(step, len(self.bank), cfg.batch_size, cfg.seed)
        draws = torch.rand(len(items), generator=generator).tolist()
        choice = [ids[int(u * len(ids))] for u, ids in zip(draws, (self.bank.caption_ids[i] for i in items))]
        unique, inverse = np.unique(np.asarray(choice), return_inverse=True)
        images = to_model_input(self.bank.images[torch.from_numpy(items)].to(self.device), self.mean, self.std)
        images = random_resized_crop(images, generator, cfg.crop_scale, flip=cfg.flip)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        self.model.train()
        with torch.autocast(**self.autocast):
            image_features = self.model.encode_image(images, normalize=True)
            text_features = self.model.encode_text(self.tokens[torch.from_numpy(unique)].to(self.device),
                                                   normalize=True)
        text_features = text_features.float()[torch.from_numpy(inverse).to(self.device)]
        image_features = image_features.float()
        scale = self.model.logit_scale.exp()
        if cfg.loss == "siglip":
            loss = self.loss(image_features, text_features, scale, self.model.logit_bias)
        else:
            loss = self.loss(image_features, text_features, scale)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise CliplabError(f"training diverged at step {step} (loss {value}); lower --lr or raise --warmup")
        return value

    @torch.no_grad()
    def evaluate(self, bank: PairBank, templates: str) -> dict:
        """Zero-shot top-1 on a labelled bank, else image-to-text recall@1 over its captions."""
        from ..data.prompts import fill_template, load_templates

        self.model.eval()
        features = []
        with torch.autocast(**self.autocast):
            for start in range(0, len(bank), 256):
                x = to_model_input(bank.images[start:start + 256].to(self.device), self.mean, self.std)
                features.append(self.model.encode_image(x, normalize=True).float())
            image_features = torch.cat(features)
            if bank.class_names and (bank.labels >= 0).any():
                texts = load_templates(templates)
                weights = []
                for name in bank.class_names:
                    t = self.tokenizer([fill_template(tt, name) for tt in texts]).to(self.device)
                    emb = self.model.encode_text(t, normalize=True).float().mean(0)
                    weights.append(emb / emb.norm())
                logits = image_features @ torch.stack(weights).T
                keep = torch.from_numpy(bank.labels >= 0)
                hits = logits.argmax(1).cpu()[keep] == torch.from_numpy(bank.labels)[keep]
                return {"zeroshot_top1": float(hits.float().mean())}
            text = self.model.encode_text(self.tokenizer(bank.captions).to(self.device), normalize=True).float()
        best = (image_features @ text.T).argmax(1).cpu().numpy()
        hits = [int(best[i]) in set(ids) for i, ids in enumerate(bank.caption_ids)]
        return {"i2t_recall@1": float(np.mean(hits))}

    def state(self, step: int, history: list[dict], seconds: float) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                "config": json.dumps(self.config.to_dict()), "model_cfg": json.dumps(self.model_cfg),
                "history": json.dumps(history), "seconds": seconds}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def _save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint, read without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for damaged files
        raise CliplabError(f"{path}: unreadable training checkpoint ({str(exc).splitlines()[0]}); "
                           "delete it to start over") from exc


def _check_resume(state: dict, config: PretrainConfig, path: Path) -> None:
    saved = PretrainConfig.from_dict(json.loads(state["config"]))
    changed = config.differences(saved)
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {getattr(saved, k)!r} -> {getattr(config, k)!r}"
                           for k in changed)
        raise PretrainOptionError(f"{path}: cannot resume with different options ({detail}); use the same "
                                  "options or another --output")


def pretrain(config: PretrainConfig, output_dir: str | Path, progress: bool = True,
             callback: Callable[[int, float], None] | None = None) -> PretrainResult:
    """Train (or resume) a CLIP model and write an open_clip folder with a model card to ``output_dir``.

    ``callback(step, loss)`` runs after every step (tests use it to interrupt a run).
    """
    from .export import write_model_folder

    output_dir = Path(output_dir)
    model_name, model_cfg = resolve_model_config(config.model)
    if config.loss == "siglip":  # open_clip builds the logit bias only when the config asks for it
        model_cfg = {**model_cfg, "init_logit_bias": model_cfg.get("init_logit_bias", -10.0)}
    image_size = _image_size(model_cfg)
    device = torch.device(config.device)
    state_path = output_dir / STATE_DIR / CHECKPOINT
    state = read_checkpoint(state_path) if state_path.is_file() else None
    if state is not None:
        _check_resume(state, config, state_path)
        model_cfg = json.loads(state["model_cfg"])
    has_splits = bool(_source_splits(config.source))
    bank = load_bank(config.source, config.split if has_splits else None, image_size, config.templates,
                     config.data_root, progress)
    eval_bank, notes = None, []
    if config.eval_split and has_splits:
        eval_bank = load_bank(config.source, config.eval_split, image_size, config.templates, config.data_root,
                              progress, need_captions=False)
        _check_disjoint(bank, eval_bank, config)
    elif config.eval_split:
        notes.append(f"{config.source} has no splits: trained on all of it, without a held-out check")
    trainer = _Trainer(config, model_cfg, bank, device)
    start, history, seconds = 0, [], 0.0
    if state is not None:
        trainer.load(state)
        start, history, seconds = int(state["step"]), json.loads(state["history"]), float(state["seconds"])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / STATE_DIR).mkdir(exist_ok=True)
    began = time.perf_counter() - seconds
    bar = tqdm(total=config.steps, initial=start, desc="pretrain", disable=not progress, unit="step")
    last_loss = float("nan")
    for step in range(start, config.steps):
        last_loss = trainer.step(step)
        done = step + 1
        record = None
        if eval_bank is not None and (done % config.eval_every == 0 or done == config.steps):
            record = {"step": done, "seconds": round(time.perf_counter() - began, 2), "loss": round(last_loss, 4),
                      **trainer.evaluate(eval_bank, config.templates)}
            history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{learning_rate(step, config):.2e}",
                        **({k: f"{v:.3f}" for k, v in record.items() if k not in ("step", "seconds", "loss")}
                           if record else {}))
        if done % config.checkpoint_every == 0 or done == config.steps:
            _save_checkpoint(state_path, trainer.state(done, history, time.perf_counter() - began))
        if callback is not None:
            callback(done, last_loss)
    bar.close()
    seconds = time.perf_counter() - began
    final = {k: v for k, v in (history[-1] if history else {}).items() if k not in ("step", "seconds", "loss")}
    result = PretrainResult(output_dir, config, model_cfg, config.steps, seconds, history, final,
                            len(bank.skipped), start, notes)
    write_model_folder(result, trainer.model, model_name, bank)
    return result


def _source_splits(source: str) -> dict[str, str]:
    from ..data import dataset_splits

    try:
        return dataset_splits(source)
    except (OSError, ValueError):
        return {}


def _image_size(model_cfg: dict) -> int:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, list | tuple) else size)


def _check_disjoint(bank: PairBank, eval_bank: PairBank, config: PretrainConfig) -> None:
    shared = set(bank.item_ids) & set(eval_bank.item_ids)
    if shared:
        raise PretrainOptionError(f"--eval-split {config.eval_split!r} shares {len(shared)} items with "
                                  f"--split {config.split!r} (e.g. {sorted(shared)[0]}); a held-out check needs "
                                  "disjoint splits")

