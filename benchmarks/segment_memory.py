"""Peak memory of ``cliplab segment``'s sliding-window inference vs image size, for a fixed 224-px window.

Each image size runs in a **fresh subprocess** (peaks never carry over): the model (a random-weight ViT with
ViT-B-16's patch and window: patch 16, 224 px; 4 blocks of width 192 to keep CPU time short: memory per window is
what matters, not depth) and the text weights are set up, then ``VmHWM`` is read (baseline), one square random
image of S x S pixels is segmented at its own size (``short_side=S``: no resize) with MaskCLIP over 80 classes,
and ``VmHWM`` is read again. Reported per size: the peak over the baseline, the part of it that could be the
image's own buffers (decoded RGB 3 B/px, the normalised float32 tensor 12 B/px, the resized copy 3 B/px, the label
map 1 B/px: 19 B/px, O(image)), and the growth from the smallest size; the windows (a batch of 8 at a time), the
(C, H/16, W/16) score grid and the upsampling strips (8 MB at most) are what should not grow. Also windows and
seconds.

    python benchmarks/segment_memory.py [--quick] [--sizes 512,1024,2048,3072]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import MiB, header, load_average, log, md_table, vm_hwm_bytes, write_results

NAME = "segment_memory"
IMAGE_BYTES_PER_PIXEL = 19
CLASSES = 80


def small_vit():
    """A random open_clip ViT with ViT-B-16's patch and window (16, 224), 4 blocks of width 192."""
    import open_clip
    import torch
    from open_clip.model import CLIP

    from cliplab.models.backbone import BackboneInfo
    from cliplab.models.openclip import OpenClipBackbone, transform_for

    torch.manual_seed(0)
    model = CLIP(embed_dim=128, vision_cfg={"image_size": 224, "patch_size": 16, "width": 192, "layers": 4,
                                            "head_width": 64},
                 text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}).eval()
    open_clip.set_model_preprocess_cfg(model, {"size": 224, "mode": "RGB", "mean": open_clip.OPENAI_DATASET_MEAN,
                                               "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic",
                                               "resize_mode": "shortest", "fill_color": 0})
    info = BackboneInfo(name="vit-p16-224-w192-l4", source="benchmark", pretrained=None, random_weights=True)
    return OpenClipBackbone(model, transform_for(model), open_clip.get_tokenizer("ViT-B-16"), info, "cpu")


def child(size: int) -> dict:
    import numpy as np
    from PIL import Image

    from cliplab.dense.inference import Segmenter, SegmentSettings

    backbone = small_vit()
    names = [f"class {i}" for i in range(CLASSES)]
    segmenter = Segmenter(backbone, "maskclip", names, templates=["a photo of a {}."],
                          settings=SegmentSettings(short_side=size))
    warm = Image.fromarray(np.zeros((224, 224, 3), dtype=np.uint8))
    segmenter.segment(warm)  # first-call allocations (thread pools, kernels) belong to the baseline
    base = vm_hwm_bytes()
    image = Image.fromarray(np.random.default_rng(size).integers(0, 255, (size, size, 3), dtype=np.uint8))
    t0 = time.perf_counter()
    result = segmenter.segment(image)
    seconds = time.perf_counter() - t0
    peak = vm_hwm_bytes()
    return {"size": size, "windows": result.windows, "seconds": seconds, "baseline_bytes": base, "peak_bytes": peak,
            "over_baseline_bytes": peak - base, "image_buffers_bytes": IMAGE_BYTES_PER_PIXEL * size * size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default=None)
    parser.add_argument("--child", type=int, default=None)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return
    sizes = [int(s) for s in (args.sizes or ("512,1024" if args.quick else "512,1024,2048,3072")).split(",")]
    record = header(NAME, __doc__.splitlines()[0], args.quick)
    record["model"] = "random-weight ViT, patch 16, 224-px window, 4 blocks of width 192 (random weights)"
    record["load_before"] = load_average()
    runs = []
    for size in sizes:
        log(f"size {size}")
        out = subprocess.run([sys.executable, __file__, "--child", str(size)], capture_output=True, text=True,
                             check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        log(f"  windows {r['windows']}, {r['seconds']:.1f} s, over baseline {r['over_baseline_bytes'] / MiB:.1f} MiB")
    record["runs"] = runs
    record["load_after"] = load_average()
    first = runs[0]["over_baseline_bytes"]
    rows = [[r["size"], r["windows"], r["seconds"], r["over_baseline_bytes"] / MiB,
             (r["over_baseline_bytes"] - first) / MiB, r["image_buffers_bytes"] / MiB, r["windows"] / r["seconds"]]
            for r in runs]
    body = "\n".join([
        "# Segmentation memory vs image size (fixed 224-px window)\n",
        f"Model: {record['model']}; MaskCLIP, {CLASSES} classes, stride 112, each image at its own size. One fresh "
        "process per size; peak = VmHWM after the image minus VmHWM before it (model, text weights and a warm-up "
        "image loaded).\n",
        md_table(["side px", "windows", "seconds", "peak over baseline MiB", "growth from the smallest MiB",
                  "the image's own buffers MiB (19 B/px)", "windows/s"], rows),
        "\nThe peak grows less than the image's own buffers (decoded, resized, float tensor, labels): what the "
        "windows, the score grid and the upsampling strips use does not grow with the image. Seconds are wall time "
        "on a shared, loaded machine (see the load average).",
        f"\nLoad average before/after: {record['load_before']} / {record['load_after']}.",
    ])
    write_results(NAME + ("_quick" if args.quick else ""), record, body)


if __name__ == "__main__":
    main()
