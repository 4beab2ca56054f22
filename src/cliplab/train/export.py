"""The trained model as an open_clip folder: weights (safetensors), ``open_clip_config.json``, a model card."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save

from ..fileio import atomic_write, atomic_write_text
from ..models.moe import MOE_KEY, moe_spec
from .pairs import PairStream

if TYPE_CHECKING:
    from .loop import PretrainResult

CARD_JSON = "model_card.json"
CARD_MD = "README.md"


def open_clip_config(model_cfg: dict, image_size: int, mean=None, std=None) -> dict:
    from .loop import OPENAI_MEAN, OPENAI_STD

    preprocess = {"size": image_size, "mode": "RGB", "mean": list(mean or OPENAI_MEAN),
                  "std": list(std or OPENAI_STD), "interpolation": "bicubic", "resize_mode": "shortest",
                  "fill_color": 0}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def write_model_folder(result: PretrainResult, model: torch.nn.Module, model_name: str, bank: PairStream) -> None:
    """Write weights, config and card into ``result.output_dir``; each file atomically, weights last but one."""
    from .loop import WEIGHTS, _image_size

    out = result.output_dir
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda handle: handle.write(save(tensors)))
    pre = result.preprocess or {}
    config = open_clip_config(result.model_cfg, pre.get("size") or _image_size(result.model_cfg), pre.get("mean"),
                              pre.get("std"))
    moe = moe_spec(model)  # an upcycled CLIP-MoE model: load_model rebuilds its MoE layers from this key
    if moe:
        config[MOE_KEY] = moe
    atomic_write_text(out / "open_clip_config.json", json.dumps(config, indent=2) + "\n")
    card = model_card(result, model_name, bank)
    atomic_write_text(out / CARD_JSON, json.dumps(card, indent=2) + "\n")
    atomic_write_text(out / CARD_MD, card_markdown(card))


def model_card(result: PretrainResult, model_name: str, bank: PairStream) -> dict:
    cfg = result.config
    return {
        "model": model_name,
        "recipe_hash": cfg.recipe_hash(result.model_cfg),
        "init_model": {"spec": cfg.init_model, "model_id": result.init_model_id} if result.init_model_id else None,
        "data": {"source": cfg.source, "split": cfg.split, "pairs": len(bank), "captions": bank.caption_count,
                 "caption_source": bank.caption_source,
                 "templates": cfg.templates if bank.caption_source == "templates" else None,
                 "skipped": len(bank.skipped), "skipped_examples": [list(s) for s in bank.skipped[:10]]},
        "held_out": {"split": cfg.eval_split, **result.final_metric},
        "steps": result.steps_done,
        "samples_seen": result.steps_done * cfg.batch_size,
        "seed": cfg.seed,
        "training_seconds": round(result.seconds, 1),
        "options": cfg.to_dict(),
        "history": result.history,
        "weights_note": ("fine-tuned" if result.init_model_id else "trained") + " by cliplab pretrain on the data "
                        "above; not a general-purpose CLIP",
    }


def card_markdown(card: dict) -> str:
    data, held = card["data"], card["held_out"]
    metrics = ", ".join(f"{k} = {v:.4f}" for k, v in held.items() if isinstance(v, float)) or "not measured"
    lines = [
        f"# {card['model']} trained by cliplab pretrain",
        "",
        *([f"- fine-tuned from: {card['init_model']['spec'] or card['init_model']['model_id']}"]
          if card.get("init_model") else []),
        f"- data: {data['source']} split {data['split']}: {data['pairs']} image-caption pairs "
        f"({data['caption_source']}), {data['skipped']} skipped",
        f"- steps: {card['steps']} ({card['samples_seen']} samples), seed {card['seed']}, "
        f"{card['training_seconds']} s of training",
        f"- held-out ({held.get('split')}): {metrics}",
        f"- recipe hash: {card['recipe_hash']}",
        "",
        "Load it with `cliplab.load_model(PATH)` or `--model PATH` in any cliplab command.",
        "",
        "| step | seconds | loss | metric |",
        "|---:|---:|---:|---:|",
    ]
    for row in card["history"]:
        metric = next((v for k, v in row.items() if k not in ("step", "seconds", "loss")), float("nan"))
        lines.append(f"| {row['step']} | {row['seconds']} | {row['loss']} | {metric:.4f} |")
    return "\n".join(lines) + "\n"


