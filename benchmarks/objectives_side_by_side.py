"""Pretraining objectives side by side at one small budget (issue 29): CLIP, SigLIP, MLCD from random weights,
CLIP-MoE upcycled from the CLIP run, CLIP-Refine as a post-step, and a ViT pair CLIP vs LightCLIP.

RN rows: ``cliplab-rn-32px`` from random weights (seed 0) trained by ``cliplab.train.pretrain`` on CIFAR-10 train with
the cifar10 template captions at the mixture sweep's budget (``--steps`` x ``--batch-size``, lr 2e-3, warm-up a tenth
of the steps; ``benchmarks/mixture_sweep.py``: its CIFAR-10 run IS the CLIP row, reused, not retrained), each
objective with its default parameters. CLIP-MoE: ``cliplab moe-upcycle`` of the CLIP run (``train/moe_upcycle.py``:
4 experts, top-2, each copy ``--moe-steps`` MLP-only steps on the hard-pair clusters of a 512-pair pool, then
``--moe-steps`` routing steps); the RN's image tower is a ResNet, so only the text tower's block MLPs become experts.
CLIP-Refine: ``--refine-steps`` steps of ``clip-refine`` (RaFA + HyCD, lr 1e-5) on the CLIP run.

LightCLIP needs a ViT (token-level OT on patch tokens): the ViT pair fine-tunes the finished
``recipe:cifar10-vit-signal`` (1,600 steps of batch 256) for ``--vit-steps`` steps at lr 1e-4 (no warm-up) with
``clip`` and with ``lightclip`` (its defaults: soft labels, token OT, no MLM), from the same start and data order.

Columns: CIFAR-10 zero-shot top-1 on ``--eval`` seeded test images (cifar10 templates); Fashion-MNIST linear probe
top-1 (scikit-learn logistic regression, C=1, on L2-normalised image features of ``--probe`` seeded train images,
scored on ``--probe`` seeded test images; the models never saw Fashion-MNIST); coco_mini retrieval R@1 both ways
(``eval.retrieval``, its 159 val2017 images and their captions); the training's minutes and CPU seconds.

    python benchmarks/objectives_side_by_side.py [--rows clip,siglip,mlcd,moe,refine,vit-start,vit-clip,vit-lightclip]
    python benchmarks/objectives_side_by_side.py --render
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

NAME = "objectives_side_by_side"
FILES = BENCH / "results" / f"{NAME}_files"
ROWS = ("clip", "siglip", "mlcd", "moe", "refine", "vit-start", "vit-clip", "vit-lightclip")
SHOWN = {"clip": "CLIP (the sweep's CIFAR-10 run)", "siglip": "SigLIP", "mlcd": "MLCD",
         "moe": "CLIP-MoE (upcycled CLIP)",
         "refine": "CLIP + CLIP-Refine", "vit-start": "ViT recipe (start of the pair)",
         "vit-clip": "ViT recipe + CLIP", "vit-lightclip": "ViT recipe + LightCLIP"}


def row_folder(row: str, args) -> Path:
    from mixture_sweep import run_folder

    if row == "clip":
        return run_folder("cifar10", args.steps, args.batch_size)
    return run_folder("cifar10", args.steps, args.batch_size).parent.parent / (
        f"objectives-{args.steps}x{args.batch_size}") / row


def train_row(row: str, args) -> dict:
    """Train (or find) the model of ``row``; its training record."""
    from dataclasses import replace

    from _common import DATA_ROOT
    from mixture_sweep import run_config, timed_pretrain, train

    if row == "clip":
        return train("cifar10", args.steps, args.batch_size)
    folder = row_folder(row, args)
    record_path = folder / "sweep_training.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    base = run_config("cifar10", args.steps, args.batch_size)
    clip = str(row_folder("clip", args))
    if row in ("siglip", "mlcd"):
        return timed_pretrain(replace(base, loss=row), folder, {"row": row})
    if row == "refine":
        train_row("clip", args)
        config = replace(base, loss="clip-refine", init_model=clip, steps=args.refine_steps, lr=1e-5, warmup=0)
        return timed_pretrain(config, folder, {"row": row, "on_top_of": "clip"})
    if row == "moe":
        return upcycle_row(clip, folder, args)
    if row == "vit-start":
        return {"row": row, "steps": 0, "note": "the finished recipe model, not trained here"}
    from cliplab.train.recipes import recipe_model

    start = str(recipe_model("cifar10-vit-signal", DATA_ROOT, build=False))
    config = replace(base, model="cliplab-vit-32px", init_model=start, loss=row.removeprefix("vit-"),
                     steps=args.vit_steps, lr=1e-4, warmup=0)
    return timed_pretrain(config, folder, {"row": row, "on_top_of": "recipe:cifar10-vit-signal"})


def upcycle_row(clip: str, folder: Path, args) -> dict:
    import time

    from _common import DATA_ROOT
    from cliplab.train.moe_upcycle import UpcycleConfig, upcycle_folder

    train_row("clip", args)
    config = UpcycleConfig(source="cifar10", init_model=clip, templates="cifar10", experts=4, top_k=2,
                           steps=args.moe_steps, routing_steps=args.moe_steps, pool=512, batch_size=args.batch_size,
                           lr=1e-4, data_root=str(DATA_ROOT))
    cpu, wall = time.process_time(), time.perf_counter()
    result = upcycle_folder(config, folder, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    record = {"row": "moe", "on_top_of": "clip", "steps": 3 * args.moe_steps + args.moe_steps,
              "batch_size": args.batch_size, "train_minutes": round(wall / 60, 2), "train_cpu_s": round(cpu, 1),
              "resumed_copies": result.resumed_copies,
              "stages": [{"copy": s.k, "hard_pairs": len(s.hard)} for s in result.stages]}
    (folder / "sweep_training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def model_for(row: str, args):
    from _common import DATA_ROOT
    from cliplab.models import load_model

    if row == "vit-start":
        from cliplab.train.recipes import recipe_model

        return load_model(str(recipe_model("cifar10-vit-signal", DATA_ROOT, build=False)))
    return load_model(str(row_folder(row, args)))


def seeded(dataset, count: int, seed: int):
    from cliplab.eval.robustness import seeded_subset

    return seeded_subset(dataset, count, seed)


def evaluate(backbone, args, cache: Path) -> dict:
    """CIFAR-10 zero-shot top-1, Fashion-MNIST linear-probe top-1 and coco_mini retrieval R@1 of ``backbone``."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from _common import DATA_ROOT
    from cliplab.data import load_dataset
    from cliplab.eval.retrieval import evaluate_retrieval
    from cliplab.features.embed import embed_images
    from cliplab.features.text import class_weights

    def features(dataset):
        out = embed_images(backbone, dataset, cache, progress=False)
        feats = np.asarray(out.features, dtype=np.float64)
        return feats / np.linalg.norm(feats, axis=1, keepdims=True), np.asarray(dataset.labels)[out.indices]

    cifar = seeded(load_dataset("cifar10", DATA_ROOT, "test"), args.eval, 0)
    x, y = features(cifar)
    weights = class_weights(backbone, cifar.class_names, "cifar10", cache_dir=cache)
    zeroshot = float((np.argmax(x @ weights, axis=1) == y).mean())
    x_train, y_train = features(seeded(load_dataset("fashion_mnist", DATA_ROOT, "train"), args.probe, 1))
    x_test, y_test = features(seeded(load_dataset("fashion_mnist", DATA_ROOT, "test"), args.probe, 2))
    probe = LogisticRegression(C=1.0, max_iter=3000).fit(x_train, y_train)
    retrieval = evaluate_retrieval(backbone, load_dataset("coco", DATA_ROOT, "test"), cache_dir=cache,
                                   progress=False, recall_k=(1, 5)).metrics
    return {"cifar10_zeroshot_top1": zeroshot, "fmnist_probe_top1": float(probe.score(x_test, y_test)),
            "coco_t2i_r1": retrieval["image_retrieval_recall@1"], "coco_i2t_r1": retrieval["text_retrieval_recall@1"],
            "coco_t2i_r5": retrieval["image_retrieval_recall@5"]}


