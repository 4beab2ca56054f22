"""Few-shot table of the prompt methods (CoOp, CoCoOp, MaPLe, CLIP-SVD, GRIP) beside zero-shot, probe, Tip-Adapter.

Issue 24's table: CIFAR-10 and Fashion-MNIST, shots 1/2/4/8/16, seeds 1/2/3, then base-to-new on CIFAR-10 (first
5 classes base, last 5 new) for every prompt method at 16 shots, with the signal-carrying recipe models (trained
here on CIFAR-10 train + template captions; they never saw Fashion-MNIST), one section per model: the ResNet
``recipe:cifar10-signal`` and its ViT twin ``recipe:cifar10-vit-signal`` (MaPLe needs a ViT image tower, so it is
in the ViT section only). CPU is scarce (2 shared cores), so:

- every prompt method trains on a small fixed budget (``budget``, recorded with every run), per section
  (``SECTIONS``): on the ResNet, CoOp and CLIP-SVD about 50 optimiser steps of batch 32 (epochs = ceil(50 / steps
  per epoch): 50 epochs at 1 shot, 10 at 16 shots with 10 classes; CoOp's first epoch is its warmup), CoCoOp
  (batch 1, as the authors') its warmup epoch plus ceil(16 / k) epochs (160 steps after the warmup at every k),
  GRIP one pseudolabel round (of 10) of 10 epochs on at most 500 unlabelled images; the ViT section's budgets are
  smaller (its whole run must fit about 15 CPU-minutes, MaPLe and CLIP-SVD re-embed the test subset every run);
- shots and the validation part are drawn from a seeded subset of the train split (Fashion-MNIST's has 60,000),
  and the test split is scored on a seeded subset (seed 0), never used for fitting; sizes per section;
- partial results are written (JSON + markdown) after every finished run, and a rerun resumes: runs already in
  the JSON for the same model with the same budget are skipped; the other model's runs are kept as they are.
  Order (``--order dataset``): CIFAR-10, Fashion-MNIST, base-to-new, within each seed 1 for every shot count
  first, then seeds 2 and 3; ``--order seed``: seed 1 of all three first. ``--rerun METHOD`` runs one method's
  rows of this model again (the replaced runs are kept in the JSON under ``superseded``).

    nice -n 5 python benchmarks/fewshot_prompts.py [--quick] [--model recipe:cifar10-signal | recipe:cifar10-vit-signal
        | tiny | PATH] [--section rn | vit] [--order dataset | seed] [--rerun METHOD] [--render]
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

BASELINES = ["zeroshot", "linear-probe", "tip-adapter"]
DATASETS = ["cifar10", "fashion_mnist"]

# Per-section settings: which prompt methods, the train pool and test subset sizes, and the training budgets.
SECTIONS: dict[str, dict] = {
    "rn": {"prompt_methods": ["coop", "cocoop", "clip-svd", "grip"], "train_pool": 10_000, "test_subset": 2_000,
           "steps": {"coop": 50, "clip-svd": 50}, "cocoop_epochs": 16, "grip": (1, 10, 500)},
    # ViT: sized from a dry run on tiny (a 2-block ViT; 1 shot: CoOp 9.5, CoCoOp 7.8, MaPLe 10.3, CLIP-SVD 15.1
    # CPU-s at the ResNet-like budgets) so that 2 datasets x 15 cells + base-to-new fit about 15 CPU-minutes
    "vit": {"prompt_methods": ["coop", "cocoop", "maple", "clip-svd", "grip"], "train_pool": 5_000,
            "test_subset": 500, "steps": {"coop": 20, "clip-svd": 10}, "cocoop_epochs": 4, "maple_steps": 16,
            "grip": (1, 3, 200)},
}
SECTION_TITLES = {"rn": "ResNet image tower", "vit": "ViT image tower"}


def methods_of(section: str) -> list[str]:
    return BASELINES + SECTIONS[section]["prompt_methods"]


def budget(method: str, shots: int, n_classes: int = 10, section: str = "rn") -> dict:
    """The training budget (head parameters) of ``method`` at ``shots`` per class of ``n_classes`` (module
    docstring; ``SECTIONS``)."""
    cfg = SECTIONS[section]
    if method in ("coop", "clip-svd"):
        return {"max_epoch": math.ceil(cfg["steps"][method] / math.ceil(shots * n_classes / 32))}
    if method == "cocoop":
        return {"max_epoch": 1 + math.ceil(cfg["cocoop_epochs"] / shots)}
    if method == "maple":  # batch 4, last incomplete batch dropped: 1 warmup epoch + enough epochs for the steps
        return {"max_epoch": 1 + math.ceil(cfg["maple_steps"] / max(shots * n_classes // 4, 1))}
    if method == "grip":
        rounds, epochs, unlabelled = cfg["grip"]
        return {"rounds": rounds, "max_epoch": epochs, "max_unlabelled": unlabelled}
    return {}


def budget_text(section: str) -> dict[str, str]:
    """What ``budget`` gives, in words."""
    cfg = SECTIONS[section]
    coop, svd = cfg["steps"]["coop"], cfg["steps"]["clip-svd"]
    rounds, epochs, unlabelled = cfg["grip"]
    text = {"coop": f"about {coop} steps of batch 32 (max_epoch = ceil({coop} / steps per epoch): "
                    f"{budget('coop', 1, 10, section)['max_epoch']} at 1 shot, "
                    f"{budget('coop', 16, 10, section)['max_epoch']} at 16 shots; the first epoch is the warmup)",
            "clip-svd": f"about {svd} steps of batch 32 ({'as CoOp; ' if svd == coop else ''}no warmup), both towers",
            "cocoop": f"1 warmup epoch + ceil({cfg['cocoop_epochs']} / k) epochs of batch 1 "
                      f"({10 * cfg['cocoop_epochs']} steps after the warmup"
                      + ("" if cfg["cocoop_epochs"] >= 16 else
                         f" up to {cfg['cocoop_epochs']} shots, one epoch of 10 k steps above") + ")"}
    if "maple" in cfg["prompt_methods"]:
        text["maple"] = (f"1 warmup epoch (lr 1e-5) + ceil({cfg['maple_steps']} / steps per epoch) epochs of batch 4 "
                         f"(at least {cfg['maple_steps']} steps after the warmup: "
                         f"{budget('maple', 1, 10, section)['max_epoch']} epochs at 1 shot, "
                         f"{budget('maple', 16, 10, section)['max_epoch']} at 16 shots)")
    text["grip"] = f"{rounds} round (of 10), {epochs} epochs, at most {unlabelled} unlabelled images"
    return text


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


RN_NOTES = [
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
VIT_NOTES = [
    "Budgets and sizes are smaller than the ResNet section's so that the whole section fits about 15 CPU-minutes on "
    "the shared 2-core machine: MaPLe and CLIP-SVD train through the image tower and re-embed the test subset "
    "through their tuned towers in every run (the other methods score cached features).",
    "MaPLe: prompt depth J = 2 (the authors' 9 capped at the text tower's 2 blocks), 2 context tokens from "
    "'a photo of a', the authors' SGD lr 0.0035, batch 4; the first epoch is the warmup at lr 1e-5.",
    "Every run records its wall and CPU seconds and the other load in the JSON (runs[]); a stopped run resumes "
    "from the JSON, so a table may come from more than one process.",
]
NOTES = {"rn": RN_NOTES, "vit": VIT_NOTES}


RERUN_WHY = {"tip-adapter": " (Tip-Adapter's zero-shot term then used the authors' constant 100; it now uses the "
                            "model's own logit scale, 12.35 for recipe:cifar10-signal: heads/tip_adapter.py)"}


def superseded_markdown(section: dict, superseded: list[dict]) -> list[str]:
    """The rows a ``--rerun`` replaced (mean over seeds), so a table says what changed."""
    if not superseded:
        return []
    lines = []
    for method in sorted({r["method"] for r in superseded}):
        for dataset in section["datasets"]:
            old = [r for r in superseded if r["method"] == method and r["dataset"] == dataset
                   and r["part"] == "fewshot"]
            if not old:
                continue
            when = max(r["superseded_by"] for r in old)
            cells = []
            for k in section["shots"]:
                acc = [r["acc1"] for r in old if r["shots"] == k]
                cells.append(pct((np.mean(acc), np.std(acc))) if acc else "—")
            why = RERUN_WHY.get(method, "")
            lines.append(f"- {method} on {dataset} before its rerun of {when}{why}: " + ", ".join(
                f"{k} shots {c}" for k, c in zip(section["shots"], cells)) + ".")
    return (["Replaced rows (runs superseded by a rerun, kept in the JSON under `superseded`):", ""] + lines + [""]
            if lines else [])


def section_markdown(section: dict, runs: list[dict], superseded: list[dict] = ()) -> list[str]:
    """One model's tables (cells with fewer than all seeds say how many)."""
    shots, seeds, key = section["shots"], section["seeds"], section["section"]
    methods = section["methods"]
    pools = ", ".join(f"{d}: {n:,} train images used" for d, n in section.get("pools", {}).items()) or "see JSON"
    trained = (": trained on CIFAR-10 train + template captions" if section["model_spec"].startswith("recipe:cifar10")
               else "")
    lines = [f"## {section['model_spec']} ({SECTION_TITLES.get(key, key)}{trained})", "",
             f"**Weights: {section['weights_note']}.**", "",
             f"Shots and validation drawn from each train split, a seeded {section['train_pool']:,}-image subset where "
             f"it is larger ({pools}); scored on a seeded {section['test_subset']:,}-image subset of each test split "
             f"(seed 0), never used for fitting. Mean ± std over seeds {seeds} "
             "(a cell marked `(n)` has only n seeds so far)."
             + (" MaPLe needs a ViT image tower: it is in the ViT section." if "maple" not in methods else ""), "",
             "Training budgets (CPU-sized, far below the authors'): "
             + "; ".join(f"{m}: {t}" for m, t in section["budget_text"].items()) + ".", ""]
    lines += ["Notes:", ""] + [f"- {note}" for note in section["notes"]] + [""]
    for dataset in section["datasets"]:
        done = [r for r in runs if r["part"] == "fewshot" and r["dataset"] == dataset]
        if not done:
            continue
        note = " (the model never saw it)" if dataset != "cifar10" else " (the model was trained on its train split)"
        lines += [f"### {dataset}{note}", "", "| method | " + " | ".join(f"{k} shots" for k in shots) + " |",
                  "|---|" + "---|" * len(shots)]
        for method in methods:
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
        lines += [f"### Base-to-new on cifar10, {section['b2n_shots']} shots", "",
                  "Base = the first 5 classes, new = the last 5; trained on the base classes of the train subset only; "
                  "base accuracy among the base classes, new among the new classes; H = harmonic mean of the mean "
                  "base and new accuracies.", "", "| method | base | new | H | seeds |", "|---|---|---|---|---|"]
        for method in ["zeroshot"] + [m for m in methods if m not in BASELINES]:
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
    lines += superseded_markdown(section, superseded)
    head = section.get("header", {})
    rerun = head.get("rerun")
    lines += [f"This section: started {head.get('started')}, git {head.get('git')}, command `{head.get('command')}`"
              + (f"; rows rerun from {rerun.get('started')}, git {rerun.get('git')}, command `{rerun.get('command')}`"
                 if rerun else "") + f"{'' if section.get('complete') else ' (not complete yet)'}.", ""]
    return lines


