"""Sliding-window throughput of every segmentation method at 512 and 1024 px (open_clip ViT-B-16, random weights).

**Random weights: timing only** (the labels mean nothing). One square image (seeded noise: the window count, not the
content, sets the work) resized so its side is 512 or 1024 px, 224-px windows every 112 px (the pipeline's default
half-window stride; 16 and 81 windows), ``--window-batch`` windows per forward pass, 10 class names, 7 ImageNet
templates. Methods with their defaults: MaskCLIP; CLIP-DINOiser with guidance from CLIP's own layer -3 tokens (a
second pass through the first blocks); ReCo (set-up: retrieval of k = 2 from ``--collection`` coco_mini images and
co-segmentation, timed apart); DenseCLIP at initialisation; OVSeg (MaskCLIP's regions re-encoded as masked crops,
lambda 0.7). GKC's synonyms only change the text weights (no per-window cost), so they have no rows. Each method is
set up once and run once untimed on a 224-px image first; then the timed image. Wall and CPU seconds of the
process (CPU above wall means two threads were busy), windows per second of wall.

Parts (each under ~8 min wall through the CPU lock): ``--sizes 512`` and ``--sizes 1024`` write their rows into the
same JSON (rows of the same method and size replaced), and the markdown is rewritten from all rows.

    flock /work/locks/cpu.lock nice -n 5 python benchmarks/segment_throughput.py [--sizes 512,1024]
        [--methods maskclip,dinoiser,reco,denseclip,ovseg] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from _common import DATA_ROOT, RESULTS_DIR, header, load_average, log, md_table, write_results

NAME = "segment_throughput"
MODEL = "ViT-B-16:random"
CLASSES = ["person", "car", "dog", "cat", "bicycle", "bus", "bird", "chair", "tree", "sky"]
METHODS = ("maskclip", "dinoiser", "reco", "denseclip", "ovseg")


def collection_folder(count: int) -> Path:
    """The first ``count`` coco_mini images (sorted names), copied once (ReCo's unlabelled collection)."""
    folder = Path.home() / ".cache" / "cliplab" / "bench" / f"reco-coco-mini-{count}"
    if not (folder / ".complete").is_file() or not any(folder.glob("*.jpg")):
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted((DATA_ROOT / "coco_mini" / "images").rglob("*.jpg"), key=lambda p: p.name)[:count]:
            shutil.copy(path, folder / path.name)
        (folder / ".complete").write_text("done\n")
    return folder


def time_method(backbone, method: str, sizes: list[int], params: dict | None, window_batch: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    from cliplab.dense.inference import Segmenter, SegmentSettings

    noise = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    rows = []
    for size in sizes:
        settings = SegmentSettings(short_side=size, window_batch=window_batch)
        t0, c0 = time.perf_counter(), time.process_time()
        segmenter = Segmenter(backbone, method, CLASSES, templates="imagenet7", params=params, settings=settings)
        setup_wall, setup_cpu = time.perf_counter() - t0, time.process_time() - c0
        segmenter.segment(Image.fromarray(noise[:224, :224]))  # untimed warm-up
        image = Image.fromarray(noise).resize((size, size), Image.BICUBIC)
        t0, c0 = time.perf_counter(), time.process_time()
        result = segmenter.segment(image)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append({"method": method, "size": size, "input": list(result.input_size), "windows": result.windows,
                     "wall_s": wall, "cpu_s": cpu, "windows_per_s": result.windows / wall,
                     "s_per_window": wall / result.windows, "setup_wall_s": setup_wall, "setup_cpu_s": setup_cpu,
                     "stride": segmenter.stride})
        log(f"  {method} {size}px: {result.windows} windows, {wall:.1f} s wall, {cpu:.1f} CPU-s, "
            f"{result.windows / wall:.2f} windows/s")
    return rows


def render(record: dict) -> str:
    rows = sorted(record["runs"], key=lambda r: (r["size"], METHODS.index(r["method"])
                                                 if r["method"] in METHODS else 99))
    table = md_table(["side px", "method", "windows", "s/image (wall)", "CPU s", "windows/s", "s/window",
                      "set-up s (wall)"],
                     [[r["size"], r["method"], r["windows"], r["wall_s"], r["cpu_s"], r["windows_per_s"],
                       r["s_per_window"], r["setup_wall_s"]] for r in rows])
    missing = [m for m in METHODS if m not in {r["method"] for r in rows}]
    parts = "; ".join(f"{p['sizes']} px: threads {p['threads']}, load average before/after {p['load_before']} / "
                      f"{p['load_after']}" for p in record.get("parts", []))
    return "\n".join([
        "# Sliding-window throughput of the segmentation methods (ViT-B-16, **random weights**: timing only)\n",
        f"One square image resized to each side, 224-px windows every 112 px (16 windows at 512 px, 81 at 1024), "
        f"{record['window_batch']} windows per forward pass, 10 class names x 7 templates, open_clip ViT-B-16 with "
        "random weights (the labels mean nothing). dinoiser: guidance from CLIP's own layer -3 tokens; reco: k = 2 "
        f"from {record['collection']} coco_mini images (its retrieval and co-segmentation are in the set-up column); "
        "denseclip at initialisation; ovseg: MaskCLIP's regions re-encoded as masked crops, lambda 0.7. GKC's "
        "synonyms change only the text weights (no per-window cost). Wall and CPU seconds of this shared 2-core "
        f"machine ({parts}).\n",
        table,
    ] + ([f"\nNot run yet (rerun with --methods {','.join(missing)}): {', '.join(missing)}."] if missing else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--collection", type=int, default=12, help="coco_mini images in ReCo's collection")
    parser.add_argument("--window-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render", action="store_true", help="rewrite the markdown from the JSON only")
    args = parser.parse_args()
    name = NAME + ("_quick" if args.quick else "")
    saved = RESULTS_DIR / f"{name}.json"
    previous = json.loads(saved.read_text()) if saved.is_file() else None
    if args.render:
        write_results(name, previous, render(previous))
        return
    import torch

    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.collection = [256], 4
    from cliplab.models import load_model

    backbone = load_model(MODEL)
    record = header(NAME, __doc__.splitlines()[0], args.quick)
    part = {"sizes": sizes, "threads": args.threads, "load_before": load_average()}
    methods = args.methods.split(",")
    rows = []
    for method in methods:
        params = {"collection": str(collection_folder(args.collection)), "k": 2} if method == "reco" else None
        log(method)
        rows += time_method(backbone, method, sizes, params, args.window_batch)
    part["load_after"] = load_average()
    done = {(r["method"], r["size"]) for r in rows}
    kept = [r for r in (previous or {}).get("runs", []) if (r["method"], r["size"]) not in done]
    record["runs"] = kept + rows
    record["parts"] = (previous or {}).get("parts", []) + [part]
    record.update(model=MODEL, window_batch=args.window_batch, collection=args.collection, classes=CLASSES)
    write_results(name, record, render(record))


if __name__ == "__main__":
    main()
