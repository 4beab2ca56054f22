"""Class-incremental CIFAR-10 (issue 25): CPE-CLIP vs CoOp fine-tuned naively, 5 sessions of 2 classes, 5 shots.

After each session: accuracy on the test images of every class seen so far (arg-max over the seen classes) and the
forgetting (mean drop of each earlier session's accuracy from its best). Shots are drawn from the CIFAR-10 train
split (seeded per class), the test split is only scored (``--test-per-class`` images per class, seeded). The default
model is the ``cifar10-signal`` recipe (a 32-px ResNet image tower trained here on CIFAR-10 train with template
captions): its image tower cannot take prompts, so CPE-CLIP runs with text-side prompts only (``vision_prompts=False``,
the authors' "no_vision_prompts" ablation); ``--model tiny`` runs the full method (vision prompts) with random weights.

    python benchmarks/incremental_cifar10.py [--quick] [--model recipe:cifar10-signal | NAME]
"""

from __future__ import annotations

import argparse
import time

from _common import DATA_ROOT, benchmark_model, header, log, md_table, model_info, write_results
from cliplab.data import load_dataset
from cliplab.eval.incremental import plot_incremental, run_incremental, split_sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 test images per class")
    parser.add_argument("--model", default="recipe:cifar10-signal")
    parser.add_argument("--test-per-class", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--note", default=None, help="what the model is (replaces the weights note)")
    args = parser.parse_args()
    per_class = 50 if args.quick else args.test_per_class
    backbone, weights = benchmark_model(args.model)
    weights = args.note or weights
    train = load_dataset("cifar10", root=DATA_ROOT, split="train")
    test = load_dataset("cifar10", root=DATA_ROOT, split="test")
    sessions = split_sessions(10, 5)
    try:
        backbone.image_tower()
        vision = True
    except Exception:  # noqa: BLE001 - a ResNet image tower takes no prompts
        vision = False
    runs = {"cpe-clip": {"vision_prompts": vision}, "coop": {}}
    results, seconds = {}, {}
    for method, params in runs.items():
        start = time.perf_counter()
        cpu = time.process_time()
        results[method] = run_incremental(
            backbone, train, test, sessions, 5, method=method, params=params, seed=args.seed,
            test_per_class=per_class,
            report=lambda t, r, m=method: log(f"{m} session {t + 1}: seen {100 * r.accuracy[t]:.2f}% "
                                              f"forgetting {100 * r.forgetting[t]:.2f}%"))
        seconds[method] = {"wall": round(time.perf_counter() - start, 1), "cpu": round(time.process_time() - cpu, 1)}
    record = header("incremental_cifar10", __doc__.strip().splitlines()[0], args.quick)
    record.update(model=model_info(backbone), weights_note=weights, sessions=sessions, shots=5, seed=args.seed,
                  test_per_class=per_class, params=runs, seconds=seconds,
                  results={m: r.to_json() for m, r in results.items()})
    plot = plot_incremental(list(results.values()), "benchmarks/results/incremental_cifar10.png",
                            f"CIFAR-10, 5 sessions x 2 classes, 5 shots ({args.model})")
    rows = []
    for t, classes in enumerate(sessions):
        row = [str(t + 1), ",".join(test.class_names[c] for c in classes)]
        for m in runs:
            r = results[m]
            row += [f"{100 * r.accuracy[t]:.1f}", f"{100 * r.forgetting[t]:.1f}"]
        rows.append(row)
    columns = ["session", "new classes"] + [f"{m} {k}" for m in runs for k in ("acc seen %", "forgetting %")]
    cpe_note = ("CPE-CLIP with text-side prompts only (the model's ResNet image tower takes no prompts; the authors' "
                "no_vision_prompts ablation)" if not vision else "CPE-CLIP with prompts in both towers")
    body = "\n".join([
        f"# Class-incremental CIFAR-10: CPE-CLIP vs naive CoOp ({args.model})", "",
        f"**Weights: {weights}.** {cpe_note}; CoOp's context (\"a photo of a\", the authors' 5-shot 200 epochs) "
        "fine-tuned on each session's classes in turn with the logits of every seen class (no masking, no balance).",
        f"5 shots per class from the train split (seed {args.seed}), {per_class} test images per class.", "",
        md_table(columns, rows), "",
        "Seconds (wall / CPU): " + ", ".join(f"{m} {s['wall']} / {s['cpu']}" for m, s in seconds.items()), "",
        f"![accuracy and forgetting]({plot.name})"])
    write_results("incremental_cifar10", record, body)


if __name__ == "__main__":
    main()