def markdown(record: dict) -> str:
    """Every section's tables."""
    lines = ["# Few-shot top-1 of the prompt methods (recipe models trained here on CIFAR-10 train + template "
             "captions)", "", "One section per model: the ResNet recipe (recipe:cifar10-signal) and its ViT twin "
             "(recipe:cifar10-vit-signal, the only one MaPLe can run on). Both were trained on the same 9,000 "
             "CIFAR-10 train images with template captions and never saw Fashion-MNIST.", ""]
    for section in record["sections"]:
        runs = [r for r in record["runs"] if r.get("model_id") == section["model"]["model_id"]]
        old = [r for r in record.get("superseded", []) if r.get("model_id") == section["model"]["model_id"]]
        lines += section_markdown(section, runs, old)
    return "\n".join(lines)


def fill_zeroshot(section: dict, runs: list[dict], done: set) -> None:
    """Zero-shot needs no shots: its one score per dataset stands for every (shots, seed) cell."""
    model_id = section["model"]["model_id"]
    for dataset in section["datasets"]:
        zs = [r for r in runs if r["part"] == "fewshot" and r["dataset"] == dataset and r["method"] == "zeroshot"
              and r.get("model_id") == model_id]
        for seed in section["seeds"]:
            for k in section["shots"]:
                if zs and run_key("fewshot", dataset, "zeroshot", k, seed) not in done:
                    runs.append(dict(zs[0], shots=k, seed=seed, repeated=True))
                    done.add(run_key("fewshot", dataset, "zeroshot", k, seed))


