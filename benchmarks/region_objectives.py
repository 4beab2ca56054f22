"""Region objectives' effect on box accuracy (issue 27, Benchmarks: "CLOC's effect on box accuracy after the same
pretraining budget"): fine-tune the signal ViT (``recipe:cifar10-vit-signal``, trained here on CIFAR-10 train with
template captions) with the same budget on the box-yielding mosaic source (CIFAR-10 *train* tiles, 2 x 2, exact
boxes) under ``clip``, ``cloc`` (region text: the class templates) and ``grain`` (region text: CuPL's CIFAR-10
descriptions), then score:

- box top-1 on CIFAR-10 *test* mosaics (2 x 2, seeded, the ``mosaic`` segmentation set): each tile's box classified
  against the 10 class prompts (CIFAR-10 templates) by its RoI feature (the patch grid of the whole mosaic at the
  model's 32 px input, ``roi_align`` pooled as the objectives pool) and by its crop (the 32 px tile embedded whole);
- whole-image zero-shot top-1 on a seeded subset of CIFAR-10 *test*.

A fine-tuning budget from the recipe, not training from scratch; the three runs see identical images, captions and
flips (the mosaic source's draws do not depend on the loss or the region text). One part per process, each under
the cpu lock (``flock /work/locks/cpu.lock nice -n 5 python benchmarks/region_objectives.py --part ...``):

    --part speed             a few steps of each loss on random cliplab-vit-32px weights (s/step; timing only)
    --part train:LOSS        fine-tune (resumes a killed run from its checkpoint)
    --part eval:NAME         NAME = start (the recipe itself) or a trained LOSS
    --render                 rewrite the markdown from the JSON
    (parts may be comma-separated: run in order, the results written after each)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from _common import DATA_ROOT, RESULTS_DIR, built_model, header, log, md_table, write_results

NAME = "region_objectives"
MODEL = "recipe:cifar10-vit-signal"
DESCRIPTIONS = Path("/work/shared/descriptions/cupl/full_prompts/cifar10_prompts_full.json")
SOURCES = {"clip": "mosaic", "cloc": "mosaic", "grain": f"mosaic:descriptions={DESCRIPTIONS}"}
RUNS = Path.home() / ".cache" / "cliplab" / "bench" / NAME
TEMPLATES = "cifar10"


def _settings(args) -> dict:
    return {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "seed": 0,
            "templates": TEMPLATES, "crop_scale": 1.0, "data_root": str(DATA_ROOT)}


def _load_record() -> dict:
    path = RESULTS_DIR / f"{NAME}.json"
    if NAME != "region_objectives" and not path.is_file():
        return {}
    return json.loads(path.read_text()) if path.is_file() else {}


def _start_model():
    return built_model(MODEL, held_label="val zero-shot", after="", random_note="random weights")


def _config(loss: str, args, init_spec: str | None):
    from cliplab.train import PretrainConfig

    return PretrainConfig(source=SOURCES[loss], loss=loss, eval_split=None, init_model=init_spec,
                          checkpoint_every=10, checkpoint_seconds=120.0, **_settings(args))


def part_speed(args) -> dict:
    """s/step of each loss for a few steps on random cliplab-vit-32px weights (same architecture as the recipe)."""
    from cliplab.train import PretrainConfig, pretrain

    out = {}
    for loss in SOURCES:
        folder = RUNS / f"speed-{loss}"
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        config = PretrainConfig(source=SOURCES[loss], model="cliplab-vit-32px", loss=loss, eval_split=None,
                                steps=args.speed_steps, batch_size=args.batch_size, lr=args.lr, warmup=1,
                                templates=TEMPLATES, checkpoint_every=10_000, data_root=str(DATA_ROOT))
        wall, cpu = time.perf_counter(), time.process_time()
        result = pretrain(config, folder, progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        out[loss] = {"steps": result.steps_done, "train_s_per_step": result.seconds / result.steps_done,
                     "wall_s": wall, "cpu_s": cpu}
        log(f"speed {loss}: {out[loss]}")
    return {"model": "cliplab-vit-32px (random weights: timing only)", "batch_size": args.batch_size,
            "losses": out}


def part_train(loss: str, args) -> dict:
    from cliplab.train import pretrain

    backbone, note = _start_model()
    folder = RUNS / f"{loss}-s{args.steps}-b{args.batch_size}-lr{args.lr:g}"
    config = _config(loss, args, str(backbone.info.name))
    wall, cpu = time.perf_counter(), time.process_time()
    losses: list[float] = []
    result = pretrain(config, folder, progress=False, init=backbone, callback=lambda s, v: losses.append(v))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    last = result.history[-1] if result.history else {}
    log(f"train {loss}: {result.steps_done} steps in {result.seconds:.0f} s")
    return {"folder": str(folder), "source": config.source, "steps": result.steps_done,
            "resumed_from": result.resumed_from, "train_seconds": result.seconds, "wall_s": wall, "cpu_s": cpu,
            "first_losses": losses[:3], "last_losses": losses[-3:], "last_logs": last, "start_note": note}


@torch.no_grad()
def box_and_image_top1(backbone, mosaics: int, test_images: int) -> dict:
    from cliplab.data import load_dataset
    from cliplab.data.segmentation import MosaicSpec, load_segmentation
    from cliplab.features.text import class_weights
    from cliplab.regions.scoring import embed_boxes
    from cliplab.train.objectives_region import image_and_grid, pool_regions

    data = load_segmentation("mosaic", DATA_ROOT, "test", mosaic=MosaicSpec(count=mosaics, k=2, seed=0))
    weights = torch.from_numpy(class_weights(backbone, data.class_names, TEMPLATES)).float()  # (d, C)
    k, t = data.spec.k, data.tile_size
    tiles = np.array([[c * t, r * t, t, t] for r in range(k) for c in range(k)], dtype=np.float64)
    model = backbone.model.eval()
    size = backbone.preprocess_config.get("size", 32)
    size = int(size[0] if isinstance(size, list | tuple) else size)
    edges = np.arange(k + 1) * size / k
    grid_boxes = torch.tensor([[edges[c], edges[r], edges[c + 1], edges[r + 1]] for r in range(k) for c in range(k)],
                              dtype=torch.float32)
    start, cpu = time.perf_counter(), time.process_time()
    roi_pred, crop_pred, truth = [], [], []
    for lo in range(0, mosaics, 50):
        idx = range(lo, min(lo + 50, mosaics))
        images = [data.load_image(i).convert("RGB") for i in idx]
        batch = torch.stack([backbone.preprocess(im) for im in images])
        _, grid = image_and_grid(model, batch)
        boxes = torch.cat([torch.cat([torch.full((k * k, 1), float(j)), grid_boxes], 1) for j in range(len(images))])
        pooled = pool_regions(grid.float(), boxes, size / grid.shape[-1], (2, 2))
        regions = torch.nn.functional.normalize(pooled, dim=-1)
        roi_pred.append((regions @ weights).argmax(1).numpy())
        crops = np.concatenate([embed_boxes(backbone, im, tiles) for im in images])
        crop_pred.append((torch.from_numpy(crops) @ weights).argmax(1).numpy())
        truth.append(np.concatenate([data.tile_labels[i].ravel() for i in idx]))
    box_wall, box_cpu = time.perf_counter() - start, time.process_time() - cpu
    y = np.concatenate(truth)
    test = load_dataset("cifar10", root=DATA_ROOT, split="test")
    pick = np.sort(np.random.default_rng(0).choice(len(test), size=min(test_images, len(test)), replace=False))
    start, cpu = time.perf_counter(), time.process_time()
    correct = 0
    for lo in range(0, len(pick), 250):
        rows = pick[lo:lo + 250]
        batch = torch.stack([backbone.preprocess(test.load_image(int(i)).convert("RGB")) for i in rows])
        pred = (backbone.encode_images(batch) @ weights).argmax(1).numpy()
        correct += int((pred == np.asarray(test.labels)[rows]).sum())
    return {"mosaics": mosaics, "boxes": int(len(y)), "box_top1_roi": float((np.concatenate(roi_pred) == y).mean()),
            "box_top1_crop": float((np.concatenate(crop_pred) == y).mean()), "box_wall_s": box_wall,
            "box_cpu_s": box_cpu, "test_images": int(len(pick)), "zeroshot_top1": correct / len(pick),
            "zeroshot_wall_s": time.perf_counter() - start, "zeroshot_cpu_s": time.process_time() - cpu}


def part_eval(name: str, args, record: dict) -> dict:
    from cliplab.models import load_model

    if name == "start":
        backbone, note = _start_model()
    else:
        folder = record.get("train", {}).get(name, {}).get("folder")
        if not folder:
            raise SystemExit(f"no trained {name} run recorded: run --part train:{name} first")
        backbone, note = load_model(folder), f"fine-tuned from {MODEL} with {name}"
    log(f"eval {name}")
    out = box_and_image_top1(backbone, args.mosaics, args.test_images)
    log(f"eval {name}: {out}")
    return dict(out, weights=note, model_id=backbone.model_id)


def render(record: dict) -> str:
    s = record.get("settings", {})
    parts = ["# Region objectives: CLOC's and GRAIN's effect on box accuracy at the same fine-tuning budget",
             "",
             f"Model: `{MODEL}` (a 32-px ViT, patch 4, 6 blocks, trained here by the cliplab recipe on CIFAR-10 train "
             "with template captions), **fine-tuned** (not from scratch) on the mosaic source (2 x 2 CIFAR-10 *train* "
             f"tiles, exact boxes; captions name the tiles) for {s.get('steps')} steps at batch {s.get('batch_size')}, "
             f"lr {s.get('lr')}, warmup {s.get('warmup')}, cosine, flips only, seed 0: the same images, captions and "
             "flips for every loss. `cloc`: region text = a CIFAR-10 template with the tile's class; `grain`: one of "
             "CuPL's CIFAR-10 descriptions of the tile's class (drawn per batch). Scores on CIFAR-10 *test*: box top-1 "
             "over 10 classes (CIFAR-10 templates) of each tile of seeded 2 x 2 test mosaics, by RoI feature (patch "
             "grid of the mosaic at the 32 px input, tiles 16 px) and by crop (the 32 px tile embedded whole); "
             "whole-image zero-shot top-1 on a seeded subset of CIFAR-10 test."]
    rows = []
    for name in ("start", "clip", "cloc", "grain"):
        ev = record.get("eval", {}).get(name)
        tr = record.get("train", {}).get(name, {})
        if ev is None:
            continue
        label = "recipe (no fine-tuning)" if name == "start" else {"clip": "clip", "cloc": "clip + cloc",
                                                                    "grain": "clip + grain"}[name]
        rows.append([label, f"{100 * ev['box_top1_roi']:.1f}", f"{100 * ev['box_top1_crop']:.1f}",
                     f"{100 * ev['zeroshot_top1']:.1f}", f"{tr['train_seconds']:.0f}" if tr else "-",
                     f"{tr['cpu_s']:.0f}" if tr else "-"])
    if rows:
        first = next(iter(record["eval"].values()))
        parts += ["", md_table(["model", f"box top-1 RoI ({first['boxes']} boxes), %", "box top-1 crop, %",
                                f"zero-shot top-1 ({first['test_images']} test images), %", "training wall s",
                                "training CPU s"], rows)]
    speed = record.get("speed")
    if speed:
        parts += ["", f"## Speed ({speed['model']}, batch {speed['batch_size']})", "",
                  md_table(["loss", "steps", "s / step"],
                           [[k, v["steps"], v["train_s_per_step"]] for k, v in speed["losses"].items()])]
    if record.get("notes"):
        parts += ["", "## Notes", ""] + [f"- {n}" for n in record["notes"]]
    return "\n".join(parts)


def main() -> None:
    global MODEL, NAME, RUNS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default=None)
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--speed-steps", type=int, default=4)
    parser.add_argument("--mosaics", type=int, default=250)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument("--model", default=MODEL, help="start model (default the signal ViT; others: smoke tests)")
    parser.add_argument("--name", default=NAME, help="results name (smoke tests: another name)")
    args = parser.parse_args()
    MODEL, NAME = args.model, args.name
    RUNS = RUNS.parent / NAME
    record = _load_record() or header(NAME, "region objectives (clip / cloc / grain) fine-tuning the signal ViT on "
                                            "mosaics: box and whole-image top-1 on CIFAR-10 test", False)
    record.setdefault("notes", [])
    record["notes"] += [n for n in args.note if n not in record["notes"]]
    if not args.part and not args.render:
        parser.error("give --part speed|train:LOSS|eval:NAME (comma-separated: run in order) or --render")
    for part in (args.part or "").split(","):
        if part == "speed":
            record["speed"] = part_speed(args)
        elif part.startswith("train:"):
            loss = part.split(":", 1)[1]
            record["settings"] = _settings(args)
            record.setdefault("train", {})[loss] = part_train(loss, args)
        elif part.startswith("eval:"):
            name = part.split(":", 1)[1]
            record.setdefault("eval", {})[name] = part_eval(name, args, record)
        elif part:
            parser.error(f"unknown part {part!r}")
        write_results(NAME, record, render(record))


if __name__ == "__main__":
    main()
