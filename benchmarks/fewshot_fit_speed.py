"""Few-shot fits where users wait (issue 21 item 14): Tip-Adapter's search and the linear probe's C search, today's
code path and the new one side by side, wall and CPU seconds on this machine.

1000 classes x 16 shots x 512-d synthetic features (class centres + noise + a shared direction, unit norm: a
16-shot linear probe scores about 70%, C matters), validation 4 per class, 1,000 rows predicted.
- Tip-Adapter: search (200 x 20 grid) + fit + predict; before = the serial chunk loop (``workers=1``, today's
  arithmetic), after = chunks on parallel threads. The chosen (alpha, beta) must be equal.
- Linear probe: CoOp's full C search + final fit + predict; before = scikit-learn's fits (``solver="sklearn"``,
  stopped at ``--cap`` seconds: a lower bound), after = warm-started L-BFGS in torch. Accuracy: scikit-learn's
  fit at the C the new search chose against the new fit on 10,000 test rows, and the objectives.
- CIFAR-10 (../shared/datasets): the same two probe searches (16 shots, 4 validation per class, from the val
  split; scored on the 10,000 test images), features of the tiny model with random weights (no cached recipe
  features on this machine).

    python benchmarks/fewshot_fit_speed.py [--quick] [--cap SECONDS]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from _common import DATA_ROOT, CpuAccount, header, load_average, log, md_table, write_results
from cliplab.heads import create_head
from cliplab.heads.base import COOP_SEARCH_LIST, coop_c_search, logistic_fits
from cliplab.heads.linear_probe import LinearProbe
from cliplab.heads.logistic import logistic_objective
from fewshot_speed import StandInBackbone

DIM, SHOTS, VAL, TEST, PREDICT = 512, 16, 4, 10, 1000


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
    """Today's probe search (scikit-learn fits, CoOp's loop), stopped before a fit that starts after ``cap`` s."""
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


def probe_new(X, y, Xv, yv, Xt, yt, solver: str = "auto") -> dict:
    with CpuAccount() as cpu:
        head = LinearProbe(solver=solver).fit(X, y, X_val=Xv, y_val=yv)
        head.predict(Xt[:PREDICT])
    return {"head": head, "C": head.C_, "fits": len({c for c, _ in head.search_path_}),
            "test_top1": float(np.mean(head.predict(Xt) == yt)), **cpu.result}


def compare_with_sklearn(head, X, y, Xt, yt) -> dict:
    """scikit-learn's fit at the head's C vs the head: test top-1 (points) and objective."""
    coef, intercept, n_iter = logistic_fits(X, y, 1000, 1e-4 / len(X), solver="sklearn")(head.C_)
    top1 = float(np.mean(np.argmax(Xt @ coef.T + intercept, axis=1) == yt))
    ours = float(np.mean(head.predict(Xt) == yt))
    f_sk = logistic_objective(X, y, head.C_, coef, intercept)
    f_new = logistic_objective(X, y, head.C_, head.coef_, head.intercept_)
    return {"C": head.C_, "sklearn_top1": top1, "torch_top1": ours, "diff_points": 100 * (ours - top1),
            "sklearn_objective": f_sk, "torch_objective": f_new, "sklearn_n_iter": n_iter}


def cifar10(cap: float) -> dict:
    from cliplab.data import load_dataset
    from cliplab.features import embed_images
    from cliplab.models import load_model

    backbone = load_model("tiny", device="cpu")
    cache = tempfile.mkdtemp(prefix="cliplab-bench-")
    pool = embed_images(backbone, load_dataset("cifar10", root=DATA_ROOT, split="val"), cache, progress=False)
    test = embed_images(backbone, load_dataset("cifar10", root=DATA_ROOT, split="test"), cache, progress=False)
    split = pool.few_shot(SHOTS, seed=1, val_k=VAL)
    X, y = np.asarray(split.train.features), np.asarray(split.train.labels)
    Xv, yv = np.asarray(split.val.features), np.asarray(split.val.labels)
    Xt, yt = np.asarray(test.features), np.asarray(test.labels)
    new = probe_new(X, y, Xv, yv, Xt, yt, solver="torch")  # "auto" would be scikit-learn's at this size
    old_head = LinearProbe(solver="sklearn")
    with CpuAccount() as cpu:
        old_head.fit(X, y, X_val=Xv, y_val=yv)
    old = {"C": old_head.C_, "test_top1": float(np.mean(old_head.predict(Xt) == yt)), **cpu.result}
    same_c = compare_with_sklearn(new.pop("head"), X, y, Xt, yt)
    return {"model": backbone.model_id, "weights": "tiny, random weights", "new": new, "old": old,
            "at_new_C": same_c, "diff_points_searched": 100 * (new["test_top1"] - old["test_top1"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 classes instead of 1000")
    parser.add_argument("--cap", type=float, default=240.0, help="seconds for today's probe search (default 240)")
    parser.add_argument("--skip-cifar", action="store_true")
    args = parser.parse_args()
    classes = 100 if args.quick else 1000
    (X, y), (Xv, yv), (Xt, yt) = synthetic(classes)
    record = header("fewshot_fit_speed", __doc__.strip().splitlines()[0], args.quick)
    record["setup"] = {"classes": classes, "shots": SHOTS, "dim": DIM, "val_per_class": VAL,
                       "test_per_class": TEST, "predict_rows": PREDICT, "load_before": load_average()}
    backbone, names = StandInBackbone(), [f"class {i}" for i in range(classes)]
    cache = tempfile.mkdtemp(prefix="cliplab-bench-")
    create_head("zeroshot", backbone=backbone, class_names=names, templates=["a photo of a {c}."],
                cache_dir=cache).fit()  # text cache warm: the text encoder's cost is not the heads'
    rows = []
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

    new = probe_new(X, y, Xv, yv, Xt, yt)
    log(f"linear probe (torch): {new['wall_s']:.1f} s wall, {new['own_cpu_s']:.1f} s CPU, C={new['C']:.4g}, "
        f"{new['fits']} fits, test {new['test_top1']:.4f}")
    old = capped_sklearn_search(X, y, Xv, yv, args.cap)
    log(f"linear probe (sklearn): finished={old['finished']} {old['wall_s']:.1f} s wall, {old['own_cpu_s']:.1f} s "
        f"CPU, fits {old['fits']}")
    at_c = compare_with_sklearn(new.pop("head"), X, y, Xt, yt)
    log(f"at C={at_c['C']:.4g}: sklearn {at_c['sklearn_top1']:.4f}, torch {at_c['torch_top1']:.4f}")
    record["linear_probe"] = {"before": old, "after": new, "at_new_C": at_c, "coarse_list": COOP_SEARCH_LIST}
    done = f"{len(old['fits'])} of ~23 fits done" if not old["finished"] else "finished"
    rows.append(["linear probe, full C search (before: scikit-learn)",
                 ("" if old["finished"] else "> ") + f"{old['wall_s']:.0f}", round(old["own_cpu_s"], 1),
                 round(old["foreign_load"], 2), f"{done}: {old['fits']}"])
    rows.append(["linear probe, full C search + predict (after: torch L-BFGS)", round(new["wall_s"], 1),
                 round(new["own_cpu_s"], 1), round(new["foreign_load"], 2),
                 f"C={new['C']:.4g}, {new['fits']} fits, test top-1 {100 * new['test_top1']:.2f}%"])
    accuracy_rows = [[f"synthetic {classes} classes", f"{at_c['C']:.4g}", round(100 * at_c["sklearn_top1"], 2),
                      round(100 * at_c["torch_top1"], 2), round(at_c["diff_points"], 2),
                      f"{at_c['sklearn_objective']:.8g}", f"{at_c['torch_objective']:.8g}"]]
    if not args.skip_cifar:
        c10 = cifar10(args.cap)
        record["cifar10"] = c10
        a = c10["at_new_C"]
        log(f"cifar10: {c10}")
        accuracy_rows.append(["CIFAR-10 (tiny, random weights), same C", f"{a['C']:.4g}",
                              round(100 * a["sklearn_top1"], 2), round(100 * a["torch_top1"], 2),
                              round(a["diff_points"], 2), f"{a['sklearn_objective']:.8g}",
                              f"{a['torch_objective']:.8g}"])
        accuracy_rows.append(["CIFAR-10, each its own search", f"{c10['old']['C']:.4g} / {c10['new']['C']:.4g}",
                              round(100 * c10["old"]["test_top1"], 2), round(100 * c10["new"]["test_top1"], 2),
                              round(c10["diff_points_searched"], 2), "", ""])
        rows.append(["CIFAR-10 probe search, 10 classes x 16 shots (scikit-learn, today and 'auto' / torch)",
                     f"{c10['old']['wall_s']:.1f} / {c10['new']['wall_s']:.1f}",
                     f"{c10['old']['own_cpu_s']:.1f} / {c10['new']['own_cpu_s']:.1f}", "", ""])
    record["setup"]["load_after"] = load_average()
    body = "\n".join([
        "# Few-shot fits where users wait: before / after", "",
        f"{classes} classes x {SHOTS} shots x {DIM}-d synthetic features (noise 4, a shared direction), validation "
        f"{VAL} per class, test {TEST} per class. Wall and own CPU seconds on this 2-core machine, shared with other "
        "work: `foreign load` is the other processes' CPU per wall second during the run (0 = the cores were ours; "
        "wall times under load are upper bounds). Before = today's code path in the same run.", "",
        md_table(["what", "wall s", "CPU s", "foreign load", "result"], rows), "",
        f"Tip-Adapter before and after chose the same (alpha, beta) and predicted the same: {same}.", "",
        "## Linear probe: torch L-BFGS vs scikit-learn, test top-1 (%)", "",
        md_table(["data", "C", "scikit-learn", "torch", "difference (points)", "objective sklearn",
                  "objective torch"], accuracy_rows), ""])
    write_results("fewshot_fit_speed", record, body)


if __name__ == "__main__":
    main()
