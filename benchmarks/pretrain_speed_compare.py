"""Old vs new pretraining code, side by side: wall and CPU seconds per step of a recipe, runs interleaved (ABAB).

Each run is a fresh process with ``PYTHONPATH`` at one tree's ``src`` (the same interpreter, torch threads and
data), training the recipe's config for ``--warmup + --steps`` steps (no held-out check, into a temporary
folder); the first ``--warmup`` steps are not timed. Per step: wall seconds (``perf_counter``) and CPU seconds
of the process and all its threads (``time.process_time``). Runs alternate old, new, old, new ... so a machine
shared with other work loads both alike; the table gives medians over every timed step of each side, and the
load average around each run. ``--profile`` adds one cProfile run of the new tree (main thread, cumulative).

    python benchmarks/pretrain_speed_compare.py --old /tmp/old_cliplab [--recipe cifar10-signal] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
NEW_TREE = BENCH.parent


def child(args: argparse.Namespace) -> None:
    """One run in this process: print a JSON record of per-step wall and CPU seconds."""
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    import cliplab
    from cliplab.train import pretrain
    from cliplab.train.recipes import recipe_config

    data_root = os.environ.get("CLIPLAB_DATA", "/work/shared/datasets")
    config = recipe_config(args.recipe, data_root, steps=args.warmup + args.steps, eval_split=None)
    marks: list[tuple[float, float]] = []
    began = (time.perf_counter(), time.process_time())
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    with tempfile.TemporaryDirectory() as folder:
        pretrain(config, folder, progress=False,
                 callback=lambda step, loss: marks.append((time.perf_counter(), time.process_time())))
    top = []
    if profiler is not None:
        import pstats

        profiler.disable()
        stats = pstats.Stats(profiler)
        rows = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)
        top = [{"function": f"{Path(f).name}:{line}:{name}", "calls": cc, "own_s": round(tt, 3),
                "cumulative_s": round(ct, 3)} for (f, line, name), (cc, nc, tt, ct, _) in rows[:40]]
    marks = marks[:args.warmup + args.steps]  # the new loop calls back once more after its final save
    timed = marks[args.warmup - 1:] if args.warmup else [began] + marks
    print(json.dumps({
        "cliplab": str(Path(cliplab.__file__).resolve().parent.parent.parent), "threads": torch.get_num_threads(),
        "seconds_before_first_step": round(marks[0][0] - began[0], 2),
        "wall_per_step": [round(b[0] - a[0], 3) for a, b in zip(timed, timed[1:])],
        "cpu_per_step": [round(b[1] - a[1], 3) for a, b in zip(timed, timed[1:])],
        "profile_top": top}))


def run_one(tree: Path, args: argparse.Namespace, profile: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--recipe", args.recipe, "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if profile:
        command.append("--profile")
    load_before = os.getloadavg()
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"run of {tree} failed:\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record.update(tree=str(tree), run_seconds=round(time.perf_counter() - began, 1),
                  load_before=[round(x, 2) for x in load_before], load_after=[round(x, 2) for x in os.getloadavg()])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, help="the old tree (a git worktree of the earlier commit)")
    parser.add_argument("--recipe", default="cifar10-signal")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="old/new pairs (ABAB...)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    parser.add_argument("--profile", action="store_true", help="one more run of the new tree under cProfile")
    parser.add_argument("--name", default="pretrain_speed_compare")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.old is None:
        parser.error("--old PATH is required")
    sys.path.insert(0, str(BENCH))
    from _common import header, log, write_results

    old_commit = subprocess.run(["git", "-C", str(args.old), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    new_commit = subprocess.run(["git", "-C", str(NEW_TREE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    runs = []
    for round_ in range(args.rounds):
        for side, tree in (("old", args.old), ("new", NEW_TREE)):
            record = run_one(Path(tree), args)
            record.update(side=side, round=round_)
            runs.append(record)
            log(f"round {round_} {side}: median {statistics.median(record['wall_per_step']):.2f} s, "
                f"{statistics.median(record['cpu_per_step']):.2f} CPU s a step, load {record['load_before']}")
    summary = {}
    for side in ("old", "new"):
        wall = [x for r in runs if r["side"] == side for x in r["wall_per_step"]]
        cpu = [x for r in runs if r["side"] == side for x in r["cpu_per_step"]]
        loads = [r["load_before"][0] for r in runs if r["side"] == side] + \
                [r["load_after"][0] for r in runs if r["side"] == side]
        summary[side] = {"steps_timed": len(wall), "wall_per_step_median": round(statistics.median(wall), 3),
                         "cpu_per_step_median": round(statistics.median(cpu), 3),
                         "wall_per_step_min": min(wall), "cpu_per_step_min": min(cpu),
                         "seconds_before_first_step": [r["seconds_before_first_step"] for r in runs
                                                       if r["side"] == side],
                         "load_1min_range": [min(loads), max(loads)]}
    profile = run_one(NEW_TREE, args, profile=True)["profile_top"] if args.profile else []
    record = header(args.name, __doc__.strip().splitlines()[0], False)
    record.update(recipe=args.recipe, old_commit=old_commit, new_commit=new_commit, warmup_steps=args.warmup,
                  timed_steps=args.steps, threads=args.threads, summary=summary, runs=runs, profile_new=profile)
    old, new = summary["old"], summary["new"]
    lines = [f"# {args.recipe}: old ({old_commit}) vs new ({new_commit}) pretraining code, per step", "",
             f"Runs interleaved old/new x {args.rounds}, {args.steps} timed steps each after {args.warmup} "
             f"untimed, {args.threads} torch threads, same venv and data; medians over all timed steps.", "",
             "| code | wall s/step (median) | CPU s/step (median) | wall min | CPU min | s before 1st step "
             "| load (1 min) |", "|---|---|---|---|---|---|---|"]
    for side, s in (("old", old), ("new", new)):
        lines.append(f"| {side} | {s['wall_per_step_median']} | {s['cpu_per_step_median']} | "
                     f"{s['wall_per_step_min']} | {s['cpu_per_step_min']} | "
                     f"{', '.join(str(x) for x in s['seconds_before_first_step'])} | "
                     f"{s['load_1min_range'][0]}-{s['load_1min_range'][1]} |")
    lines += ["", f"new / old: wall {new['wall_per_step_median'] / old['wall_per_step_median']:.2f}x, "
              f"CPU {new['cpu_per_step_median'] / old['cpu_per_step_median']:.2f}x"]
    if profile:
        lines += ["", "Where the new code's time goes (cProfile, main thread, cumulative seconds over the run):", ""]
        lines += [f"- {p['function']}: {p['cumulative_s']} s ({p['calls']} calls)" for p in profile[:15]]
    write_results(args.name, record, "\n".join(lines))
    log("\n".join(lines))


if __name__ == "__main__":
    main()
