"""Seconds per epoch of CPE-CLIP and GOPro (issue 25) on CPU, and on CUDA when run on a machine that has it.

Each method is fitted through its head on 10 classes x ``--shots`` random images at the model's input size (both
train through the image tower: CPE-CLIP's vision prompts, GOPro's per-layer statistics of three views). One
epoch's cost is the fit with one epoch less the fit with none (building the learner and the final text pass), wall
and own CPU seconds, the median of ``--repeats``; CPE-CLIP's epoch is its first session's (``base_epochs``). Models:
tiny and ViT-B-32, random weights (the time does not depend on them). Batch 4 for both (the authors' configs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CpuAccount, header, load_average, log, md_table, median, model_info, write_results  # noqa: E402
from cliplab.data.base import ArrayImageDataset  # noqa: E402
from cliplab.heads import create_head  # noqa: E402
from cliplab.models import load_model  # noqa: E402

CLASSES = [f"class {i}" for i in range(10)]
EPOCH_PARAM = {"cpe-clip": "base_epochs", "gopro": "max_epoch"}


def _data(backbone, shots: int) -> tuple[np.ndarray, np.ndarray, ArrayImageDataset]:
    size = backbone.preprocess_config.get("size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(len(CLASSES)), shots)
    images = rng.integers(0, 256, size=(len(y), size, size, 3), dtype=np.uint8)
    data = ArrayImageDataset(images, y, CLASSES, Path("bench.npy"), "synthetic")
    X = np.zeros((len(y), backbone.embed_dim), np.float32)
    X[:, 0] = 1
    return X, y, data


def _fit_seconds(backbone, method: str, epochs: int, X, y, data) -> dict:
    head = create_head(method, backbone=backbone, class_names=CLASSES, **{EPOCH_PARAM[method]: epochs})
    with CpuAccount() as cpu:
        head.fit(X, y, images=data)
    return cpu.result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default="tiny,ViT-B-32:random")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows, records = [], []
    for name in args.models.split(","):
        arch, _, pretrained = name.partition(":")
        backbone = load_model(arch, pretrained or None, device=args.device)
        X, y, data = _data(backbone, args.shots)
        for method in ("cpe-clip", "gopro"):
            walls, cpus = [], []
            for _ in range(1 if args.quick else args.repeats):
                zero, one = _fit_seconds(backbone, method, 0, X, y, data), _fit_seconds(backbone, method, 1, X, y, data)
                walls.append(one["wall_s"] - zero["wall_s"])
                cpus.append(one["own_cpu_s"] - zero["own_cpu_s"])
            steps = -(-len(y) // 4)
            record = {"model": name, "method": method, "device": args.device, "images": len(y), "steps": steps,
                      "epoch_wall_s": round(median(walls), 2), "epoch_cpu_s": round(median(cpus), 2),
                      "step_wall_s": round(median(walls) / steps, 3), "load_average": load_average(),
                      "model_info": model_info(backbone)}
            log(f"{name} {method}: {record['epoch_wall_s']} s/epoch wall ({record['step_wall_s']} s/step)")
            records.append(record)
            rows.append([name, method, args.device, str(len(y)), str(steps), f"{record['epoch_wall_s']:.2f}",
                         f"{record['epoch_cpu_s']:.2f}", f"{record['step_wall_s']:.3f}"])
    record = header("prompt_epoch_issue25", __doc__.strip().splitlines()[0], args.quick)
    record.update(rows=records, shots=args.shots)
    body = "\n".join([
        "# Seconds per epoch: CPE-CLIP and GOPro (random weights)", "",
        f"10 classes x {args.shots} random images, batch 4; an epoch = the fit with one epoch less the fit with none "
        "(median of the repeats). Random weights: times only.", "",
        md_table(["model", "method", "device", "images", "steps", "epoch wall s", "epoch CPU s", "wall s / step"],
                 rows)])
    write_results("prompt_epoch_issue25" + ("_cuda" if args.device == "cuda" else ""), record, body)


if __name__ == "__main__":
    main()
