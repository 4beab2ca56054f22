"""mIoU, pixel accuracy and seconds per image of every registered segmentation method on mosaic and coco_mini_seg.

Models: no ViT recipe is built here yet (``recipe:cifar10-vit-signal`` is defined, not trained), so the mosaic rows
use a **random-weight** ViT of that recipe's architecture (``cliplab-vit-32px``: patch 4, 32 px, 6 blocks of width
192): their mIoU is chance level and says nothing about which method helps; with ``--model recipe:...`` a built
ViT recipe replaces it. coco_mini_seg runs open_clip ViT-B-16 with **random weights**: pipeline timing only
(short side 448, 224-px windows every 112 px, as CLIP-DINOiser's COCO setting), on the first ``--coco-images``
images of the 159. Every method runs with its defaults (dinoiser: guidance from CLIP's own layer -3 tokens, no DINO
weights are available here).

    python benchmarks/segment_methods.py [--quick] [--mosaic-images 200] [--coco-images 20] [--model SPEC]
"""

from __future__ import annotations

import argparse
import json
import time

from _common import DATA_ROOT, RESULTS_DIR, header, load_average, log, md_table, write_results

NAME = "segment_methods"


def vit_32px():
    """A random open_clip model of the cliplab-vit-32px architecture (the ViT recipe's), as a Backbone."""
    import open_clip
    import torch
    from open_clip.model import CLIP

    from cliplab.models.backbone import BackboneInfo
    from cliplab.models.openclip import OpenClipBackbone, transform_for
    from cliplab.train.config import resolve_model_config

    _, cfg = resolve_model_config("cliplab-vit-32px")
    torch.manual_seed(0)
    model = CLIP(**cfg).eval()
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mode": "RGB", "mean": open_clip.OPENAI_DATASET_MEAN,
                                               "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic",
                                               "resize_mode": "shortest", "fill_color": 0})
    info = BackboneInfo(name="cliplab-vit-32px (random weights)", source="benchmark", pretrained=None,
                        random_weights=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=cfg["text_cfg"]["context_length"])
    return OpenClipBackbone(model, transform_for(model), tokenizer, info, "cpu")


def run(backbone, dataset, method: str, limit: int, out, reuse: bool = False) -> dict:
    from cliplab.eval.segmentation import evaluate_segmentation

    t0 = time.perf_counter()
    saved = out / f"segment_{method}_{dataset.name}_{dataset.split}.json"
    if reuse and saved.is_file():  # a finished run of an interrupted benchmark (same settings: checked)
        record = json.loads(saved.read_text())
        if record["items"] != min(limit, len(dataset)) or record["model"] != backbone.display_name:
            raise SystemExit(f"{saved} was made with other settings; rerun without --reuse")
    else:
        record = evaluate_segmentation(backbone, dataset, method, limit=limit, output_dir=out, grid_items=3).record
    return {"method": method, "dataset": dataset.name, "split": dataset.split, "items": record["items"],
            "model": backbone.display_name, "weights": record["weights"], "mIoU": record["mIoU"],
            "mAcc": record["mAcc"], "aAcc": record["aAcc"], "s_per_image": record["timing"]["s_per_image"],
            "cpu_s": record["timing"]["cpu_s"], "windows": record["timing"]["windows"],
            "setup_s": record["timing"]["setup_s"], "total_wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mosaic-images", type=int, default=200)
    parser.add_argument("--coco-images", type=int, default=20)
    parser.add_argument("--model", default=None, help="a ViT model for the mosaic rows (default: random 32-px ViT)")
    parser.add_argument("--reuse", action="store_true", help="read the per-run JSON of runs an interrupted "
                        "benchmark finished instead of running them again")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: on a shared, loaded "
                        "machine two threads stalled each other: 22 s wall vs 0.4 s for 6 mosaic images)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.mosaic_images, args.coco_images = 20, 2
    from cliplab.data.segmentation import load_segmentation
    from cliplab.dense.registry import list_dense
    from cliplab.models import load_model

    out = RESULTS_DIR / "segment_methods_files"
    record = header(NAME, __doc__.splitlines()[0], args.quick)
    record["load_before"] = load_average()
    record["torch_threads"] = args.threads
    methods = [e.name for e in list_dense()]
    rows = []
    mosaic_model = load_model(args.model) if args.model else vit_32px()
    mosaic = load_segmentation("mosaic", DATA_ROOT, "test")
    for method in methods:
        log(f"mosaic {method}")
        rows.append(run(mosaic_model, mosaic, method, args.mosaic_images, out, args.reuse))
        log(f"  mIoU {rows[-1]['mIoU']:.4f}, {rows[-1]['s_per_image']:.3f} s/image")
    coco_model = load_model("ViT-B-16:random")
    coco = load_segmentation("coco_mini_seg", DATA_ROOT, "all")
    for method in methods:
        log(f"coco_mini_seg {method}")
        rows.append(run(coco_model, coco, method, args.coco_images, out, args.reuse))
        log(f"  {rows[-1]['s_per_image']:.2f} s/image")
    record["runs"] = rows
    record["load_after"] = load_average()
    table = md_table(["set", "method", "model", "weights", "images", "mIoU %", "pixel acc %", "s/image",
                      "windows"],
                     [[r["dataset"] + " " + r["split"], r["method"], r["model"], r["weights"], r["items"],
                       100 * r["mIoU"], 100 * r["aAcc"], r["s_per_image"], r["windows"]] for r in rows])
    body = "\n".join([
        "# Segmentation methods: mIoU and seconds per image\n",
        "mosaic: 2 x 2 CIFAR-10 test tiles (64 px, each image at its own size, 32-px windows every 16 px), CIFAR-10 "
        "templates. coco_mini_seg: COCO-Object maps (background + 80 classes, background scored as a class name), "
        "80 ImageNet templates, short side 448, 224-px windows every 112 px. **All weights are random**: the mIoU "
        "columns are chance level and compare nothing; the seconds are the pipeline's cost on this shared CPU "
        f"(torch threads: {args.threads}; load average before/after {record['load_before']} / "
        f"{record['load_after']}).\n",
        table,
    ])
    write_results(NAME + ("_quick" if args.quick else ""), record, body)


if __name__ == "__main__":
    main()
