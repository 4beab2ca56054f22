"""How the CIFAR-10 recipe was chosen: train candidate configs and report held-out (val) zero-shot top-1.

Tuning uses the validation split (a 10% hold-out of the train images); the test split is never read.
``--speed`` instead times training steps on this machine's CPU (threads as given), to turn accuracy per
step into accuracy per minute of CPU time. Run on a GPU for the accuracy grid:

    python scripts/pretrain_sweep.py --data-root DIR --device cuda --jobs 8 --out sweep.json
    python scripts/pretrain_sweep.py --data-root DIR --speed --threads 2 --out speed.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

TEXT = {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}
ARCHS = {
    "vit-w128-l6": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 6, "head_width": 32},
    "vit-w192-l6-m2": {"image_size": 32, "patch_size": 4, "width": 192, "layers": 6, "head_width": 64,
                       "mlp_ratio": 2.0},
    "vit-w256-l6": {"image_size": 32, "patch_size": 4, "width": 256, "layers": 6, "head_width": 64},
    "vit-w192-l4": {"image_size": 32, "patch_size": 4, "width": 192, "layers": 4, "head_width": 64},
    "rn-2222-w32": {"image_size": 32, "layers": [2, 2, 2, 2], "width": 32},
    "rn-1111-w48": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 48},
    "rn-2222-w48": {"image_size": 32, "layers": [2, 2, 2, 2], "width": 48},
}


def model_file(arch: str, folder: Path) -> str:
    path = folder / f"{arch}.json"
    path.write_text(json.dumps({"embed_dim": 256, "vision_cfg": ARCHS[arch], "text_cfg": TEXT}))
    return str(path)


def run_one(job: dict) -> dict:
    import torch

    from cliplab.train import PretrainConfig, pretrain

    torch.set_num_threads(job.pop("threads", 2))
    arch = job.pop("arch")
    with tempfile.TemporaryDirectory() as tmp:
        config = PretrainConfig(model=model_file(arch, Path(tmp)), **job)
        began = time.perf_counter()
        result = pretrain(config, Path(tmp) / "out", progress=False)
        return {"arch": arch, **job, "seconds": time.perf_counter() - began, "history": result.history}


def time_steps(arch: str, data_root: str, batch_size: int, threads: int, steps: int = 6) -> dict:
    import torch

    from cliplab.train import pretrain
    from cliplab.train.config import PretrainConfig

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        config = PretrainConfig(source="cifar10", model=model_file(arch, Path(tmp)), data_root=data_root,
                                batch_size=batch_size, steps=steps, eval_split=None)
        times, last = [], [time.perf_counter()]

        def tick(step, loss):  # time between steps (the first one includes the setup, dropped below)
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        pretrain(config, Path(tmp) / "out", progress=False, callback=tick)
    best = sorted(times[1:])[len(times[1:]) // 2]
    return {"arch": arch, "batch_size": batch_size, "threads": threads, "median_step_s": best,
            "samples_per_s": batch_size / best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--steps", default="1500,3000,6000")
    parser.add_argument("--lrs", default="1e-3")
    parser.add_argument("--batch-sizes", default="128")
    parser.add_argument("--crop-scales", default="0.5")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    archs = args.archs.split(",")
    results = []
    if args.speed:
        for arch, batch in itertools.product(archs, map(int, args.batch_sizes.split(","))):
            results.append(time_steps(arch, args.data_root, batch, args.threads))
            print(json.dumps(results[-1]), flush=True)
    else:
        jobs = [{"arch": a, "source": "cifar10", "data_root": args.data_root, "device": args.device,
                 "steps": s, "lr": lr, "batch_size": b, "crop_scale": c, "warmup": min(500, s // 10),
                 "eval_every": max(1, s // 6), "checkpoint_every": s, "threads": args.threads}
                for a, s, lr, b, c in itertools.product(
                    archs, map(int, args.steps.split(",")), map(float, args.lrs.split(",")),
                    map(int, args.batch_sizes.split(",")), map(float, args.crop_scales.split(",")))]
        jobs.sort(key=lambda j: -j["steps"])
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_one, dict(job)) for job in jobs]
            for future in as_completed(futures):
                try:
                    row = future.result()
                except Exception as exc:  # one failed config does not end the sweep
                    row = {"error": repr(exc)}
                results.append(row)
                final = row.get("history", [{}])[-1] if row.get("history") else {}
                print(json.dumps({k: v for k, v in row.items() if k != "history"} | final), flush=True)
                Path(args.out).write_text(json.dumps(results, indent=1))
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
