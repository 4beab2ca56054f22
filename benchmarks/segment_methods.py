"""mIoU, pixel accuracy and seconds per image of every registered segmentation method on mosaic and coco_mini_seg.

Models: the mosaic rows use ``recipe:cifar10-vit-signal`` (a 32-px ViT, patch 4, trained here on CIFAR-10 train
with template captions) when it is built (never built here), else a **random-weight** ViT of that architecture
(``cliplab-vit-32px``: patch 4, 32 px, 6 blocks of width 192), whose mIoU is chance level and says nothing about
which method helps; ``--model SPEC`` picks another (``recipe:cifar10-signal``, the trained 32-px ResNet: MaskCLIP's
RN value path, one 32-px cell per CIFAR tile, so 32-px windows every 32 px; with ``--name`` its results go to
their own files). coco_mini_seg runs open_clip ViT-B-16 with **random weights**:
pipeline timing only (short side 448, 224-px windows every 112 px, as CLIP-DINOiser's COCO setting), on the first
``--coco-images`` images of the 159. Methods run with their defaults (dinoiser: guidance from CLIP's own layer -3
tokens, no DINO weights are available here), except ReCo's collection: on mosaic ``--collection-size`` CIFAR-10
*train* images drawn with seed 0 and written as PNG files (labels never read; the test tiles come from CIFAR-10
test), k = 50, the authors' context categories; on coco_mini_seg the 242 unlabelled coco_mini images (the
evaluated ones among them: timing only) with k = 2 (its set-up, retrieval and co-segmentation of 81 class names and 5
context categories, is the ``setup s`` column). ``+ GKC synonyms`` rows replace the text weights by GKC's synonym
classifier with the hand-written ``benchmarks/cifar10_synonyms.json`` (3-4 common synonyms per CIFAR-10 class; no
COCO synonym file here, so no such rows on coco_mini_seg).

    python benchmarks/segment_methods.py [--quick] [--mosaic-images 200] [--coco-images 3] [--model SPEC]
        [--methods maskclip,dinoiser,reco] [--synonyms-methods maskclip,dinoiser,reco] [--skip-coco] [--reuse]
        [--name segment_methods_signal]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import BENCH_DIR, DATA_ROOT, RESULTS_DIR, header, load_average, log, md_table, write_results

NAME = "segment_methods"
VIT_RECIPE = "cifar10-vit-signal"
SYNONYMS = BENCH_DIR / "cifar10_synonyms.json"
COCO_COLLECTION = DATA_ROOT / "coco_mini" / "images"


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


def mosaic_model(spec: str | None):
    """(backbone, label): ``spec``, else the ViT recipe when it is built (never built here), else random weights."""
    from cliplab.models import load_model

    if spec and not spec.startswith("recipe:"):
        return load_model(spec, device="cpu"), spec
    from cliplab.errors import CliplabError
    from cliplab.train.recipes import recipe_model

    name = spec.split(":", 1)[1] if spec else VIT_RECIPE
    try:
        folder = recipe_model(name, DATA_ROOT, build=False)
    except CliplabError:
        if spec:
            raise
        log(f"recipe:{VIT_RECIPE} is not built: the mosaic rows use random weights")
        return vit_32px(), "cliplab-vit-32px (random weights)"
    backbone = load_model(str(folder))
    backbone.display_name = f"recipe:{name}"
    return backbone, f"recipe:{name}"


def cifar_collection(count: int, seed: int = 0) -> Path:
    """``count`` CIFAR-10 train images drawn with ``seed``, written once as PNG files (ReCo's unlabelled collection:
    no label is written or read)."""
    import numpy as np

    from cliplab.data import load_dataset

    folder = Path.home() / ".cache" / "cliplab" / "bench" / f"reco-cifar10-train-{count}-seed{seed}"
    if (folder / ".complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    train = load_dataset("cifar10", root=DATA_ROOT, split="train")
    for i in np.random.default_rng(seed).choice(len(train), size=min(count, len(train)), replace=False):
        train.load_image(int(i)).save(folder / f"{int(i):05d}.png")
    (folder / ".complete").write_text("done\n")
    return folder


def run(backbone, dataset, method: str, limit: int, out, reuse: bool = False, params: dict | None = None,
        synonyms: dict | None = None) -> dict:
    from cliplab.eval.segmentation import evaluate_segmentation

    t0 = time.perf_counter()
    saved = out / f"segment_{method}_{dataset.name}_{dataset.split}{'_synonyms' if synonyms else ''}.json"
    record = json.loads(saved.read_text()) if reuse and saved.is_file() else None
    if record is not None and (record["items"] != min(limit, len(dataset)) or record["model"] != backbone.display_name
                               or any(record["params"].get(k) != v for k, v in (params or {}).items())):
        log(f"  {saved.name} was made with other settings: run again")
        record = None
    if record is None:  # else a finished run of an interrupted benchmark, with the same settings
        record = evaluate_segmentation(backbone, dataset, method, params=params, limit=limit, output_dir=out,
                                       grid_items=3, synonyms=synonyms).record
    return {"method": method + (" + GKC synonyms" if synonyms else ""), "dataset": dataset.name,
            "split": dataset.split, "items": record["items"], "params": record["params"],
            "model": backbone.display_name, "weights": record["weights"], "mIoU": record["mIoU"],
            "mAcc": record["mAcc"], "aAcc": record["aAcc"], "s_per_image": record["timing"]["s_per_image"],
            "cpu_s": record["timing"]["cpu_s"], "windows": record["timing"]["windows"],
            "setup_s": record["timing"]["setup_s"], "window": record["settings"]["window"],
            "stride": record["settings"]["stride"], "total_wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mosaic-images", type=int, default=200)
    parser.add_argument("--coco-images", type=int, default=3)
    parser.add_argument("--model", default=None, help="a model for the mosaic rows, ViT or open_clip ResNet "
                        f"(default: recipe:{VIT_RECIPE} when built, else a random 32-px ViT)")
    parser.add_argument("--name", default=NAME, help="results name: NAME.json/.md and NAME_files/ (another model's "
                        "rows in files of their own)")
    parser.add_argument("--model-label", default=None, help="the name the mosaic model goes by in the tables (e.g. "
                        "for a snapshot folder of a recipe build)")
    parser.add_argument("--note", default=None, help="what the mosaic model is, for the markdown (replaces the "
                        "recipe's note)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
    parser.add_argument("--synonyms-methods", default=None, help="methods also run with GKC's synonym classifier "
                        "on mosaic (default: the same as --methods; '' for none)")
    parser.add_argument("--collection-size", type=int, default=2000, help="CIFAR-10 train images in ReCo's "
                        "mosaic collection")
    parser.add_argument("--skip-coco", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="read the per-run JSON of runs an interrupted "
                        "benchmark finished instead of running them again")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: on a shared, loaded "
                        "machine two threads stalled each other: 22 s wall vs 0.4 s for 6 mosaic images)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.mosaic_images, args.coco_images, args.collection_size = 20, 1, 300
    from cliplab.data.segmentation import load_segmentation
    from cliplab.dense.gkc import load_synonyms
    from cliplab.dense.registry import list_dense

    out = RESULTS_DIR / f"{args.name}_files"
    record = header(args.name, __doc__.splitlines()[0], args.quick)
    record["load_before"] = load_average()
    record["torch_threads"] = args.threads
    methods = args.methods.split(",") if args.methods else [e.name for e in list_dense()]
    with_synonyms = methods if args.synonyms_methods is None else [m for m in args.synonyms_methods.split(",") if m]
    rows = []
    model, label = mosaic_model(args.model)
    if args.model_label:
        model.display_name = label = args.model_label
    record["mosaic_model"] = label
    record["note"] = args.note
    mosaic = load_segmentation("mosaic", DATA_ROOT, "test")
    synonyms, _ = load_synonyms(mosaic.class_names, SYNONYMS)
    record["synonyms"] = synonyms
    collection = cifar_collection(args.collection_size) if "reco" in methods + with_synonyms else None
    mosaic_params = {"reco": {"collection": str(collection)}}
    for method, extra in [(m, None) for m in methods] + [(m, synonyms) for m in with_synonyms]:
        log(f"mosaic {method}{' + synonyms' if extra else ''}")
        rows.append(run(model, mosaic, method, args.mosaic_images, out, args.reuse, mosaic_params.get(method),
                        extra))
        log(f"  mIoU {rows[-1]['mIoU']:.4f}, {rows[-1]['s_per_image']:.3f} s/image, set-up {rows[-1]['setup_s']:.1f} s")
    if not args.skip_coco:
        from cliplab.models import load_model

        coco_model = load_model("ViT-B-16:random")
        coco = load_segmentation("coco_mini_seg", DATA_ROOT, "all")
        coco_params = {"reco": {"collection": str(COCO_COLLECTION), "k": 2}}
        for method in methods:
            log(f"coco_mini_seg {method}")
            rows.append(run(coco_model, coco, method, args.coco_images, out, args.reuse, coco_params.get(method)))
            log(f"  {rows[-1]['s_per_image']:.2f} s/image, set-up {rows[-1]['setup_s']:.1f} s")
    record["runs"] = rows
    record["load_after"] = load_average()
    table = md_table(["set", "method", "model", "weights", "images", "mIoU %", "pixel acc %", "s/image",
                      "setup s", "windows"],
                     [[r["dataset"] + " " + r["split"], r["method"], r["model"], r["weights"], r["items"],
                       100 * r["mIoU"], 100 * r["aAcc"], r["s_per_image"], r["setup_s"], r["windows"]]
                      for r in rows])
    signal = not label.endswith("(random weights)")
    mosaic_run = next((r for r in rows if r["dataset"] == "mosaic"), None)
    window, stride = (mosaic_run["window"][0], mosaic_run["stride"]) if mosaic_run else (32, 16)
    body = "\n".join([
        "# Segmentation methods: mIoU and seconds per image\n",
        f"mosaic: 2 x 2 CIFAR-10 test tiles (64 px, each image at its own size, {window}-px windows every {stride} "
        f"px), CIFAR-10 templates, model {label}"
        + ((f" ({args.note})" if args.note else " (trained here on CIFAR-10 train with template captions: weights "
            "that carry signal, but a small model that has seen these classes, not a general CLIP)") if signal else
           " (**random weights**: the mIoU is chance level and compares nothing"
           + (f"; recipe:{VIT_RECIPE} was not built when this ran" if args.model is None else "") + ")")
        + f". ReCo retrieves from {args.collection_size} unlabelled CIFAR-10 train images (k = 50, the authors' "
        "context categories tree, sky, building, road, person). GKC synonyms: benchmarks/cifar10_synonyms.json "
        "(hand-written). "
        + ("" if args.skip_coco else "coco_mini_seg: COCO-Object maps (background + 80 classes, background scored as "
           "a class name), 80 ImageNet templates, short side 448, 224-px windows every 112 px, open_clip ViT-B-16 "
           "with **random weights**: timing only; ReCo there retrieves k = 2 from the 242 coco_mini images. ")
        + "`setup s`: building the "
        "method once (text weights; ReCo's retrieval and co-segmentation). Seconds are this shared 2-core CPU's "
        f"(torch threads: {args.threads}; load average before/after {record['load_before']} / "
        f"{record['load_after']}).\n",
        table,
    ])
    write_results(args.name + ("_quick" if args.quick else ""), record, body)


if __name__ == "__main__":
    main()
