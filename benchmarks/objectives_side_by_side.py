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

``--recipe-budget`` measures the same rows at the recipe's own budget (results ``objectives_recipe_budget``): every
from-scratch row is ``train.recipes.recipe_config`` of ``cifar10-signal`` (RN) or ``cifar10-vit-signal`` (ViT) with
only ``loss`` changed (1,600 steps of batch 256 on the 9,000 CIFAR-10 train pairs, lr 2e-3, 100 warm-up steps, crop
scale 0.5, the held-out val evaluated every 200 steps), so the CLIP rows ARE the finished recipe models (their
training minutes are their cards' ``training_seconds``, measured when they were built); SigLIP and MLCD train on
the RN, LightCLIP on the ViT; CLIP-MoE upcycles and CLIP-Refine post-trains the RN recipe model at batch 256.

    python benchmarks/objectives_side_by_side.py [--rows clip,siglip,mlcd,moe,refine,vit-start,vit-clip,vit-lightclip]
    python benchmarks/objectives_side_by_side.py --recipe-budget [--rows clip,siglip,mlcd,refine,moe,vit-clip,...]
    python benchmarks/objectives_side_by_side.py --render [--recipe-budget]
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
RECIPE_NAME = "objectives_recipe_budget"
RECIPE_ROWS = ("clip", "siglip", "mlcd", "mlcd-w0.1", "refine", "moe", "vit-clip", "vit-lightclip", "vit-moe")
LOSS_PARAMS = {"mlcd-w0.1": ("mlcd", {"weight": 0.1})}  # a row's objective with parameters other than its defaults
RECIPE_OF = {"clip": "cifar10-signal", "vit-clip": "cifar10-vit-signal"}
ROWS = ("clip", "siglip", "mlcd", "moe", "refine", "vit-start", "vit-clip", "vit-lightclip")
SHOWN = {"clip": "CLIP (the sweep's CIFAR-10 run)", "siglip": "SigLIP", "mlcd": "MLCD",
         "moe": "CLIP-MoE (upcycled CLIP)",
         "refine": "CLIP + CLIP-Refine", "vit-start": "ViT recipe (start of the pair)",
         "vit-clip": "ViT recipe + CLIP", "vit-lightclip": "ViT recipe + LightCLIP"}
RECIPE_SHOWN = {"clip": "CLIP (recipe:cifar10-signal)", "siglip": "SigLIP", "mlcd": "MLCD",
                "mlcd-w0.1": "MLCD, weight 0.1",
                "refine": "CLIP + CLIP-Refine", "moe": "CLIP-MoE (upcycled recipe)",
                "vit-clip": "ViT: CLIP (recipe:cifar10-vit-signal)", "vit-lightclip": "ViT: LightCLIP",
                "vit-moe": "ViT: CLIP-MoE (upcycled ViT recipe)"}


def files(args) -> Path:
    """Where this budget's per-row records live."""
    return BENCH / "results" / f"{RECIPE_NAME if args.recipe_budget else NAME}_files"


def recipe_start(row: str) -> Path:
    """The finished recipe model a recipe-budget row starts from (or is)."""
    from _common import DATA_ROOT
    from cliplab.train.recipes import recipe_model

    return recipe_model(RECIPE_OF["vit-clip" if row.startswith("vit-") else "clip"], DATA_ROOT, build=False)


def recipe_row_folder(row: str) -> Path:
    from cliplab.fileio import default_cache_root

    if row in RECIPE_OF:
        return recipe_start(row)
    return default_cache_root() / "bench" / "objectives-recipe-budget" / row


def train_recipe_row(row: str, args) -> dict:
    """Train (or find) recipe-budget row ``row``; its training record."""
    from _common import DATA_ROOT
    from cliplab.train.recipes import recipe_config
    from mixture_sweep import timed_pretrain

    folder = recipe_row_folder(row)
    if row in RECIPE_OF:
        card = json.loads((folder / "model_card.json").read_text())
        return {"row": row, "steps": card["steps"], "batch_size": 256,
                "train_minutes": round(card["training_seconds"] / 60, 1), "held_out_val_top1": card["held_out"][
                    "zeroshot_top1"], "val_history": held_out_history(folder),
                "note": "the finished recipe model, not trained here"}
    record_path = folder / "sweep_training.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    recipe = RECIPE_OF["vit-clip" if row.startswith("vit-") else "clip"]
    if row in ("siglip", "mlcd", "vit-lightclip") or row in LOSS_PARAMS:
        loss, params = LOSS_PARAMS.get(row, (row.removeprefix("vit-"), {}))
        config = recipe_config(recipe, DATA_ROOT, loss=loss, loss_params=params)
        return timed_pretrain(config, folder, {"row": row, "recipe": recipe})
    start = str(recipe_start(row))
    if row == "refine":
        config = recipe_config(recipe, DATA_ROOT, loss="clip-refine", init_model=start, steps=args.refine_steps,
                               lr=1e-5, warmup=0, eval_every=args.refine_steps)
        return timed_pretrain(config, folder, {"row": row, "on_top_of": f"recipe:{recipe}"})
    return upcycle_row(start, folder, args, on_top_of=f"recipe:{recipe}")


def row_folder(row: str, args) -> Path:
    from mixture_sweep import run_folder

    if args.recipe_budget:
        return recipe_row_folder(row)
    if row == "clip":
        return run_folder("cifar10", args.steps, args.batch_size)
    return run_folder("cifar10", args.steps, args.batch_size).parent.parent / (
        f"objectives-{args.steps}x{args.batch_size}") / row


def train_row(row: str, args) -> dict:
    """Train (or find) the model of ``row``; its training record."""
    from dataclasses import replace

    from _common import DATA_ROOT
    from mixture_sweep import run_config, timed_pretrain, train

    if args.recipe_budget:
        return train_recipe_row(row, args)
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
        train_row("clip", args)
        return upcycle_row(clip, folder, args)
    if row == "vit-start":
        return {"row": row, "steps": 0, "note": "the finished recipe model, not trained here"}
    from cliplab.train.recipes import recipe_model

    start = str(recipe_model("cifar10-vit-signal", DATA_ROOT, build=False))
    config = replace(base, model="cliplab-vit-32px", init_model=start, loss=row.removeprefix("vit-"),
                     steps=args.vit_steps, lr=1e-4, warmup=0)
    return timed_pretrain(config, folder, {"row": row, "on_top_of": "recipe:cifar10-vit-signal"})


def upcycle_row(clip: str, folder: Path, args, on_top_of: str = "clip") -> dict:
    import time

    from _common import DATA_ROOT
    from cliplab.train.moe_upcycle import UpcycleConfig, upcycle_folder

    config = UpcycleConfig(source="cifar10", init_model=clip, templates="cifar10", experts=4, top_k=2,
                           steps=args.moe_steps, routing_steps=args.moe_steps, pool=args.moe_pool,
                           batch_size=args.batch_size, lr=1e-4, data_root=str(DATA_ROOT))
    cpu, wall = time.process_time(), time.perf_counter()
    result = upcycle_folder(config, folder, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    record = {"row": folder.name, "on_top_of": on_top_of, "steps": 3 * args.moe_steps + args.moe_steps,
              "batch_size": args.batch_size, "train_minutes": round(wall / 60, 2), "train_cpu_s": round(cpu, 1),
              "resumed_copies": result.resumed_copies,
              "stages": [{"copy": s.k, "hard_pairs": len(s.hard)} for s in result.stages]}
    (folder / "sweep_training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def model_for(row: str, args):
    from _common import DATA_ROOT
    from cliplab.models import load_model

    if row == "vit-start" and not args.recipe_budget:
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

    path = files(args) / f"row_{row}.json"
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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"{row}: {record}")
    return record


def budget_key(args) -> dict:
    if args.recipe_budget:
        return {"steps": 1600, "batch_size": 256, "refine_steps": args.refine_steps, "moe_steps": args.moe_steps,
                "moe_pool": args.moe_pool, "eval": args.eval, "probe": args.probe}
    return {"steps": args.steps, "batch_size": args.batch_size, "refine_steps": args.refine_steps,
            "moe_steps": args.moe_steps, "vit_steps": args.vit_steps, "eval": args.eval, "probe": args.probe}


def saved_rows(args, names) -> list[dict]:
    """The measured rows of this budget, in ``names`` order."""
    paths = [files(args) / f"row_{r}.json" for r in names]
    return [json.loads(p.read_text()) for p in paths if p.is_file()]


def held_out_history(folder: Path) -> list[dict]:
    """The held-out val evaluations a training wrote into its model card (empty when it wrote none)."""
    import ast

    try:
        history = json.loads((folder / "model_card.json").read_text()).get("history", [])
    except (OSError, ValueError):
        return []
    return ast.literal_eval(history) if isinstance(history, str) else list(history)


def plot_curves(rows: list[dict], path: Path) -> None:
    """Held-out CIFAR-10 val zero-shot against step for every row trained from scratch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in rows:
        history = r.get("val_history") or []
        if r.get("on_top_of") or not history:
            continue
        ax.plot([h["step"] for h in history], [100 * h["zeroshot_top1"] for h in history], marker="o",
                label=RECIPE_SHOWN[r["row"]])
    ax.set_xlabel("training step (batch 256)")
    ax.set_ylabel("held-out CIFAR-10 val zero-shot top-1 (%)")
    ax.set_title("Objectives at the recipe's budget (1,000 held-out val images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_recipe(args) -> None:
    from _common import RESULTS_DIR, header, load_average, md_table, write_results

    rows = saved_rows(args, RECIPE_ROWS)
    for r in rows:  # what each training wrote into its model card (the recipe rows carry theirs already)
        r.setdefault("val_history", held_out_history(recipe_row_folder(r["row"])))
    record = header(RECIPE_NAME, "Pretraining objectives side by side at the recipe's budget (issue 29)", quick=False)
    record.update(rows=rows, budget=budget_key(args), load=load_average())

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    def last_val(r):
        history = r.get("val_history") or []
        return history[-1]["zeroshot_top1"] if history else None

    table = [[RECIPE_SHOWN[r["row"]], f"+{r['steps']} on {r['on_top_of']}" if r.get("on_top_of") else r["steps"],
              pct(r["cifar10_zeroshot_top1"]), pct(last_val(r)), pct(r["fmnist_probe_top1"]), pct(r["coco_t2i_r1"]),
              pct(r["coco_i2t_r1"]), r.get("train_minutes", "-"), r.get("train_cpu_s", "-")] for r in rows]
    plot_curves(rows, RESULTS_DIR / f"{RECIPE_NAME}_curves.png")
    b = budget_key(args)
    lines = ["# Pretraining objectives side by side at the recipe's budget", "",
             "From-scratch rows: `train.recipes.recipe_config` of `cifar10-signal` (RN: cliplab-rn-32px) or "
             "`cifar10-vit-signal` (ViT: cliplab-vit-32px) with only the loss changed: 1,600 steps x batch 256 "
             "(409,600 samples) on the 9,000 CIFAR-10 train pairs with template captions, seed 0. The CLIP rows are "
             "the finished recipe models themselves. Post-steps on the RN (ViT) recipe model, batch 256: "
             f"CLIP-Refine {b['refine_steps']} steps at lr 1e-5; CLIP-MoE 4 experts top-2, 3 copies x "
             f"{b['moe_steps']} steps on the hard-pair clusters of a {b['moe_pool']}-pair pool, then "
             f"{b['moe_steps']} routing steps (on the RN only the text tower's block MLPs become experts).", "",
             f"CIFAR-10 zero-shot top-1 on {b['eval']} seeded test images; held-out val: the last in-training "
             f"evaluation on the 1,000 val images (cifar10 templates); Fashion-MNIST linear probe (logistic "
             f"regression C=1 on {b['probe']} seeded train images, scored on {b['probe']} test images; never "
             "seen in training); coco_mini val2017 retrieval R@1 (159 images; chance 0.6%). Chance on CIFAR-10 "
             "and Fashion-MNIST: 10%. Training minutes are wall time on this shared 2-core CPU machine; the recipe "
             "rows' minutes come from their model cards and were measured while other work shared the cores "
             "(the RN recipe took 15.5 min on idle cores: `pretrain_cifar10.md`).", "",
             md_table(["objective", "steps", "CIFAR-10 zero-shot", "held-out val", "F-MNIST probe", "COCO t2i R@1",
                       "COCO i2t R@1", "train min", "train CPU s"], table), "",
             f"![held-out zero-shot during training]({RECIPE_NAME}_curves.png)"]
    write_results(RECIPE_NAME, record, "\n".join(lines) + "\n\n" + (args.closing or ""))


def render(args) -> None:
    from _common import header, load_average, md_table, write_results

    if args.recipe_budget:
        render_recipe(args)
        return
    rows = saved_rows(args, ROWS)
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
    parser.add_argument("--rows", default=None, help="comma-separated rows (default: all of the budget's rows)")
    parser.add_argument("--recipe-budget", action="store_true",
                        help="the recipe's 1,600 steps of batch 256 (results objectives_recipe_budget)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=None, help="default 64, or 256 with --recipe-budget")
    parser.add_argument("--refine-steps", type=int, default=None, help="default 20, or 100 with --recipe-budget")
    parser.add_argument("--moe-steps", type=int, default=None, help="default 15, or 100 with --recipe-budget")
    parser.add_argument("--moe-pool", type=int, default=None, help="default 512, or 2048 with --recipe-budget")
    parser.add_argument("--vit-steps", type=int, default=30)
    parser.add_argument("--eval", type=int, default=2000)
    parser.add_argument("--probe", type=int, default=2000)
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--closing", default=None, help="A closing paragraph for the markdown (with --render).")
    args = parser.parse_args()
    big = args.recipe_budget
    for name, small, large in (("batch_size", 64, 256), ("refine_steps", 20, 100), ("moe_steps", 15, 100),
                               ("moe_pool", 512, 2048)):
        if getattr(args, name) is None:
            setattr(args, name, large if big else small)
    if big and args.batch_size != 256:
        raise SystemExit("--recipe-budget trains at the recipe's batch 256")
    all_rows = RECIPE_ROWS if big else ROWS
    args.rows = args.rows or ",".join(all_rows)
    if args.render:
        render(args)
        return
    from _common import log
    from cliplab.train.recipes import RecipeNotBuiltError

    missing = []
    with tempfile.TemporaryDirectory() as scratch:
        for row in [r for r in args.rows.split(",") if r]:
            if row not in all_rows:
                raise SystemExit(f"unknown row {row!r}: {', '.join(all_rows)}")
            try:
                measure(row, args, Path(scratch))
            except RecipeNotBuiltError as exc:  # the ViT pair waits for recipe:cifar10-vit-signal
                log(f"{row}: skipped ({exc})")
                missing.append(row)
    if missing:
        raise SystemExit(f"not measured yet: {', '.join(missing)}")


if __name__ == "__main__":
    main()
