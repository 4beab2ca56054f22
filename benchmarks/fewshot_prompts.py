"""Few-shot table of the prompt methods (CoOp, CoCoOp, CLIP-SVD, GRIP) beside zero-shot, linear probe, Tip-Adapter.

Issue 24's table: CIFAR-10 and Fashion-MNIST, shots 1/2/4/8/16, seeds 1/2/3, then base-to-new on CIFAR-10 (first
5 classes base, last 5 new) for every prompt method at 16 shots, with the ``cifar10-signal`` recipe model (trained
here on CIFAR-10 train + template captions; it never saw Fashion-MNIST). CPU is scarce (2 shared cores), so:

- every prompt method trains on a small fixed budget (``budget``, recorded with every run): CoOp and CLIP-SVD
  about 50 optimiser steps of batch 32 (epochs = ceil(50 / steps per epoch): 50 epochs at 1 shot, 10 at 16
  shots with 10 classes; CoOp's first epoch is its warmup), CoCoOp (batch 1, as the authors') its warmup epoch
  plus ceil(16 / k) epochs (160 steps after the warmup at every k), GRIP one pseudolabel round (of 10) of 10
  epochs on at most 500 unlabelled images;
- shots and the validation part are drawn from a seeded 10,000-image subset of the train split (Fashion-MNIST's
  has 60,000), and the test split is scored on a seeded 2,000-image subset (seed 0), never used for fitting;
- partial results are written (JSON + markdown) after every finished run, and a rerun resumes: runs already in
  the JSON with the same budget are skipped. Order (``--order dataset``): CIFAR-10, Fashion-MNIST, base-to-new,
  within each seed 1 for every shot count first, then seeds 2 and 3; ``--order seed``: seed 1 of all three first.

MaPLe needs a ViT image tower; the ViT twin of the recipe (``recipe:cifar10-vit-signal``) is not built, so MaPLe
is not in the table.

    nice -n 5 python benchmarks/fewshot_prompts.py [--quick] [--model recipe:cifar10-signal | tiny]
        [--order dataset | seed]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import DATA_ROOT, RESULTS_DIR, CpuAccount, benchmark_model, header, log, model_info, write_results

PROMPT_METHODS = ["coop", "cocoop", "clip-svd", "grip"]
BASELINES = ["zeroshot", "linear-probe", "tip-adapter"]
METHODS = BASELINES + PROMPT_METHODS
DATASETS = ["cifar10", "fashion_mnist"]
TRAIN_POOL = 10_000
TEST_SUBSET = 2_000
STEPS = 50  # CoOp's and CLIP-SVD's optimiser steps per run (about)


NOTES = [
    "On this model the prompt contexts barely move within these budgets: a check outside the repository "
    "(/work/compare/fewshot_prompts/coop_moves.py: CoOp, CIFAR-10, 16 shots, seed 1, the table's budget) found the "
    "learned context within 2.1e-5 of its initial 'a photo of a' (norm 0.68), the class weights within 1.1e-7, and "
    "0 of the 2,000 test predictions different from the initial prompt's; the authors' SGD lr 0.002 with ~50 steps "
    "(theirs: up to 1,000) moves nothing on this small text tower; the CoOp/CLIP-SVD/GRIP rows at 72.50% on CIFAR-10 "
    "match that initial prompt 'a photo of a {c}.' (zero-shot's 72.55% ensembles 18 templates). The prompt rows "
    "measure these budgets on this model, not the methods.",
    "Fashion-MNIST is outside the model's training (zero-shot 5.2%, below the 10% of chance): the linear probe on "
    "the shots' features is the row that learns; GRIP's pseudolabels come from that below-chance zero-shot model.",
    "Every run records its wall and CPU seconds and the other load in the JSON (runs[]); a stopped run resumes "
    "from the JSON, so a table may come from more than one process (the command below is the last one).",
    "Base-to-new at 16 shots: CoCoOp's warmup epoch plus 1 epoch of 80 steps (5 base classes); CoOp and CLIP-SVD "
    "17 epochs of 3 steps.",
]


def budget(method: str, shots: int, n_classes: int = 10) -> dict:
    """The training budget (head parameters) of ``method`` at ``shots`` per class of ``n_classes`` (module
    docstring)."""
    if method in ("coop", "clip-svd"):
        return {"max_epoch": math.ceil(STEPS / math.ceil(shots * n_classes / 32))}
    if method == "cocoop":
        return {"max_epoch": 1 + math.ceil(16 / shots)}
    if method == "grip":
        return {"rounds": 1, "max_epoch": 10, "max_unlabelled": 500}
    return {}


BUDGET_TEXT = {"coop": "about 50 steps of batch 32 (max_epoch = ceil(50 / steps per epoch): 50 at 1 shot, 10 at 16 "
                       "shots; the first epoch is the warmup)",
               "clip-svd": "about 50 steps of batch 32 (as CoOp; no warmup), both towers",
               "cocoop": "1 warmup epoch + ceil(16 / k) epochs of batch 1 (160 steps after the warmup)",
               "grip": "1 round (of 10), 10 epochs, at most 500 unlabelled images"}


def seeded_subset(dataset, size: int, seed: int = 0):
    """A seeded random ``size``-item Subset (the dataset itself when it is no larger)."""
    from cliplab.data.base import Subset

    if len(dataset.labels) <= size:
        return dataset
    rows = np.sort(np.random.default_rng(seed).choice(len(dataset.labels), size, replace=False))
    return Subset(dataset, rows)


def run_key(part: str, dataset: str, method: str, shots: int, seed: int) -> str:
    return f"{part}|{dataset}|{method}|{shots}|{seed}"


def pct(mean_std) -> str:
    return f"{100 * mean_std[0]:.2f} ± {100 * mean_std[1]:.2f}"


def markdown(state: dict) -> str:
    """The tables of every finished run (cells with fewer than all seeds say how many)."""
    shots, seeds = state["shots"], state["seeds"]
    pools = ", ".join(f"{d}: {n:,} train images used" for d, n in state.get("pools", {}).items()) or "see JSON"
    trained = (": trained on CIFAR-10 train + template captions" if state["model_spec"] == "recipe:cifar10-signal"
               else "")
    lines = [f"# Few-shot top-1 of the prompt methods ({state['model_spec']}{trained})", "",
             f"**Weights: {state['weights_note']}.**", "",
             f"Shots and validation drawn from each train split, a seeded {TRAIN_POOL:,}-image subset where it is "
             f"larger ({pools}); scored on a seeded {TEST_SUBSET:,}-image subset of each test split (seed 0), never "
             f"used for fitting. Mean ± std over seeds {seeds} "
             "(a cell marked `(n)` has only n seeds so far). MaPLe is not here: it needs a ViT image tower and "
             "recipe:cifar10-vit-signal is not built.", "",
             "Training budgets (CPU-sized, far below the authors'): "
             + "; ".join(f"{m}: {t}" for m, t in BUDGET_TEXT.items()) + ".", ""]
    lines += ["Notes:", ""] + [f"- {note}" for note in NOTES] + [""]
    runs = state["runs"]
    for dataset in state["datasets"]:
        done = [r for r in runs if r["part"] == "fewshot" and r["dataset"] == dataset]
        if not done:
            continue
        note = " (the model never saw it)" if dataset != "cifar10" else " (the model was trained on its train split)"
        lines += [f"## {dataset}{note}", "", "| method | " + " | ".join(f"{k} shots" for k in shots) + " |",
                  "|---|" + "---|" * len(shots)]
        for method in METHODS:
            cells = []
            for k in shots:
                acc = [r["acc1"] for r in done if r["method"] == method and r["shots"] == k]
                cell = pct((np.mean(acc), np.std(acc))) if acc else "—"
                cells.append(cell + (f" ({len(acc)})" if acc and len(acc) < len(seeds) else ""))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        own = [r for r in done if not r.get("repeated")]  # zero-shot's one score, repeated per cell, counted once
        cpu = sum(r.get("cpu_s", 0.0) for r in own)
        lines += ["", f"{len(own)} runs, {cpu:.0f} CPU-s (fits and scoring; the dataset's first run also embeds the "
                  "train pool and the test subset, later runs read them from the feature cache).", ""]
    b2n = [r for r in runs if r["part"] == "base2new"]
    if b2n:
        lines += [f"## Base-to-new on cifar10, {state['b2n_shots']} shots", "",
                  "Base = the first 5 classes, new = the last 5; trained on the base classes of the train subset only; "
                  "base accuracy among the base classes, new among the new classes; H = harmonic mean of the mean "
                  "base and new accuracies.", "", "| method | base | new | H | seeds |", "|---|---|---|---|---|"]
        for method in ["zeroshot"] + PROMPT_METHODS:
            group = [r for r in b2n if r["method"] == method]
            if not group:
                continue
            base = [r["base_acc1"] for r in group]
            new = [r["new_acc1"] for r in group if r["new_acc1"] is not None]
            if len(new) == len(group):
                b, n = float(np.mean(base)), float(np.mean(new))
                h = f"{100 * 2 * b * n / (b + n):.2f}" if b + n > 0 else "0.00"
                new_cell = pct((n, np.std(new)))
            else:
                new_cell, h = "n/a", "n/a"
            lines.append(f"| {method} | {pct((np.mean(base), np.std(base)))} | {new_cell} | {h} | {len(group)} |")
        lines.append("")
    return "\n".join(lines)


def fill_zeroshot(state: dict, done: set, shots: list[int], seeds: list[int]) -> None:
    """Zero-shot needs no shots: its one score per dataset stands for every (shots, seed) cell."""
    for dataset in state["datasets"]:
        zs = [r for r in state["runs"] if r["part"] == "fewshot" and r["dataset"] == dataset
              and r["method"] == "zeroshot"]
        for seed in seeds:
            for k in shots:
                if zs and run_key("fewshot", dataset, "zeroshot", k, seed) not in done:
                    state["runs"].append(dict(zs[0], shots=k, seed=seed, repeated=True))
                    done.add(run_key("fewshot", dataset, "zeroshot", k, seed))


def save(state: dict, name: str) -> None:
    record = dict(state["header"], model=state["model"], weights_note=state["weights_note"], shots=state["shots"],
                  seeds=state["seeds"], methods=METHODS, datasets=state["datasets"], b2n_shots=state["b2n_shots"],
                  budgets={m: {str(k): budget(m, k) for k in state["shots"]} for m in PROMPT_METHODS},
                  budgets_base2new={m: budget(m, state["b2n_shots"], 5) for m in PROMPT_METHODS},
                  budget_text=BUDGET_TEXT, notes=NOTES, train_pool=TRAIN_POOL, test_subset=TEST_SUBSET,
                  pools=state.get("pools", {}), complete=state["complete"], runs=state["runs"])
    write_results(name, record, markdown(state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 4 shots, one seed, 200 test images")
    parser.add_argument("--model", default="recipe:cifar10-signal")
    parser.add_argument("--name", default=None, help="results name (default fewshot_prompts, _quick with --quick)")
    parser.add_argument("--order", choices=["dataset", "seed"], default="dataset",
                        help="dataset: CIFAR-10, Fashion-MNIST, base-to-new, each with all seeds; seed: seed 1 of all "
                        "three first")
    parser.add_argument("--render", action="store_true", help="only rewrite the JSON and markdown from the JSON")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/cliplab/bench-fewshot-prompts"))
    args = parser.parse_args()
    global TEST_SUBSET, TRAIN_POOL
    shots, seeds = ([1, 4], [1]) if args.quick else ([1, 2, 4, 8, 16], [1, 2, 3])
    if args.quick:
        TEST_SUBSET, TRAIN_POOL = 200, 2_000
    b2n_shots = 4 if args.quick else 16
    name = args.name or ("fewshot_prompts_quick" if args.quick else "fewshot_prompts")
    if args.render:
        saved = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        keys = ("benchmark", "description", "mode", "started", "machine", "libraries", "git", "command")
        state = {"header": {k: saved[k] for k in keys}, "model": saved["model"], "model_spec": args.model,
                 "weights_note": saved["weights_note"], "shots": saved["shots"], "seeds": saved["seeds"],
                 "datasets": saved["datasets"], "b2n_shots": saved["b2n_shots"], "complete": saved["complete"],
                 "runs": saved["runs"], "pools": saved.get("pools") or {}}
        save(state, name)
        return

    from cliplab.data import load_dataset
    from cliplab.eval.fewshot import run_fewshot

    if args.model.startswith("recipe:"):  # never start a recipe build from a benchmark: refuse when not built
        from cliplab.train.recipes import recipe_model

        recipe_model(args.model.split(":", 1)[1], DATA_ROOT, build=False)
    backbone, weights = benchmark_model(args.model)
    log(f"model {args.model}: {backbone.model_id} ({weights[:60]}...)")
    path = RESULTS_DIR / f"{name}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    # resume: the runs of the same model and the same budgets (a changed budget runs again)
    runs = [r for r in previous.get("runs", []) if r.get("model_id") == backbone.model_id
            and r.get("params") == budget(r["method"], r["shots"], r.get("n_classes", 10))]
    state = {"header": header(name, __doc__.strip().splitlines()[0], args.quick), "model": model_info(backbone),
             "model_spec": args.model, "weights_note": weights, "shots": shots, "seeds": seeds, "datasets": DATASETS,
             "b2n_shots": b2n_shots, "complete": False, "runs": runs, "pools": {}}
    done = {run_key(r["part"], r["dataset"], r["method"], r["shots"], r["seed"]) for r in runs}
    if runs:
        log(f"resuming: {len(runs)} runs already in {path}")
    out = Path(tempfile.mkdtemp(prefix="cliplab-fewshot-prompts-"))

    def call(part, dataset, train, test, methods, k, seed):
        todo = [m for m in methods if run_key(part, dataset, m, k, seed) not in done]
        if not todo:
            return
        for method in todo:  # one method per call: partial results after every finished run
            n_classes = len(train.class_names) if part == "fewshot" else len(train.class_names) // 2
            run_params = {method: budget(method, k, n_classes)}
            with CpuAccount() as cpu:
                result = run_fewshot(backbone, train, test, [method], [k], [seed], params=run_params,
                                     output_dir=out / part / dataset, cache_dir=args.cache_dir, progress=False,
                                     base_to_new=(part == "base2new"))
            run = dict(result.runs[-1], part=part, dataset=dataset, model_id=backbone.model_id,
                       params=run_params[method], n_classes=n_classes, wall_s=round(cpu.result["wall_s"], 2),
                       cpu_s=round(cpu.result["own_cpu_s"], 2), foreign_load=round(cpu.result["foreign_load"], 2))
            run["chosen"] = str(run.get("chosen"))[:300]
            state["runs"].append(run)
            done.add(run_key(part, dataset, method, k, seed))
            extra = "" if part == "fewshot" else (f" base {100 * run['base_acc1']:.2f}% new "
                                                  + ("n/a" if run["new_acc1"] is None else
                                                     f"{100 * run['new_acc1']:.2f}%"))
            log(f"{part} {dataset} {method} {k} shots seed {seed}: {100 * run['acc1']:.2f}%{extra} "
                f"({run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} CPU-s)")
            save(state, name)

    splits: dict[str, tuple] = {}

    def data(dataset: str) -> tuple:
        if dataset not in splits:
            splits[dataset] = (seeded_subset(load_dataset(dataset, root=DATA_ROOT, split="train"), TRAIN_POOL),
                               seeded_subset(load_dataset(dataset, root=DATA_ROOT, split="test"), TEST_SUBSET))
            state["pools"][dataset] = len(splits[dataset][0].labels)
            log(f"{dataset}: {len(splits[dataset][0].labels)} train pool, {len(splits[dataset][1].labels)} test images")
        return splits[dataset]

    def fewshot_steps(dataset, seed_list):
        for seed in seed_list:
            for k in shots:
                first = (k, seed) == (shots[0], seeds[0])  # zero-shot needs no shots: scored once
                yield "fewshot", dataset, seed, k, METHODS if first else [m for m in METHODS if m != "zeroshot"]

    def b2n_steps(seed_list):
        for seed in seed_list:
            yield "base2new", "cifar10", seed, b2n_shots, (["zeroshot"] if seed == seeds[0] else []) + PROMPT_METHODS

    if args.order == "dataset":  # CIFAR-10 (all seeds), Fashion-MNIST, base-to-new
        steps = [s for d in DATASETS for s in fewshot_steps(d, seeds)] + list(b2n_steps(seeds))
    else:  # seed 1 of everything first, then seed 2, then seed 3
        steps = [s for seed in seeds for s in [*(t for d in DATASETS for t in fewshot_steps(d, [seed])),
                                               *b2n_steps([seed])]]
    start = time.perf_counter()
    for part, dataset, seed, k, methods in steps:
        train, test = data(dataset)
        call(part, dataset, train, test, methods, k, seed)
        fill_zeroshot(state, done, shots, seeds)
    save(state, name)
    state["complete"] = True
    save(state, name)
    log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