def legacy_sections(saved: dict) -> list[dict]:
    """The sections of a results JSON; one written before sections existed (the ResNet run) becomes one."""
    if "sections" in saved:
        return saved["sections"]
    if not saved:
        return []
    keys = ("benchmark", "description", "mode", "started", "machine", "libraries", "git", "command")
    return [{"section": "rn", "model_spec": "recipe:cifar10-signal", "header": {k: saved[k] for k in keys},
             "model": saved["model"], "weights_note": saved["weights_note"], "shots": saved["shots"],
             "seeds": saved["seeds"], "methods": saved["methods"], "datasets": saved["datasets"],
             "b2n_shots": saved["b2n_shots"], "budgets": saved["budgets"],
             "budgets_base2new": saved["budgets_base2new"],
             "budget_text": saved["budget_text"], "notes": RN_NOTES, "train_pool": saved["train_pool"],
             "test_subset": saved["test_subset"], "pools": saved.get("pools") or {}, "complete": saved["complete"]}]


def section_record(key: str, spec: str, backbone_info: dict, weights: str, head: dict, shots, seeds, b2n_shots,
                   quick: bool) -> dict:
    cfg = SECTIONS[key]
    methods = methods_of(key)
    prompt = cfg["prompt_methods"]
    return {"section": key, "model_spec": spec, "header": head, "model": backbone_info, "weights_note": weights,
            "shots": shots, "seeds": seeds, "methods": methods, "datasets": DATASETS, "b2n_shots": b2n_shots,
            "budgets": {m: {str(k): budget(m, k, 10, key) for k in shots} for m in prompt},
            "budgets_base2new": {m: budget(m, b2n_shots, 5, key) for m in prompt}, "budget_text": budget_text(key),
            "notes": NOTES[key], "train_pool": 2_000 if quick else cfg["train_pool"],
            "test_subset": 200 if quick else cfg["test_subset"], "pools": {}, "complete": False}


