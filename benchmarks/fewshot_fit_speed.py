"""Few-shot fits where users wait (issue 21 item 14): Tip-Adapter's search and the linear probe's C search, the
previous code path and today's side by side in one run, wall and CPU seconds on this machine.

1000 classes x 16 shots x 512-d synthetic features (class centres + noise + a shared direction, unit norm: a
16-shot linear probe scores about 70%, C matters), validation 4 per class, 1,000 rows predicted.
- Tip-Adapter: search (200 x 20 grid) + fit + predict; before = the serial chunk loop (``workers=1``), after =
  chunks on parallel threads. The chosen (alpha, beta) and the predictions must be equal.
- Linear probe: CoOp's full C search + final fit + predict. Before = the previous torch solver
  (``heads/logistic.py`` at commit ``--before-commit``, default ``OLD_COMMIT``, read from git: float32 passes
  throughout, search fits to 1e-6 relative decrease of H per iteration), driven as ``LinearProbe`` drives it
  (coarse list small to large, CoOp's loop, the head's fit at the chosen C polished); after = today's
  ``LinearProbe(solver="auto")``. Passes over the data (H and its gradient, or a curvature product) are counted.
  Accuracy: scikit-learn's own fit at the C each search chose (once per C) against the head on 10,000 test rows,
  and the objectives (scikit-learn's full search at 1000 classes takes about an hour: ``--sklearn-cap`` runs it
  for that many seconds, a lower bound).
- CIFAR-10 (../shared/datasets): the same searches (16 shots, 4 validation per class, from the val split; scored on
  the 10,000 test images), features of ``--model`` (default recipe:cifar10-signal if built, else tiny with random
  weights); scikit-learn's full search there is seconds, so searched heads are compared too.

    python benchmarks/fewshot_fit_speed.py [--quick] [--skip-cifar] [--sklearn-cap SECONDS] [--model NAME]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import DATA_ROOT, CpuAccount, header, load_average, log, md_table, write_results
from cliplab.heads import create_head
from cliplab.heads.base import COOP_SEARCH_LIST, coop_c_search, logistic_fits
from cliplab.heads.linear_probe import LinearProbe
from cliplab.heads.logistic import logistic_objective
from fewshot_speed import StandInBackbone

DIM, SHOTS, VAL, TEST, PREDICT = 512, 16, 4, 10, 1000
OLD_COMMIT = "5c5cad7"  # the last commit with the previous torch solver in heads/logistic.py (b8b4e57 before it)


def previous_solver(commit: str = OLD_COMMIT):
    """heads/logistic.py at ``commit`` as a module (from git), for the side-by-side run."""
    import subprocess
    import types

    source = subprocess.run(["git", "show", f"{commit}:src/cliplab/heads/logistic.py"], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).resolve().parent).stdout
    module = types.ModuleType("logistic_previous")
    exec(compile(source, f"logistic.py@{commit}", "exec"), module.__dict__)
    return module


def synthetic(classes: int, seed: int = 0, noise: float = 4.0):
    rng = np.random.default_rng(seed)
    centres, common = rng.normal(size=(classes, DIM)), rng.normal(size=DIM)

    def draw(per_class):
        y = np.repeat(np.arange(classes), per_class)
        X = centres[y] + noise * rng.normal(size=(len(y), DIM)) + noise * common
        return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), y

    return draw(SHOTS), draw(VAL), draw(TEST)


class _Stop(Exception):
    pass


def capped_sklearn_search(X, y, Xv, yv, cap: float) -> dict:
    """scikit-learn's probe search (CoOp's loop), stopped before a fit that starts after ``cap`` s."""
    fit_at = logistic_fits(X, y, 1000, 1e-4 / len(X), solver="sklearn")
    start, done = time.perf_counter(), []

    def val_accuracy(c):
        if time.perf_counter() - start > cap:
            raise _Stop
        coef, intercept, n_iter = fit_at(c)
        done.append([float(c), n_iter, round(time.perf_counter() - start, 1)])
        return float(np.mean(np.argmax(Xv @ coef.T + intercept, axis=1) == yv))

    with CpuAccount() as cpu:
        try:
            chosen, _ = coop_c_search(val_accuracy, 8)
            finished = True
        except _Stop:
            chosen, finished = None, False
    return {"finished": finished, "chosen_C": chosen, "fits": done, **cpu.result}


def tip_adapter(X, y, Xv, yv, Xt, workers: int, backbone, names, cache) -> dict:
    from cliplab.heads import tip_adapter as module

    original = module.accuracy_counts
    module.accuracy_counts = lambda *a, **k: original(*a, **k, workers=workers)
    try:
        head = create_head("tip-adapter", backbone=backbone, class_names=names, templates=["a photo of a {c}."],
                           cache_dir=cache)
        with CpuAccount() as cpu:
            head.fit(X, y, X_val=Xv, y_val=yv)
            predicted = head.predict(Xt[:PREDICT])
    finally:
        module.accuracy_counts = original
    return {"chosen": head.fit_summary(), "predicted": predicted, **cpu.result}


def probe_previous(X, y, Xv, yv, Xt, yt, commit: str = OLD_COMMIT) -> dict:
    """The previous code path: LinearProbe(solver="torch") as it was at ``commit``: the coarse list fitted
    from small to large C, CoOp's search over the previous TorchLogistic's search fits, the head = its final fit."""
    module = previous_solver(commit)
    y_index = np.searchsorted(np.unique(y), y)
    with CpuAccount() as cpu:
        fitter = module.TorchLogistic(np.asarray(X, np.float64), y_index, 1000, 1e-4 / len(X))

        def val_accuracy(c):
            coef, intercept, _ = fitter.fit(float(c))
            return float(np.mean(np.argmax(np.asarray(Xv, np.float64) @ coef.T + intercept, axis=1) == yv))

        for c in sorted(COOP_SEARCH_LIST):
            fitter.fit(float(c))
        chosen, path = coop_c_search(val_accuracy, 8)
        coef, intercept, n_iter = fitter.fit(chosen, final=True)
        np.argmax(Xt[:PREDICT] @ coef.T + intercept, axis=1)
    top1 = float(np.mean(np.argmax(Xt @ coef.T + intercept, axis=1) == yt))
    return {"C": chosen, "fits": len(fitter.solutions), "n_iter": int(n_iter), "test_top1": top1, "path": path,
            "passes": fitter.passes, "coef": coef, "intercept": intercept, **cpu.result}


def probe_new(X, y, Xv, yv, Xt, yt, solver: str = "auto") -> dict:
    from cliplab.heads import logistic

    fitters = []  # the TorchLogistic the head makes, for its pass counts
    original = logistic.TorchLogistic.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        fitters.append(self)

    logistic.TorchLogistic.__init__ = init
    try:
        with CpuAccount() as cpu:
            head = LinearProbe(solver=solver).fit(X, y, X_val=Xv, y_val=yv)
            head.predict(Xt[:PREDICT])
    finally:
        logistic.TorchLogistic.__init__ = original
    passes = {"passes": fitters[0].passes} if fitters else {}
    return {"C": head.C_, "fits": len({c for c, _ in head.search_path_}), "n_iter": int(head.n_iter_),
            "test_top1": float(np.mean(head.predict(Xt) == yt)), "path": head.search_path_,
            "coef": head.coef_, "intercept": head.intercept_, **passes, **cpu.result}


def compare_with_sklearn(run: dict, X, y, Xt, yt, done: dict | None = None) -> dict:
    """scikit-learn's own fit at the C a search chose against that search's head: test top-1 and objective
    (``done``: C -> (fit, CPU record) of earlier calls on the same data, so that a C two searches chose is fitted
    once)."""
    C = run["C"]
    done = {} if done is None else done
    if C not in done:
        with CpuAccount() as cpu:
            fit = logistic_fits(X, y, 1000, 1e-4 / len(X), solver="sklearn")(C)
        done[C] = fit, cpu
    (coef, intercept, n_iter), cpu = done[C]
    top1 = float(np.mean(np.argmax(Xt @ coef.T + intercept, axis=1) == yt))
    f_sk = logistic_objective(X, y, C, coef, intercept)
    f_run = logistic_objective(X, y, C, run["coef"], run["intercept"])
    same = float(np.mean(np.argmax(Xt @ coef.T + intercept, axis=1) ==
                         np.argmax(Xt @ run["coef"].T + run["intercept"], axis=1)))
    return {"C": C, "sklearn_top1": top1, "head_top1": run["test_top1"], "diff_points": 100 * (run["test_top1"] - top1),
            "sklearn_objective": f_sk, "head_objective": f_run, "same_prediction_fraction": same,
            "sklearn_n_iter": n_iter, "sklearn_cpu_s": cpu.result["own_cpu_s"]}


def _public(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in ("coef", "intercept")}


def cifar10(model: str | None, commit: str = OLD_COMMIT) -> dict:
    from cliplab.data import load_dataset
    from cliplab.features import embed_images
    from cliplab.models import load_model
    from cliplab.train.recipes import RecipeNotBuiltError, recipe_model

    spec = model or "recipe:cifar10-signal"
    weights = "trained (cliplab recipe, CIFAR-10 train + template captions)"
    try:
        if spec.startswith("recipe:"):  # a built recipe's folder (never a build here)
            spec = str(recipe_model(spec.split(":", 1)[1], DATA_ROOT, progress=False, build=False))
        backbone = load_model(spec, device="cpu")
    except RecipeNotBuiltError:  # the recipe is not built here: the tiny model with random weights
        if model:
            raise
        backbone, weights = load_model("tiny", device="cpu"), "tiny, random weights"
    cache = tempfile.mkdtemp(prefix="cliplab-bench-")
    pool = embed_images(backbone, load_dataset("cifar10", root=DATA_ROOT, split="val"), cache, progress=False)
    test = embed_images(backbone, load_dataset("cifar10", root=DATA_ROOT, split="test"), cache, progress=False)
    split = pool.few_shot(SHOTS, seed=1, val_k=VAL)
    X, y = np.asarray(split.train.features), np.asarray(split.train.labels)
    Xv, yv = np.asarray(split.val.features), np.asarray(split.val.labels)
    Xt, yt = np.asarray(test.features), np.asarray(test.labels)
    old = probe_previous(X, y, Xv, yv, Xt, yt, commit)
    new = probe_new(X, y, Xv, yv, Xt, yt, solver="torch")  # "auto" is scikit-learn's exact fits at this size
    sk = probe_new(X, y, Xv, yv, Xt, yt, solver="sklearn")
    fits: dict = {}
    return {"model": backbone.model_id, "weights": weights, "before": _public(old), "after": _public(new),
            "sklearn_search": _public(sk), "after_vs_sklearn_at_C": compare_with_sklearn(new, X, y, Xt, yt, fits),
            "before_vs_sklearn_at_C": compare_with_sklearn(old, X, y, Xt, yt, fits),
            "diff_points_searched": 100 * (new["test_top1"] - sk["test_top1"])}


def cifar_only(model: str | None, commit: str = OLD_COMMIT) -> None:
    """The CIFAR-10 part alone (its own results file): searches before / after / scikit-learn's, and the heads
    against scikit-learn's fit at the C each chose."""
    record = header("fewshot_fit_speed_cifar10", "Linear probe search on CIFAR-10 features: before / after / "
                    "scikit-learn (issue 21 item 14)", False)
    c10 = cifar10(model, commit)
    record["cifar10"] = c10
    record["previous_solver_commit"] = commit
    log(f"cifar10: {c10}")
    rows = []
    for label in ("before", "after"):
        a, run = c10[f"{label}_vs_sklearn_at_C"], c10[label]
        rows.append([f"{label} (torch)", f"{a['C']:.4g}", round(run["wall_s"], 1), round(run["own_cpu_s"], 2),
                     round(run["foreign_load"], 2), round(100 * a["sklearn_top1"], 2), round(100 * a["head_top1"], 2),
                     round(a["diff_points"], 2), round(100 * a["same_prediction_fraction"], 2)])
    sk = c10["sklearn_search"]
    rows.append(["scikit-learn's own search", f"{sk['C']:.4g}", round(sk["wall_s"], 1), round(sk["own_cpu_s"], 2),
                 round(sk["foreign_load"], 2), round(100 * sk["test_top1"], 2), "", "", ""])
    body = "\n".join([
        "# Linear probe search on CIFAR-10 features: before / after / scikit-learn", "",
        f"Features: {c10['model']} ({c10['weights']}); 10 classes x {SHOTS} shots, {VAL} validation per class "
        "(val split), test = the 10,000 test images. Before = heads/logistic.py at "
        f"{commit}; after = today's LinearProbe(solver='torch'); scikit-learn = LinearProbe(solver='sklearn'). "
        "Each torch head is compared with scikit-learn's own fit at the C that search chose.", "",
        md_table(["search", "C", "wall s", "CPU s", "foreign load", "scikit-learn top-1 at C (%)", "head top-1 (%)",
                  "difference (points)", "same prediction (%)"], rows), ""])
    write_results("fewshot_fit_speed_cifar10", record, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 classes instead of 1000")
    parser.add_argument("--sklearn-cap", type=float, default=0.0,
                        help="seconds for scikit-learn's own search at this size (default 0: not run)")
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--skip-tip", action="store_true")
    parser.add_argument("--model", default=None, help="CIFAR-10 features' model (default recipe:cifar10-signal)")
    parser.add_argument("--cifar-only", action="store_true",
                        help="only the CIFAR-10 comparison, written to fewshot_fit_speed_cifar10")
    parser.add_argument("--before-commit", default=OLD_COMMIT,
                        help=f"the commit whose heads/logistic.py is the 'before' linear probe (default {OLD_COMMIT})")
    args = parser.parse_args()
    if args.cifar_only:
        cifar_only(args.model, args.before_commit)
        return
    classes = 100 if args.quick else 1000
    (X, y), (Xv, yv), (Xt, yt) = synthetic(classes)
    record = header("fewshot_fit_speed", __doc__.strip().splitlines()[0], args.quick)
    record["setup"] = {"classes": classes, "shots": SHOTS, "dim": DIM, "val_per_class": VAL,
                       "test_per_class": TEST, "predict_rows": PREDICT, "load_before": load_average(),
                       "previous_solver_commit": args.before_commit}
    rows = []
    same = None
    if not args.skip_tip:
        backbone, names = StandInBackbone(), [f"class {i}" for i in range(classes)]
        cache = tempfile.mkdtemp(prefix="cliplab-bench-")
        create_head("zeroshot", backbone=backbone, class_names=names, templates=["a photo of a {c}."],
                    cache_dir=cache).fit()  # text cache warm: the text encoder's cost is not the heads'
        tips = {}
        for label, workers in (("before", 1), ("after", None)):
            tips[label] = tip_adapter(X, y, Xv, yv, Xt, workers, backbone, names, cache)
            log(f"tip-adapter {label}: {tips[label]['wall_s']:.2f} s wall, {tips[label]['own_cpu_s']:.2f} s CPU "
                f"{tips[label]['chosen']}")
        same = tips["before"]["chosen"] == tips["after"]["chosen"] and np.array_equal(
            tips["before"].pop("predicted"), tips["after"].pop("predicted"))
        record["tip_adapter"] = dict(tips, same_choice_and_predictions=bool(same))
        for label in ("before", "after"):
            t = tips[label]
            rows.append([f"tip-adapter search + fit + predict {PREDICT:,} ({label})", round(t["wall_s"], 2),
                         round(t["own_cpu_s"], 2), round(t["foreign_load"], 2), str(t["chosen"])])

    runs = {}
    for label, run in (("after", probe_new), ("before", lambda *a: probe_previous(*a, commit=args.before_commit))):
        runs[label] = run(X, y, Xv, yv, Xt, yt)  # today's first: the one awaited
        r = runs[label]
        log(f"linear probe {label}: {r['wall_s']:.1f} s wall, {r['own_cpu_s']:.1f} s CPU, C={r['C']:.4g}, "
            f"{r['fits']} fits, test {r['test_top1']:.4f}")
        rows.append([f"linear probe, full C search + predict ({label})", round(r["wall_s"], 1),
                     round(r["own_cpu_s"], 1), round(r["foreign_load"], 2),
                     f"C={r['C']:.4g}, {r['fits']} fits, {r['passes']} passes, test top-1 {100 * r['test_top1']:.2f}%"])
    record["linear_probe"] = {"before": _public(runs["before"]), "after": _public(runs["after"])}
    write_results("fewshot_fit_speed", record, "\n".join([  # the timings first (a stopped run keeps them)
        "# Few-shot fits where users wait: before / after (partial: scikit-learn comparison not run)", "",
        md_table(["what", "wall s", "CPU s", "foreign load", "result"], rows), ""]))
    sklearn_fits: dict = {}
    at_c = {label: compare_with_sklearn(runs[label], X, y, Xt, yt, sklearn_fits) for label in runs}
    for label, a in at_c.items():
        log(f"{label} at C={a['C']:.4g}: sklearn {a['sklearn_top1']:.4f}, head {a['head_top1']:.4f}")
    record["linear_probe"] = {"before": _public(runs["before"]), "after": _public(runs["after"]),
                              "vs_sklearn_at_C": at_c, "coarse_list": COOP_SEARCH_LIST}
    if args.sklearn_cap > 0:
        old = capped_sklearn_search(X, y, Xv, yv, args.sklearn_cap)
        record["linear_probe"]["sklearn_search_capped"] = old
        done = f"{len(old['fits'])} of ~16 fits done" if not old["finished"] else "finished"
        rows.append(["linear probe, full C search (scikit-learn)", ("" if old["finished"] else "> ") +
                     f"{old['wall_s']:.0f}", round(old["own_cpu_s"], 1), round(old["foreign_load"], 2),
                     f"{done}: {old['fits']}"])
    accuracy_rows = []
    for label, a in at_c.items():
        accuracy_rows.append([f"synthetic {classes} classes, {label}", f"{a['C']:.4g}",
                              round(100 * a["sklearn_top1"], 2), round(100 * a["head_top1"], 2),
                              round(a["diff_points"], 2), round(100 * a["same_prediction_fraction"], 2),
                              f"{a['sklearn_objective']:.9g}", f"{a['head_objective']:.9g}"])
    title_model = ""
    if not args.skip_cifar:
        c10 = cifar10(args.model, args.before_commit)
        record["cifar10"] = c10
        title_model = f"{c10['model']} ({c10['weights']})"
        log(f"cifar10: {c10}")
        for label in ("before", "after"):
            a = c10[f"{label}_vs_sklearn_at_C"]
            accuracy_rows.append([f"CIFAR-10, {label}", f"{a['C']:.4g}", round(100 * a["sklearn_top1"], 2),
                                  round(100 * a["head_top1"], 2), round(a["diff_points"], 2),
                                  round(100 * a["same_prediction_fraction"], 2), f"{a['sklearn_objective']:.9g}",
                                  f"{a['head_objective']:.9g}"])
        sk = c10["sklearn_search"]
        accuracy_rows.append(["CIFAR-10, each its own search (scikit-learn / after)",
                              f"{sk['C']:.4g} / {c10['after']['C']:.4g}", round(100 * sk["test_top1"], 2),
                              round(100 * c10["after"]["test_top1"], 2), round(c10["diff_points_searched"], 2),
                              "", "", ""])
        rows.append(["CIFAR-10 probe search, 10 classes x 16 shots (before / after torch / scikit-learn = 'auto')",
                     f"{c10['before']['wall_s']:.1f} / {c10['after']['wall_s']:.1f} / {sk['wall_s']:.1f}",
                     f"{c10['before']['own_cpu_s']:.1f} / {c10['after']['own_cpu_s']:.1f} / {sk['own_cpu_s']:.1f}",
                     "", ""])
    record["setup"]["load_after"] = load_average()
    tip_line = [] if same is None else [
        f"Tip-Adapter before and after chose the same (alpha, beta) and predicted the same: {same}.", ""]
    body = "\n".join([
        "# Few-shot fits where users wait: before / after", "",
        f"{classes} classes x {SHOTS} shots x {DIM}-d synthetic features (noise 4, a shared direction), validation "
        f"{VAL} per class, test {TEST} per class. Wall and own CPU seconds on this 2-core machine, shared with other "
        "work: `foreign load` is the other processes' CPU per wall second during the run (0 = the cores were ours; "
        "wall times under load are upper bounds). Before = the previous code path in the same run (linear probe: "
        f"heads/logistic.py at {args.before_commit}).", "",
        md_table(["what", "wall s", "CPU s", "foreign load", "result"], rows), "", *tip_line,
        "## Linear probe vs scikit-learn's own fit at the same C, test top-1 (%)", "",
        f"CIFAR-10 features: {title_model or 'not run'}.", "",
        md_table(["data", "C", "scikit-learn", "head", "difference (points)", "same prediction (%)",
                  "objective sklearn", "objective head"], accuracy_rows), ""])
    write_results("fewshot_fit_speed", record, body)


if __name__ == "__main__":
    main()
