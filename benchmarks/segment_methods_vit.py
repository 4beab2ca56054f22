"""Every segmentation method on the mosaic set with the signal-carrying 32-px ViT (recipe:cifar10-vit-signal).

Model: ``recipe:cifar10-vit-signal`` (open_clip ViT, patch 4, 32 px, an 8x8 grid per 32-px window, 6 blocks; trained
here on CIFAR-10 train with template captions; loaded, never built, by this script: it refuses to run without it).
Set: the first ``--test-images`` mosaic test images (2 x 2 CIFAR-10 *test* tiles, 64 px, each image at its own size:
a 16x16 patch grid, 32-px windows every 16 px), CIFAR-10 templates. This is where patch-level methods can differ:
each tile has 8x8 patches of its own.

Rows: MaskCLIP; CLIP-DINOiser with guidance from the ViT's own layer -3 tokens (no DINO here); CLIP-DINOiser with
the trained 3x3 conv (``conv=FILE``), fitted on ``--conv-images`` unlabelled CIFAR-10 *train* images to mimic the
ViT's own last-block keys (the stand-in for DINO's keys: no self-supervised ViT is available here), with the
background conv off (the mosaic has no background pixels); ReCo (``--collection-size`` unlabelled CIFAR-10 train
images, k = 50); DenseCLIP at initialisation (plain prompts, gamma 1e-4) and trained briefly (``--train-images``
mosaics of CIFAR-10 *train* tiles, seed 1, ``--epochs`` epochs, CLIP frozen); OVSeg with MaskCLIP as segmenter
(lambda 0.7, no mask prompt); and GKC's synonym classifier (benchmarks/cifar10_synonyms.json) on MaskCLIP,
DINOiser and ReCo.

Background conv (``cliplab dinoiser-train --background``: FOUND on the ViT's own last block, the documented
stand-in): every mosaic pixel is an object, so every patch it marks is a false background. Measured on the 32-px
tiles of the test mosaics as windows: FOUND's background fraction, the conv's not-foreground fraction, and the
fraction the authors' rule marks (best class probability below 0.99 and not foreground).

    flock /work/locks/cpu.lock nice -n 5 python benchmarks/segment_methods_vit.py [--quick] [--test-images 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import BENCH_DIR, DATA_ROOT, RESULTS_DIR, header, load_average, log, md_table, write_results

NAME = "segment_methods_vit_signal"
RECIPE = "recipe:cifar10-vit-signal"
SYNONYMS = BENCH_DIR / "cifar10_synonyms.json"


def evaluate(backbone, dataset, method: str, limit: int, out: Path, params=None, synonyms=None) -> dict:
    from cliplab.eval.segmentation import evaluate_segmentation

    record = evaluate_segmentation(backbone, dataset, method, params=params, limit=limit, output_dir=out,
                                   grid_items=3, synonyms=synonyms).record
    return {"items": record["items"], "mIoU": record["mIoU"], "mAcc": record["mAcc"], "aAcc": record["aAcc"],
            "s_per_image": record["timing"]["s_per_image"], "cpu_s": record["timing"]["cpu_s"],
            "setup_s": record["timing"]["setup_s"], "windows": record["timing"]["windows"],
            "window": record["settings"]["window"], "stride": record["settings"]["stride"]}


class OwnKeys:
    """The ViT's own last-block keys as a guidance encoder (heads concatenated): the stand-in for DINO's keys."""

    def __init__(self, tower):
        self.tower = tower

    def __call__(self, images):
        from cliplab.dense.found import tower_attention_keys

        keys = tower_attention_keys(self.tower, images)[1]  # (n, heads, d, h, w)
        return keys.reshape(keys.shape[0], -1, *keys.shape[-2:])


def train_convs(backbone, files: list[str], steps: int, folder: str) -> tuple[str, dict]:
    """The 3x3 correlation conv (mimicking the ViT's own keys) and the background conv (FOUND on its last block)."""
    from cliplab.dense.dinoiser_train import save_guidance_conv, train_background_conv, train_guidance_conv
    from cliplab.models.dense import dense_tower

    t0, c0 = time.perf_counter(), time.process_time()
    conv = train_guidance_conv(backbone, OwnKeys(dense_tower(backbone)), files, steps=steps, progress=False)
    t1, c1 = time.perf_counter(), time.process_time()
    bkg = train_background_conv(backbone, files, steps=steps, progress=False)
    t2, c2 = time.perf_counter(), time.process_time()
    path = save_guidance_conv(conv, Path(folder) / "dinoiser_convs.safetensors", backbone, background=bkg)
    return str(path), {"images": len(files), "steps": steps, "conv_wall_s": t1 - t0, "conv_cpu_s": c1 - c0,
                       "background_wall_s": t2 - t1, "background_cpu_s": c2 - c1}


def background_rates(backbone, dataset, limit: int, conv_file: str) -> dict:
    """On the 32-px tiles of the first ``limit`` mosaics: FOUND's background fraction (the ViT's last block), the
    background conv's not-foreground fraction, and the fraction the authors' rule marks (all false backgrounds)."""
    import torch

    from cliplab.dense.base import DenseContext
    from cliplab.dense.dinoiser_train import clip_intermediate, load_dinoiser_convs
    from cliplab.dense.found import FoundBackground
    from cliplab.dense.registry import create_dense
    from cliplab.features.text import class_weights
    from cliplab.models.dense import dense_tower

    tower = dense_tower(backbone)
    _, bkg = load_dinoiser_convs(conv_file, backbone)
    weights = torch.from_numpy(class_weights(backbone, dataset.class_names, "cifar10"))
    plain = create_dense("dinoiser", conv=conv_file, background=False)
    plain.setup(DenseContext(backbone, dataset.class_names, weights, tower, None))
    found = FoundBackground(tower=tower)
    totals = {"found": 0.0, "not_foreground": 0.0, "marked": 0.0, "patches": 0}
    with torch.no_grad():
        for index in range(min(limit, len(dataset))):
            image = dataset.load_image(index).convert("RGB")
            tiles = torch.stack([backbone.preprocess(image.crop((x, y, x + 32, y + 32)))
                                 for y in range(0, image.height, 32) for x in range(0, image.width, 32)]).float()
            scores = plain.patch_scores(tiles)
            not_fg = torch.sigmoid(bkg(clip_intermediate(tower, tiles, bkg.layer))) <= 0.5
            marked = (scores.max(dim=1, keepdim=True).values < 0.99) & not_fg
            totals["found"] += float(found(tiles).sum())
            totals["not_foreground"] += float(not_fg.sum())
            totals["marked"] += float(marked.sum())
            totals["patches"] += int(not_fg.numel())
    return {k: (v / totals["patches"] if k != "patches" else v) for k, v in totals.items()}


ROWS = ("maskclip", "dinoiser", "dinoiser_conv", "reco", "denseclip_init", "denseclip_trained", "ovseg",
        "maskclip_syn", "dinoiser_syn", "reco_syn")


def render(record: dict) -> str:
    rows = sorted(record["runs"], key=lambda r: ROWS.index(r["key"]))
    table = md_table(["method", "images", "mIoU %", "pixel acc %", "s/image", "CPU s", "setup s", "windows",
                      "train s (wall / CPU)"],
                     [[r["row"], r["items"], 100 * r["mIoU"], 100 * r["aAcc"], r["s_per_image"], r["cpu_s"],
                       r["setup_s"], r["windows"],
                       f"{r['train_wall_s']:.0f} / {r['train_cpu_s']:.0f}" if "train_wall_s" in r else ""]
                      for r in rows])
    s, label = record["settings"], record["model"]
    b, c = record.get("background"), record.get("convs")
    signal = not label.endswith("(random weights)")
    window, stride = rows[0]["window"], rows[0]["stride"]
    window = window[0] if isinstance(window, list) else window
    parts = "; ".join(f"{', '.join(p['rows'])}: load average before/after {p['load_before']} / {p['load_after']}"
                      for p in record["parts"])
    lines = [
        f"# Segmentation methods on the mosaic set with {label}\n",
        f"Set: the first {rows[0]['items']} mosaic test images (2 x 2 CIFAR-10 *test* tiles, 64 px, each at its own "
        f"size: 16 x 16 patches, {window}-px windows every {stride} px, 8 x 8 patches per window). Model {label}"
        + (" (a 32-px ViT, patch 4, trained here on CIFAR-10 train with template captions: it carries signal but "
           "has seen these classes; not a general CLIP)" if signal else " (**random weights**: chance level)")
        + ". CIFAR-10 templates. DINOiser's guidance is the ViT itself (no DINO weights here): its layer -3 tokens, "
        + (f"or the 3x3 conv trained on {c['images']} unlabelled CIFAR-10 train images ({c['steps']} steps, "
           f"{c['conv_cpu_s']:.0f} CPU-s) to mimic the ViT's own last-block keys, its background conv off (no "
           "background in the mosaic). " if c else "")
        + f"ReCo: {s['collection_size']} unlabelled CIFAR-10 train images, k = 50. "
        f"DenseCLIP trained on {s['train_images']} mosaics of CIFAR-10 train tiles (seed 1), {s['epochs']} epochs, "
        "CLIP frozen. OVSeg: MaskCLIP's regions classified on masked crops, lambda 0.7, no mask prompt. GKC: "
        "benchmarks/cifar10_synonyms.json (hand-written). The RN recipe's table is segment_methods_signal.md. "
        "`s/image`: wall seconds per image; `CPU s`: process CPU seconds for all the images; `setup s`: building the "
        "method once (text weights; ReCo's retrieval and co-segmentation). This shared 2-core CPU, torch threads "
        f"{s['threads']} ({parts}).\n",
        table,
    ]
    missing = [k for k in ROWS if k not in {r["key"] for r in rows}]
    if missing:
        lines += ["", f"Not run yet (rerun with --rows {','.join(missing)}): {', '.join(missing)}."]
    if b:
        lines += [
            "",
            "## The background conv on an all-object set",
            "",
            f"Trained ({c['steps']} steps, {c['background_cpu_s']:.0f} CPU-s) against 1 - FOUND's background, FOUND "
            "run on the ViT's own last block (the stand-in for a DINO). On the 32-px tiles of the test mosaics (every "
            f"pixel is an object): FOUND marks {100 * b['found']:.1f}% of the patches background, the conv calls "
            f"{100 * b['not_foreground']:.1f}% not foreground, and the authors' rule (best class probability < 0.99 "
            f"and not foreground) would mark {100 * b['marked']:.1f}%: all false backgrounds, which is why the "
            "authors apply it only on sets with a background class.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--train-images", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--conv-images", type=int, default=1000)
    parser.add_argument("--conv-steps", type=int, default=300)
    parser.add_argument("--collection-size", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default=",".join(ROWS), help="rows to run (parts: the others are kept from the "
                        "JSON); " + ", ".join(ROWS))
    parser.add_argument("--render", action="store_true", help="rewrite the markdown from the JSON only")
    parser.add_argument("--model", default=RECIPE, help="the model (default the ViT recipe; a random 32-px ViT with "
                        "'random' for a dry run)")
    args = parser.parse_args()
    name = NAME + ("_quick" if args.quick else "")
    saved = RESULTS_DIR / f"{name}.json"
    previous = json.loads(saved.read_text()) if saved.is_file() else None
    if args.render:
        write_results(name, previous, render(previous))
        return
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.test_images, args.train_images, args.epochs = 3, 8, 1
        args.conv_images, args.conv_steps, args.collection_size = 20, 5, 300
    from cliplab.data.segmentation import MosaicSpec, load_segmentation
    from cliplab.dense.denseclip import train_denseclip
    from cliplab.dense.gkc import load_synonyms
    from segment_methods import cifar_collection, mosaic_model, vit_32px

    wanted = args.rows.split(",")
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if args.model == "random":
        backbone, label = vit_32px(), "cliplab-vit-32px (random weights)"
    else:
        backbone, label = mosaic_model(args.model)
    if previous and (previous["model"] != label or previous["settings"]["test_images"] != args.test_images):
        previous = None  # another model or set: start afresh
    out = RESULTS_DIR / f"{name}_files"
    record = header(NAME, __doc__.splitlines()[0], args.quick)
    part = {"rows": wanted, "load_before": load_average()}
    settings = {k: v for k, v in vars(args).items() if k not in ("rows", "render")}
    record["settings"] = settings
    record["model"] = label
    test = load_segmentation("mosaic", DATA_ROOT, "test")
    synonyms, _ = load_synonyms(test.class_names, SYNONYMS)
    collection = cifar_collection(args.collection_size)
    rows = []
    plain_runs = {
        "maskclip": ("maskclip", None, None, "maskclip"),
        "dinoiser": ("dinoiser", None, None, "dinoiser, guidance: the ViT's own layer -3 tokens"),
        "reco": ("reco", {"collection": str(collection)}, None, "reco"),
        "denseclip_init": ("denseclip", None, None, "denseclip at init (plain prompts)"),
        "ovseg": ("ovseg", None, None, "ovseg (maskclip regions, lambda 0.7)"),
        "maskclip_syn": ("maskclip", None, synonyms, "maskclip + GKC synonyms"),
        "dinoiser_syn": ("dinoiser", None, synonyms, "dinoiser (own layer -3) + GKC synonyms"),
        "reco_syn": ("reco", {"collection": str(collection)}, synonyms, "reco + GKC synonyms"),
    }
    for key in [k for k in ROWS if k in wanted and k in plain_runs]:
        method, params, syn, row = plain_runs[key]
        log(row)
        result = evaluate(backbone, test, method, args.test_images, out / key, params, syn)
        rows.append(dict(result, key=key, method=method, row=row))
        log(f"  mIoU {100 * result['mIoU']:.1f}%, {result['s_per_image']:.3f} s/image, {result['cpu_s']:.1f} CPU-s")
    if "dinoiser_conv" in wanted:
        files = sorted(str(p) for p in Path(cifar_collection(max(args.conv_images, 300))).glob("*.png"))
        files = files[:args.conv_images]
        with tempfile.TemporaryDirectory() as folder:
            log(f"training the dinoiser convs on {len(files)} unlabelled CIFAR-10 train images")
            conv_file, record["convs"] = train_convs(backbone, files, args.conv_steps, folder)
            log(f"  {record['convs']}")
            result = evaluate(backbone, test, "dinoiser", args.test_images, out / "dinoiser_conv",
                              {"conv": conv_file, "background": False})
            result["params"] = {"conv": "(trained here)", "background": False}
            rows.append(dict(result, key="dinoiser_conv", method="dinoiser",
                             row="dinoiser, trained 3x3 conv (mimics the ViT's own last-block keys)"))
            log(f"  mIoU {100 * result['mIoU']:.1f}%, {result['s_per_image']:.3f} s/image")
            log("background conv rates on the test tiles")
            record["background"] = background_rates(backbone, test, args.test_images, conv_file)
            log(f"  {record['background']}")
    if "denseclip_trained" in wanted:
        train = load_segmentation("mosaic", DATA_ROOT, "train", mosaic=MosaicSpec(count=args.train_images, seed=1))
        with tempfile.TemporaryDirectory() as folder:
            log(f"training denseclip on {len(train)} mosaic train images, {args.epochs} epochs")
            t0, c0 = time.perf_counter(), time.process_time()
            _, summary = train_denseclip(backbone, train, folder, epochs=args.epochs, batch_size=32, lr=1e-3, seed=0)
            train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0
            result = evaluate(backbone, test, "denseclip", args.test_images, out / "denseclip_trained",
                              {"weights": folder})
            result["params"] = {"weights": "(trained here)"}
            rows.append(dict(result, key="denseclip_trained", method="denseclip",
                             row=f"denseclip trained ({args.train_images} mosaic train images, {args.epochs} epochs)",
                             train_wall_s=train_wall, train_cpu_s=train_cpu, train_steps=summary["steps"],
                             train_loss=summary["loss"]))
            log(f"  mIoU {100 * result['mIoU']:.1f}%, {result['s_per_image']:.3f} s/image, trained {train_wall:.0f} s")
    part["load_after"] = load_average()
    if previous:
        for extra in ("convs", "background"):
            if extra not in record and extra in previous:
                record[extra] = previous[extra]
    done = {r["key"] for r in rows}
    record["runs"] = [r for r in (previous or {}).get("runs", []) if r["key"] not in done] + rows
    record["parts"] = (previous or {}).get("parts", []) + [part]
    write_results(name, record, render(record))


if __name__ == "__main__":
    main()
