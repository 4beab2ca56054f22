"""How long a pretraining recipe takes here: steps per second and CPU seconds per step, from a fresh build.

Builds recipe NAME into a temporary models folder (the cached copy is not touched), timing every step through
``pretrain``'s callback: wall seconds per step (median and mean), steps per second, and CPU seconds per step
(this process and its decoding workers, ``resource.getrusage``), plus the time before the first step (reading
and decoding the images). The README's recipe durations are restated from these figures.

    python benchmarks/recipe_speed.py [--recipe cifar10-ci] [--steps N]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

from _common import DATA_ROOT, header, load_average, log, write_results
from cliplab.train import pretrain
from cliplab.train.recipes import RECIPES, recipe_config


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cifar10-ci", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=None, help="time only the first N steps (same batch, model "
                        "and data; no held-out check): the per-step cost of a long recipe in a few minutes")
    args = parser.parse_args()
    overrides = {} if args.steps is None else {"steps": args.steps, "eval_split": None}
    config = recipe_config(args.recipe, DATA_ROOT, **overrides)
    name = f"recipe_speed_{args.recipe}" + ("" if args.steps is None else f"_{args.steps}steps")
    marks: list[tuple[float, float]] = []
    load_before = load_average()
    began, cpu_began = time.perf_counter(), cpu_seconds()
    with tempfile.TemporaryDirectory() as folder:
        pretrain(config, folder, progress=False, callback=lambda step, loss: marks.append(
            (time.perf_counter(), cpu_seconds())))
    wall, cpu = time.perf_counter() - began, cpu_seconds() - cpu_began
    steps = len(marks)
    first_step = marks[0][0] - began
    gaps = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    stepping = marks[-1][0] - marks[0][0]
    cpu_stepping = marks[-1][1] - marks[0][1]
    per_step = stepping / max(steps - 1, 1)
    record = header(name, __doc__.strip().splitlines()[0], False)
    record.update(recipe=args.recipe, options=config.to_dict(), steps=steps, wall_seconds=round(wall, 1),
                  cpu_seconds=round(cpu, 1), seconds_before_first_step=round(first_step, 1),
                  seconds_per_step_median=round(statistics.median(gaps), 3) if gaps else None,
                  seconds_per_step_mean=round(per_step, 3), steps_per_second=round(1 / per_step, 3),
                  cpu_seconds_per_step=round(cpu_stepping / max(steps - 1, 1), 3),
                  load_average_before=load_before, load_average_after=load_average())
    log(f"{args.recipe}: {steps} steps, {wall / 60:.1f} min wall, {record['steps_per_second']} steps/s, "
        f"{record['cpu_seconds_per_step']} CPU s/step, {first_step:.0f} s before the first step")
    lines = [f"# {args.recipe}: build time on this machine", "",
             f"- {steps} steps x {config.batch_size} pairs in {wall / 60:.1f} min wall "
             f"({first_step:.0f} s before the first step: reading and decoding the images)",
             f"- {record['steps_per_second']} steps/s (median {record['seconds_per_step_median']} s per step), "
             f"{record['cpu_seconds_per_step']} CPU seconds per step (all threads and workers)",
             f"- load average before {load_before}, after {record['load_average_after']}"]
    write_results(name, record, "\n".join(lines))


if __name__ == "__main__":
    main()
