"""Seconds per epoch of issue 25's four prompt methods (CPE-CLIP, GOPro, NoLA, OSLoPrompt) on CPU (CUDA when run there).

Each method is fitted through its head on random inputs at the model's input size; one epoch's cost is the fit
with one epoch less the fit with none (what both fits share: building the learner, NoLA's pool labelling and
alignment head, the final text pass), wall and own CPU seconds, the median of ``--repeats``. What one epoch is:

- CPE-CLIP: its first session's epoch (``base_epochs``): 10 classes x ``--shots`` images, batch 4 (the authors'),
  each step through both towers with the deep prompts (vision prompts on a ViT).
- GOPro: one epoch (``max_epoch``): the same images, batch 4 (the authors'), each step the image tower on three
  views (two augmentations + AugMix) and the text tower on the prompts three times.
- NoLA: one student epoch (stage 3, ``max_epoch``): ``--pool`` unlabelled images, batch 32 with the last partial
  batch dropped (the authors'), each step the image tower with 16 VPT-shallow prompts on the strong views (no
  DINO file: the alignment head reads CLIP's features; it and the pool labelling are in both fits).
- OSLoPrompt: one epoch (``max_epoch``) on cached features (it never runs the image tower): ``--pool`` known rows
  + 8 pseudo-open rows, batch 32 (CoOp's) + a known class's share of pseudo-open rows, each step the text tower on
  the K+1 learned prompts and, with attribute cross-attention, on K attribute prompts per image.

Models: tiny and ViT-B-32, random weights (the time does not depend on them). Parts (``--models``, ``--methods``)
merge into the results with ``--merge`` (rows keyed by model and method); ``--render`` rewrites the markdown from
the JSON.

    python benchmarks/prompt_epoch_issue25.py [--models tiny,ViT-B-32:random] [--methods ...] [--merge] [--render]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS_DIR,
    CpuAccount,
    header,
    load_average,
    log,
    md_table,
    median,
    model_info,
    write_results,
)

CLASSES = [f"class {i}" for i in range(10)]
METHODS = ("cpe-clip", "gopro", "nola", "osloprompt")
EPOCH_PARAM = {"cpe-clip": "base_epochs", "gopro": "max_epoch", "nola": "max_epoch", "osloprompt": "max_epoch"}
BATCH = {"cpe-clip": 4, "gopro": 4, "nola": 32, "osloprompt": 32}
N_OPEN = 8  # OSLoPrompt's pseudo-open rows
EPOCH_IS = {
    "cpe-clip": "first session, batch 4, both towers with deep prompts",
    "gopro": "batch 4, image tower on 3 views + text tower 3x",
    "nola": "student (stage 3), batch 32 (last partial dropped), image tower with 16 VPT prompts on strong views",
    "osloprompt": f"cached features + {N_OPEN} pseudo-open, batch 32, text tower on K+1 prompts + K attribute "
                  "prompts per image",
}


def _inputs(backbone, n: int) -> tuple[np.ndarray, np.ndarray, object]:
    """(features, labels, image dataset) of ``n`` seeded random images, labels cycling over the 10 classes."""
    from cliplab.data.base import ArrayImageDataset

    size = backbone.preprocess_config.get("size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    rng = np.random.default_rng(0)
    y = np.arange(n) % len(CLASSES)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    data = ArrayImageDataset(images, y, CLASSES, Path("bench.npy"), "synthetic")
    X = rng.standard_normal((n, backbone.embed_dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, y, data


def _steps(method: str, n: int) -> int:
    if method == "nola":
        return n // BATCH[method]  # drop_last
    return -(-n // BATCH[method])


def _fit(backbone, method: str, epochs: int, X, y, data) -> dict:
    from cliplab.heads import create_head

    params = {EPOCH_PARAM[method]: epochs}
    if method == "nola":
        params.update(align_epochs=1, n_prompts=16 if _has_vit(backbone) else 0)
    head = create_head(method, backbone=backbone, class_names=CLASSES, **params)
    with CpuAccount() as cpu:
        if method == "osloprompt":
            rng = np.random.default_rng(1)
            X_open = rng.standard_normal((N_OPEN, X.shape[1])).astype(np.float32)
            head.fit(X, y, X_open=X_open / np.linalg.norm(X_open, axis=1, keepdims=True))
        else:
            head.fit(X, y, images=data)
    return cpu.result


def _has_vit(backbone) -> bool:
    try:
        backbone.image_tower()
    except Exception:  # noqa: BLE001 - a ResNet tower takes no prompts
        return False
    return True


def measure(name: str, methods: list[str], shots: int, pool: int, repeats: int, device: str) -> Iterator[dict]:
    from cliplab.models import load_model

    arch, _, pretrained = name.partition(":")
    backbone = load_model(arch, pretrained or None, device=device)
    for method in methods:
        n = shots * len(CLASSES) if method in ("cpe-clip", "gopro") else pool
        X, y, data = _inputs(backbone, n)
        walls, cpus, foreign = [], [], []
        for _ in range(repeats):
            zero, one = _fit(backbone, method, 0, X, y, data), _fit(backbone, method, 1, X, y, data)
            walls.append(one["wall_s"] - zero["wall_s"])
            cpus.append(one["own_cpu_s"] - zero["own_cpu_s"])
            foreign.append(one["foreign_load"])
        steps = _steps(method, n)
        row = {"model": name, "method": method, "device": device, "images": n, "batch": BATCH[method],
               "steps": steps, "epoch_is": EPOCH_IS[method], "repeats": repeats,
               "epoch_wall_s": round(median(walls), 3), "epoch_cpu_s": round(median(cpus), 3),
               "step_wall_s": round(median(walls) / steps, 4), "image_wall_s": round(median(walls) / n, 4),
               "walls": [round(w, 3) for w in walls], "foreign_load": round(max(foreign), 2),
               "load_average": load_average(), "model_info": model_info(backbone)}
        log(f"{name} {method}: {row['epoch_wall_s']} s/epoch wall ({row['step_wall_s']} s/step, "
            f"foreign load {row['foreign_load']})")
        yield row


def render(record: dict) -> str:
    rows = [[r["model"], r["method"], r["device"], str(r["images"]), str(r["batch"]), str(r["steps"]),
             str(r["repeats"]), f"{r['epoch_wall_s']:.2f}", f"{r['epoch_cpu_s']:.2f}", f"{r['step_wall_s']:.3f}",
             f"{1000 * r['image_wall_s']:.0f}", f"{r['foreign_load']:.2f}", r["epoch_is"]]
            for r in record["rows"]]
    return "\n".join([
        "# Seconds per epoch: CPE-CLIP, GOPro, NoLA, OSLoPrompt (random weights)", "",
        "Random inputs at the model's input size, random weights: times only. An epoch = the fit with one epoch "
        "less the fit with none (median of the repeats); what one epoch is for each method is in the last column "
        "(CPE-CLIP and GOPro: 10 classes x "
        f"{record['shots']} images; NoLA and OSLoPrompt: {record['pool']} images or feature rows). 'foreign load' = "
        "CPU seconds of other processes per wall second during the one-epoch fit (the largest of the repeats; 2 "
        "cores). Measured one method after another under the shared CPU lock.", "",
        md_table(["model", "method", "device", "images", "batch", "steps", "repeats", "epoch wall s", "epoch CPU s",
                  "wall s / step", "wall ms / image", "foreign load", "one epoch is"], rows), "",
        "OSLoPrompt trains on cached image features (its image tower never runs in training), so its epoch cost is "
        "the text tower's: (K+1) learned prompts + B x K attribute prompts per step. NoLA's epoch runs the image "
        "tower alone (the linear head on the text weights needs no text pass). CPE-CLIP and GOPro run both towers "
        "every step."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--shots", type=int, default=2, help="CPE-CLIP/GOPro images per class (10 classes)")
    parser.add_argument("--pool", type=int, default=64, help="NoLA pool images / OSLoPrompt feature rows")
    parser.add_argument("--repeats", default="2", help="repeats, one for all models or one per model (3,1)")
    parser.add_argument("--models", default="tiny,ViT-B-32:random")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--merge", action="store_true", help="keep the JSON's other rows (by model and method)")
    parser.add_argument("--render", action="store_true", help="rewrite the markdown from the JSON only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    name = "prompt_epoch_issue25" + ("_cuda" if args.device == "cuda" else "")
    path = RESULTS_DIR / f"{name}.json"
    if args.render:
        record = json.loads(path.read_text())
        write_results(name, record, render(record))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r} (one of {', '.join(METHODS)})")
    record = header(name, __doc__.strip().splitlines()[0], args.quick)
    kept, parts = [], []
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        kept = list(old.get("rows", []))
        parts = old.get("parts", [{"started": old.get("started"), "command": old.get("command")}])
    record.update(parts=[*parts, {"started": record["started"], "command": record["command"]}], shots=args.shots,
                  pool=args.pool)
    order = {m: i for i, m in enumerate(METHODS)}
    models = args.models.split(",")
    repeats = [int(r) for r in args.repeats.split(",")]
    repeats = repeats * len(models) if len(repeats) == 1 else repeats
    if len(repeats) != len(models):
        raise SystemExit("--repeats: one value, or one per model")
    for model, times in zip(models, repeats, strict=True):
        for row in measure(model, methods, args.shots, args.pool, 1 if args.quick else times, args.device):
            kept = [r for r in kept if (r["model"], r["method"]) != (row["model"], row["method"])] + [row]
            seen = list(dict.fromkeys(["tiny", *(r["model"] for r in kept)]))
            record["rows"] = sorted(kept, key=lambda r: (seen.index(r["model"]), order[r["method"]]))
            write_results(name, record, render(record))  # after every row: a part cut short keeps its rows


if __name__ == "__main__":
    main()