def save(record: dict, name: str) -> None:
    write_results(name, record, markdown(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 4 shots, one seed, 200 test images")
    parser.add_argument("--model", default="recipe:cifar10-signal")
    parser.add_argument("--section", choices=sorted(SECTIONS), default=None,
                        help="settings and methods (default: vit for a ViT image tower, else rn)")
    parser.add_argument("--name", default=None, help="results name (default fewshot_prompts, _quick with --quick)")
    parser.add_argument("--order", choices=["dataset", "seed"], default="dataset",
                        help="dataset: CIFAR-10, Fashion-MNIST, base-to-new, each with all seeds; seed: seed 1 of all "
                        "three first")
    parser.add_argument("--rerun", action="append", default=[], metavar="METHOD",
                        help="run this method's rows of this model again (repeatable)")
    parser.add_argument("--only", action="append", default=[], metavar="METHOD",
                        help="run only these methods (repeatable; the others' rows stay as they are)")
    parser.add_argument("--render", action="store_true", help="only rewrite the JSON and markdown from the JSON")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/cliplab/bench-fewshot-prompts"))
    args = parser.parse_args()
    shots, seeds = ([1, 4], [1]) if args.quick else ([1, 2, 4, 8, 16], [1, 2, 3])
    b2n_shots = 4 if args.quick else 16
    name = args.name or ("fewshot_prompts_quick" if args.quick else "fewshot_prompts")
    path = RESULTS_DIR / f"{name}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    sections = legacy_sections(previous)
    head = header(name, __doc__.strip().splitlines()[0], args.quick)
    record = {**head, "sections": sections, "runs": list(previous.get("runs", [])),
              "superseded": list(previous.get("superseded", []))}
    if args.render:  # the header of the process that last ran stays
        keys = ("benchmark", "description", "mode", "started", "machine", "libraries", "git", "command")
        save({**record, **{k: previous[k] for k in keys if k in previous}}, name)
        return

    from cliplab.data import load_dataset
    from cliplab.eval.fewshot import run_fewshot

    if args.model.startswith("recipe:"):  # never start a recipe build from a benchmark: refuse when not built
        from cliplab.train.recipes import recipe_model

        recipe_model(args.model.split(":", 1)[1], DATA_ROOT, build=False)
    backbone, weights = benchmark_model(args.model)
    key = args.section or ("vit" if type(backbone.model.visual).__name__ == "VisionTransformer" else "rn")
    log(f"model {args.model}: {backbone.model_id} ({weights[:60]}...), section {key}")
    section = section_record(key, args.model, model_info(backbone), weights, head, shots, seeds, b2n_shots,
                             args.quick)
    every = section["methods"]
    methods = [m for m in every if not args.only or m in args.only]
    prompt_methods = SECTIONS[key]["prompt_methods"]
    model_id = backbone.model_id
    mine = [r for r in record["runs"] if r.get("model_id") == model_id]
    others = [r for r in record["runs"] if r.get("model_id") != model_id]
    # resume: this model's runs with the same budgets (a changed budget, or a method to rerun, runs again)
    keep = [r for r in mine if r.get("params") == budget(r["method"], r["shots"], r.get("n_classes", 10), key)
            and r["method"] not in args.rerun]
    record["superseded"] += [dict(r, superseded_by=head["started"]) for r in mine if r not in keep
                             and not r.get("repeated")]
    record["runs"] = others + keep
    old = next((s for s in sections if s["model"]["model_id"] == model_id), None)
    if old is not None:
        section["pools"] = old.get("pools", {})
        if args.only or args.rerun:  # a partial rerun: the section's first run stays its record
            section["header"] = dict(old["header"], rerun=head)
    record["sections"] = [s for s in sections if s["model"]["model_id"] != model_id] + [section]
    record["sections"].sort(key=lambda s: list(SECTIONS).index(s["section"]))
    runs = record["runs"]
    done = {run_key(r["part"], r["dataset"], r["method"], r["shots"], r["seed"]) for r in keep}
    if keep:
        log(f"resuming: {len(keep)} runs of this model already in {path}")
    out = Path(tempfile.mkdtemp(prefix="cliplab-fewshot-prompts-"))
    train_pool, test_subset = section["train_pool"], section["test_subset"]

    def call(part, dataset, train, test, todo_methods, k, seed):
        todo = [m for m in todo_methods if run_key(part, dataset, m, k, seed) not in done and m in methods]
        for method in todo:  # one method per call: partial results after every finished run
            n_classes = len(train.class_names) if part == "fewshot" else len(train.class_names) // 2
            run_params = {method: budget(method, k, n_classes, key)}
            with CpuAccount() as cpu:
                result = run_fewshot(backbone, train, test, [method], [k], [seed], params=run_params,
                                     output_dir=out / part / dataset, cache_dir=args.cache_dir, progress=False,
                                     base_to_new=(part == "base2new"))
            run = dict(result.runs[-1], part=part, dataset=dataset, model_id=model_id,
                       params=run_params[method], n_classes=n_classes, wall_s=round(cpu.result["wall_s"], 2),
                       cpu_s=round(cpu.result["own_cpu_s"], 2), foreign_load=round(cpu.result["foreign_load"], 2))
            run["chosen"] = str(run.get("chosen"))[:300]
            runs.append(run)
            done.add(run_key(part, dataset, method, k, seed))
            extra = "" if part == "fewshot" else (f" base {100 * run['base_acc1']:.2f}% new "
                                                  + ("n/a" if run["new_acc1"] is None else
                                                     f"{100 * run['new_acc1']:.2f}%"))
            log(f"{part} {dataset} {method} {k} shots seed {seed}: {100 * run['acc1']:.2f}%{extra} "
                f"({run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} CPU-s)")
            save(record, name)

    splits: dict[str, tuple] = {}

    def data(dataset: str) -> tuple:
        if dataset not in splits:
            splits[dataset] = (seeded_subset(load_dataset(dataset, root=DATA_ROOT, split="train"), train_pool),
                               seeded_subset(load_dataset(dataset, root=DATA_ROOT, split="test"), test_subset))
            section["pools"][dataset] = len(splits[dataset][0].labels)
            log(f"{dataset}: {len(splits[dataset][0].labels)} train pool, {len(splits[dataset][1].labels)} test images")
        return splits[dataset]

    def fewshot_steps(dataset, seed_list):
        for seed in seed_list:
            for k in shots:
                first = (k, seed) == (shots[0], seeds[0])  # zero-shot needs no shots: scored once
                yield "fewshot", dataset, seed, k, every if first else [m for m in every if m != "zeroshot"]

    def b2n_steps(seed_list):
        for seed in seed_list:
            yield "base2new", "cifar10", seed, b2n_shots, (["zeroshot"] if seed == seeds[0] else []) + prompt_methods

    if args.order == "dataset":  # CIFAR-10 (all seeds), Fashion-MNIST, base-to-new
        steps = [s for d in DATASETS for s in fewshot_steps(d, seeds)] + list(b2n_steps(seeds))
    else:  # seed 1 of everything first, then seed 2, then seed 3
        steps = [s for seed in seeds for s in [*(t for d in DATASETS for t in fewshot_steps(d, [seed])),
                                               *b2n_steps([seed])]]
    start = time.perf_counter()
    for part, dataset, seed, k, step_methods in steps:
        if not [m for m in step_methods if run_key(part, dataset, m, k, seed) not in done and m in methods]:
            continue
        train, test = data(dataset)
        call(part, dataset, train, test, step_methods, k, seed)
        fill_zeroshot(section, runs, done)
    fill_zeroshot(section, runs, done)
    section["complete"] = all(run_key(p, d, m, k, s) in done for p, d, s, k, ms in steps for m in ms)
    save(record, name)
    log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