def measure(row: str, args, cache: Path) -> dict:
    from _common import CpuAccount, log

    path = FILES / f"row_{row}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("budget") == budget_key(args):
            log(f"{row}: measured already")
            return saved
    record = train_row(row, args)
    with CpuAccount() as cpu:
        metrics = evaluate(model_for(row, args), args, cache)
    record = {**record, **metrics, "row": row, "budget": budget_key(args),
              "eval_cpu_s": round(cpu.result["own_cpu_s"], 1)}
    FILES.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"{row}: {record}")
    return record


def budget_key(args) -> dict:
    return {"steps": args.steps, "batch_size": args.batch_size, "refine_steps": args.refine_steps,
            "moe_steps": args.moe_steps, "vit_steps": args.vit_steps, "eval": args.eval, "probe": args.probe}


def render(args) -> None:
    from _common import header, load_average, md_table, write_results

    rows = [json.loads((FILES / f"row_{r}.json").read_text()) for r in ROWS if (FILES / f"row_{r}.json").is_file()]
    record = header(NAME, __doc__.splitlines()[0], quick=False)
    record.update(rows=rows, budget=budget_key(args), load=load_average())

    def pct(value):
        return f"{100 * value:.1f}%"

    table = [[SHOWN[r["row"]], r.get("steps", "-") if not r.get("on_top_of") else
              f"+{r['steps']} on {r['on_top_of']}", pct(r["cifar10_zeroshot_top1"]), pct(r["fmnist_probe_top1"]),
              pct(r["coco_t2i_r1"]), pct(r["coco_i2t_r1"]), r.get("train_minutes", "-"), r.get("train_cpu_s", "-")]
             for r in rows]
    b = budget_key(args)
    lines = [f"# Pretraining objectives side by side · RN rows: cliplab-rn-32px from random weights, {b['steps']} "
             f"steps x batch {b['batch_size']} on CIFAR-10 template captions; ViT pair: recipe:cifar10-vit-signal + "
             f"{b['vit_steps']} steps", "",
             f"CIFAR-10 zero-shot top-1 on {b['eval']} seeded test images (chance 10%); Fashion-MNIST linear probe "
             f"(logistic regression C=1 on {b['probe']} seeded train images, scored on {b['probe']} test images; "
             "chance 10%); coco_mini val2017 retrieval R@1 (159 images, text->image and image->text); training "
             "minutes and CPU seconds of each row's own training (a shared 2-core machine: rough).", "",
             md_table(["objective", "steps", "CIFAR-10 zero-shot", "F-MNIST probe", "COCO t2i R@1", "COCO i2t R@1",
                       "train min", "train CPU s"], table), "",
             f"The budget is far below the recipe's 1,600 steps of batch 256 (409,600 samples): the RN rows saw "
             f"{b['steps'] * b['batch_size']:,} samples, {100 * b['steps'] * b['batch_size'] / 409600:.1f}% of it."]
    write_results(NAME, record, "\n".join(lines) + "\n\n" + (args.closing or ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--refine-steps", type=int, default=20)
    parser.add_argument("--moe-steps", type=int, default=15)
    parser.add_argument("--vit-steps", type=int, default=30)
    parser.add_argument("--eval", type=int, default=2000)
    parser.add_argument("--probe", type=int, default=2000)
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--closing", default=None, help="A closing paragraph for the markdown (with --render).")
    args = parser.parse_args()
    if args.render:
        render(args)
        return
    from _common import log
    from cliplab.train.recipes import RecipeNotBuiltError

    missing = []
    with tempfile.TemporaryDirectory() as scratch:
        for row in [r for r in args.rows.split(",") if r]:
            if row not in ROWS:
                raise SystemExit(f"unknown row {row!r}: {', '.join(ROWS)}")
            try:
                measure(row, args, Path(scratch))
            except RecipeNotBuiltError as exc:  # the ViT pair waits for recipe:cifar10-vit-signal
                log(f"{row}: skipped ({exc})")
                missing.append(row)
    if missing:
        raise SystemExit(f"not measured yet: {', '.join(missing)}")


if __name__ == "__main__":
    main()
