"""Peak memory of ``embed_images`` vs dataset size: it should stay flat beyond the output array.

Each (model, size) runs ``embed_images`` into a fresh empty cache in a **fresh subprocess**, so peaks do not
carry over. Measured in the subprocess:

* ``VmHWM`` of the main process: the kernel's exact peak RSS, read after the run (and just before
  ``embed_images``, after imports, model and dataset load, as the baseline);
* a sampler thread (every 20 ms) over the main process and its DataLoader worker children: peak of
  main RSS + the workers' private memory (USS). Pages a forked worker still shares with the main process
  are counted once; this is the headline "main + workers" figure. Also kept: the sum of the workers'
  RSS (counts shared pages again: upper bound) and main + workers PSS (moves with unrelated processes);
* ``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the largest single (reaped) worker's peak RSS.

Reported per size: peak minus the output array (n * d * 4 bytes), and the slope of that against n in MiB
per 1,000 images (least squares over all runs); flat means a slope near 0. Data: CIFAR-10 test
(``load_dataset("cifar10")`` + ``Subset``), tiny model; plus ViT-B-32 (random weights) on fewer sizes.

    python benchmarks/memory_flat.py [--quick] [--sizes 1000,2500,5000,10000] [--vit-sizes 192,576]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import (
    DATA_ROOT,
    RESULTS_DIR,
    CpuAccount,
    MemorySampler,
    MiB,
    header,
    library_default_workers,
    load_average,
    log,
    md_table,
    memory_status,
    vm_hwm_bytes,
    write_results,
)

NAME = "memory_flat"
# Flat: what grows with n is per-item bookkeeping (ids, index rows), never image data. 2 MiB per 1,000
# images = 2 KiB per image; for comparison a decoded 32x32 CIFAR image is 3 KiB, a preprocessed tiny
# input 12 KiB, a preprocessed ViT-B-32 input 588 KiB.
FLAT_SLOPE_MIB_PER_1000 = 2.0


# -- child: one measurement -----------------------------------------------------------------------------------
def child(model: str, n: int, batch_size: int, workers: int | None, interval: float) -> dict:
    import gc

    import torch

    from cliplab.data import Subset, load_dataset
    from cliplab.features.embed import embed_images
    from cliplab.models.loader import load_model

    backbone = load_model(model, "random" if model != "tiny" else None, device="cpu")
    dataset = load_dataset("cifar10", root=DATA_ROOT, split="test")
    if n > len(dataset):
        raise SystemExit(f"only {len(dataset)} CIFAR-10 test images, asked for {n}")
    dataset = Subset(dataset, np.arange(n))
    gc.collect()
    # in-run timeline: after each forward batch, images done so far and the main process's VmHWM so far
    timeline: list[tuple[int, int, int]] = []
    original = backbone.encode_images

    def counted(images):
        out = original(images)
        done = (timeline[-1][0] if timeline else 0) + len(images)
        timeline.append((done, vm_hwm_bytes(), sampler.peak["main_rss_plus_children_uss"]))
        return out

    backbone.encode_images = counted  # instance attribute, shadows the method in this subprocess only
    baseline = memory_status()
    sampler = MemorySampler(interval=interval)
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="cliplab-mem-") as cache_dir, CpuAccount() as cpu:
        result = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=workers,
                              progress=False)
        checksum = float(np.asarray(result.features, dtype=np.float64).sum())  # touch the whole output
        rows, dim, computed = len(result), result.features.shape[1], result.computed
        peaks = sampler.stop()
        del result
    if rows != n or computed != n:
        raise RuntimeError(f"embedded {rows} rows, computed {computed}, expected {n}")
    return {
        "model": model,
        "model_id": backbone.model_id,
        "random_weights": bool(backbone.info.random_weights),
        "images": n,
        "embed_dim": dim,
        "output_bytes": n * dim * 4,
        "num_workers": workers if workers is not None else library_default_workers(backbone),
        "baseline": baseline,
        "baseline_main_hwm": baseline["VmHWM"],
        "baseline_main_rss": baseline["VmRSS"],
        "peak_main_hwm": vm_hwm_bytes(),
        "end": memory_status(),
        "peak_worker_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "sampled": peaks,
        "seconds": cpu.result["wall_s"],
        "foreign_load": cpu.result["foreign_load"],
        "torch_num_threads": torch.get_num_threads(),
        "checksum": checksum,
        "timeline": timeline,
    }


def bare_child(model: str, n: int, batch_size: int) -> dict:
    """Control: the bare ``encode_images`` loop on random tensors (no cliplab pipeline, no workers, no
    cache), n images, VmHWM after each batch. Shows how much the model's own forward moves the peak."""
    import torch

    from cliplab.models.loader import load_model

    backbone = load_model(model, "random" if model != "tiny" else None, device="cpu")
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    batch = torch.randn(batch_size, 3, size, size)
    baseline = memory_status()
    timeline = []
    for done in range(batch_size, n + batch_size, batch_size):
        count = min(batch_size, n - (done - batch_size))
        backbone.encode_images(batch[:count].clone())
        timeline.append((done - batch_size + count, vm_hwm_bytes()))
    return {"model": model, "images": n, "baseline": baseline, "peak_main_hwm": vm_hwm_bytes(),
            "timeline": timeline}


def run_child(model: str, n: int, args, bare: bool = False) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model, "--n", str(n),
               "--batch-size", str(args.batch_size), "--interval", str(args.interval), "--child-out", str(out)]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        if bare:
            cmd += ["--bare"]
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


# -- parent: sizes, repeats, slope ----------------------------------------------------------------------------
METRICS = {
    # name: (how to get bytes from a run, description)
    "main_hwm": (lambda r: r["peak_main_hwm"], "main process peak RSS (VmHWM, exact)"),
    "total": (lambda r: max(r["peak_main_hwm"], r["sampled"]["main_rss_plus_children_uss"]),
              "main + workers: peak of main RSS + workers' USS (sampled), at least the main VmHWM"),
    "total_rss_sum": (lambda r: r["peak_main_hwm"] + r["sampled"]["children_rss"],
                      "main VmHWM + workers' peak RSS sum (counts shared pages per process: upper bound)"),
    "total_pss": (lambda r: r["sampled"]["total_pss"], "main + workers PSS (sampled)"),
    "growth_main": (lambda r: r["peak_main_hwm"] - r["baseline_main_rss"],
                    "main peak RSS minus its RSS just before embed_images"),
}
HEADLINE = ("main_hwm", "total")


def slope_mib_per_1000(sizes, values_bytes) -> float:
    return fit_slope(sizes, values_bytes)[0]


def fit_slope(sizes, values_bytes) -> tuple[float, float]:
    """Least-squares slope in MiB per 1,000 images and its standard error (nan with < 4 points)."""
    x, y = np.asarray(sizes, float), np.asarray(values_bytes, float)
    if len(set(sizes)) < 2:
        return float("nan"), float("nan")
    if len(x) >= 4:
        (slope, _), cov = np.polyfit(x, y, 1, cov=True)
        se = float(np.sqrt(cov[0, 0]))
    else:
        slope, _ = np.polyfit(x, y, 1)
        se = float("nan")
    return float(slope * 1000 / MiB), se * 1000 / MiB


def in_run_growth(run: dict) -> dict:
    """How much the running peaks rose over the second half of one run, in MiB per 1,000 images.

    A pipeline whose memory does not depend on n reaches its peak after a few batches and stays there;
    memory that piles up per image keeps rising to the end.
    """
    timeline = run["timeline"]
    half = next(k for k, t in enumerate(timeline) if t[0] >= run["images"] / 2)
    done0, hwm0, total0 = timeline[half]
    done1, hwm1, total1 = timeline[-1]
    span = max(1, done1 - done0)
    reached = next(t[0] for t in timeline if t[1] == hwm1)
    return {"from_images": done0, "to_images": done1, "main_hwm": (hwm1 - hwm0) / MiB * 1000 / span,
            "total": (total1 - total0) / MiB * 1000 / span, "main_peak_reached_at_images": reached,
            "batches": len(timeline)}


def verdict(slope: float, se: float) -> str:
    """flat: slope <= threshold (one-sided: the output array, written after the forward's transient peak,
    need not add to the peak, so slopes below 0 are flat too); NOT flat: above it by more than 2 standard
    errors; else inconclusive (the spread between repeats is too large for the range of sizes)."""
    if slope <= FLAT_SLOPE_MIB_PER_1000:
        return "flat"
    if np.isfinite(se) and slope - 2 * se <= FLAT_SLOPE_MIB_PER_1000:
        return "inconclusive"
    return "NOT flat"


def summarise(model: str, runs: list[dict]) -> dict:
    sizes = sorted({r["images"] for r in runs})
    per_size = []
    for n in sizes:
        group = [r for r in runs if r["images"] == n]
        entry = {"images": n, "output_mib": group[0]["output_bytes"] / MiB, "repeats": len(group),
                 "seconds": float(np.median([r["seconds"] for r in group]))}
        for key, (get, _) in METRICS.items():
            values = [get(r) for r in group]
            entry[key + "_mib"] = float(np.median(values)) / MiB
            entry[key + "_minus_output_mib"] = (float(np.median(values)) - group[0]["output_bytes"]) / MiB
            entry[key + "_range_mib"] = (max(values) - min(values)) / MiB
        entry["peak_worker_maxrss_mib"] = float(np.median([r["peak_worker_maxrss"] for r in group])) / MiB
        entry["max_children"] = max(r["sampled"]["max_children"] for r in group)
        per_size.append(entry)
    slopes, errors = {}, {}
    for key in METRICS:
        xs = [r["images"] for r in runs]
        ys = [METRICS[key][0](r) - r["output_bytes"] for r in runs]
        slopes[key], errors[key] = fit_slope(xs, ys)
    verdicts = {k: verdict(slopes[k], errors[k]) for k in HEADLINE}
    largest = max(r["images"] for r in runs)
    in_run = [in_run_growth(r) for r in runs if r["images"] == largest]
    overall = ("NOT flat" if "NOT flat" in verdicts.values()
               else "inconclusive" if "inconclusive" in verdicts.values() else "flat")
    # an inconclusive cross-size slope is settled by the in-run check on the largest size (medians over repeats)
    largest_runs = [in_run_growth(r) for r in runs if r["images"] == max(x["images"] for x in runs)]
    in_run_flat = all(float(np.median([g[k] for g in largest_runs])) <= FLAT_SLOPE_MIB_PER_1000
                      for k in ("main_hwm", "total"))
    if overall == "inconclusive" and in_run_flat:
        overall = "flat (by the in-run check; cross-size slope inconclusive)"
    return {"model": model, "model_id": runs[0]["model_id"], "random_weights": runs[0]["random_weights"],
            "embed_dim": runs[0]["embed_dim"], "num_workers": runs[0]["num_workers"], "per_size": per_size,
            "slope_mib_per_1000_images": slopes,
            "slope_standard_error": errors,
            "verdicts": verdicts,
            "in_run_largest": {"images": largest, "runs": in_run,
                               "main_hwm_growth_mib_per_1000": float(np.median([g["main_hwm"] for g in in_run])),
                               "total_growth_mib_per_1000": float(np.median([g["total"] for g in in_run]))},
            "verdict": overall,
            "raw_slope_mib_per_1000_images": {
                key: slope_mib_per_1000([r["images"] for r in runs], [get(r) for r in runs])
                for key, (get, _) in METRICS.items()},
            "flat": overall.startswith("flat"),
            "runs": runs}


def render(record: dict) -> str:
    """The markdown body from a results record."""
    sections = []
    for m in record["models"]:
        rows = [[e["images"], f"{e['output_mib']:.2f}", f"{e['main_hwm_mib']:.1f}",
                 f"**{e['main_hwm_minus_output_mib']:.1f}**", f"{e['total_mib']:.1f}",
                 f"**{e['total_minus_output_mib']:.1f}**", f"{e['growth_main_mib']:.1f}",
                 f"{e['total_rss_sum_minus_output_mib']:.1f}", f"{e['total_pss_minus_output_mib']:.1f}",
                 f"{e['peak_worker_maxrss_mib']:.1f}", e["max_children"],
                 f"{max(e['main_hwm_range_mib'], e['total_range_mib']):.1f}", f"{e['seconds']:.1f}"]
                for e in m["per_size"]]
        s, se = m["slope_mib_per_1000_images"], m["slope_standard_error"]
        raw = m["raw_slope_mib_per_1000_images"]
        sections += [
            f"## {m['model']} (`{m['model_id']}`, random weights, d={m['embed_dim']}, "
            f"num_workers={m['num_workers']}, {m['per_size'][0]['repeats']} run(s) per size)",
            "",
            md_table(["images", "output MiB", "main peak RSS MiB", "main peak - output",
                      "main+workers peak MiB", "main+workers - output", "main growth during embed",
                      "(RSS sum - output)", "(PSS - output)", "largest worker maxrss", "workers",
                      "spread over repeats", "embed s"], rows),
            "",
            f"Slope of (peak - output) vs images, MiB per 1,000 images (± standard error): "
            f"**main peak RSS {s['main_hwm']:+.2f} ± {se['main_hwm']:.2f}**, "
            f"**main+workers {s['total']:+.2f} ± {se['total']:.2f}**; main growth {s['growth_main']:+.2f}, "
            f"RSS sum {s['total_rss_sum']:+.2f}, PSS {s['total_pss']:+.2f}; without subtracting the output: main "
            f"{raw['main_hwm']:+.2f}, main+workers {raw['total']:+.2f}. "
            f"Verdict: **{m['verdict']}** (flat: slope <= {FLAT_SLOPE_MIB_PER_1000:g} MiB per 1,000 images = "
            f"{FLAT_SLOPE_MIB_PER_1000 * 1024:.0f} bytes per image on both bold slopes; NOT flat: above it by more "
            "than 2 standard errors; else inconclusive. For scale: a decoded CIFAR image is 3 KB, a "
            "preprocessed ViT-B-32 input 602 KB, one batch of 64 of those 36.8 MiB). "
            f"Main peak RSS grows by {s['main_hwm'] * MiB / 1000:,.0f} bytes per image beyond the output array.",
            "",
            f"In-run check on the largest size ({m['in_run_largest']['images']} images): over the second half of "
            "the run the running peak rose by "
            + "; ".join(f"main {g['main_hwm']:+.2f}, main+workers {g['total']:+.2f} MiB per 1,000 images "
                        f"(main peak reached after {g['main_peak_reached_at_images']} of {g['to_images']} images)"
                        for g in m["in_run_largest"]["runs"]) + ".",
            "",
        ]
        control = m.get("control_bare_forward")
        if control:
            pipeline_peaks = [r["peak_main_hwm"] / MiB for r in m["runs"]]
            sections += [
                f"Control (fresh process, bare `encode_images` loop on {control['images']} random images, no "
                f"pipeline, no workers, no cache): peak RSS {control['peak_mib']:.1f} MiB; it rose "
                f"{control['rise_after_first_batch_mib']:.1f} MiB after the first batch (peak reached after "
                f"{control['peak_reached_at_images']} images). Pipeline runs above peaked at "
                f"{min(pipeline_peaks):.1f}-{max(pipeline_peaks):.1f} MiB (their dataset adds ~25 MiB before the "
                "forward). Step-wise rises of the peak that also appear in the bare loop come from the forward "
                "pass's allocations, not from cliplab.",
                "",
            ]
    return "\n".join([
        "# Peak memory vs dataset size — `embed_images`, random weights",
        "",
        "CIFAR-10 test images (`load_dataset('cifar10')` + `Subset`, first n), fresh empty cache, one fresh "
        "subprocess per run; medians over repeats. 'main+workers' = peak of main RSS + the workers' private "
        "memory (USS), sampled every 20 ms, and never less than the main VmHWM: pages a forked worker shares "
        "with the main process count once. 'RSS sum' counts shared pages once per process (upper bound); "
        "'PSS' also splits library pages with unrelated processes, so it moves with them. The CIFAR array "
        "(all 10,000 images, 29 MiB) is loaded for every size, so it is part of the constant. Sizes are run in "
        "alternating order across repeats so drift does not look like a slope. With ViT-B-32, runs of the same "
        "size differ by tens of MiB (about one batch of preprocessed inputs, 64 x 3 x 224 x 224 float32 = 36.8 "
        "MiB): the forward's own allocations (see the control) and how many prefetched batches are queued at "
        "the moment of the peak. The in-run check (running peak after each batch) does not depend on that.",
        "",
        *sections,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, one run per size")
    parser.add_argument("--sizes", default="1000,2500,5000,10000", help="sizes for the tiny model")
    parser.add_argument("--vit-sizes", default=None,
                        help="sizes for ViT-B-32 random (default 192,576; quick: none; '' to skip)")
    parser.add_argument("--vit-repeats", type=int, default=2, help="runs per ViT-B-32 size")
    parser.add_argument("--repeats", type=int, default=None, help="runs per tiny size (default 2, quick 1)")
    parser.add_argument("--workers", type=int, default=None, help="num_workers (default: the library default)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.02, help="memory sampling interval, s")
    parser.add_argument("--out-name", default=NAME, help="results file name (default memory_flat)")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the bare-forward control run for ViT-B-32 (fresh process, no pipeline)")
    parser.add_argument("--render-only", action="store_true",
                        help="recompute summaries and markdown from results/<out-name>.json without measuring")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.render_only:  # re-derive summaries and markdown from a results JSON (no measuring)
        path = RESULTS_DIR / f"{args.out_name}.json"
        record = json.loads(path.read_text())
        models = []
        for m in record["models"]:
            summary = summarise(m["model"], m["runs"])
            if "control_bare_forward" in m:
                summary["control_bare_forward"] = m["control_bare_forward"]
            models.append(summary)
        record["models"] = models
        record["rendered_again"] = True
        write_results(args.out_name, record, render(record))
        return

    if args.child:
        if args.bare:
            result = bare_child(args.model, args.n, args.batch_size)
        else:
            result = child(args.model, args.n, args.batch_size, args.workers, args.interval)
        Path(args.child_out).write_text(json.dumps(result))
        return

    repeats = args.repeats or (1 if args.quick else 2)
    vit_sizes = args.vit_sizes if args.vit_sizes is not None else ("" if args.quick else "192,576")
    plan = [("tiny", [int(s) for s in args.sizes.split(",") if s], repeats),
            ("ViT-B-32", [int(s) for s in vit_sizes.split(",") if s], args.vit_repeats)]
    plan = [entry for entry in plan if entry[1]]

    record = header(NAME, "peak memory of embed_images vs dataset size (fresh subprocess per size)", args.quick)
    record["load_average_start"] = load_average()
    record["method"] = __doc__
    record["flat_threshold_mib_per_1000_images"] = FLAT_SLOPE_MIB_PER_1000
    models = []
    for model, sizes, reps in plan:
        runs = []
        for rep in range(reps):
            order = sizes if rep % 2 == 0 else sizes[::-1]  # alternate order: drift does not look like a slope
            for n in order:
                log(f"{model}: {n} images (run {rep + 1}/{reps}) ...")
                run = run_child(model, n, args)
                runs.append(run)
                log(f"{model} n={n}: main VmHWM {run['peak_main_hwm'] / MiB:.1f} MiB, main RSS + workers USS "
                    f"{run['sampled']['main_rss_plus_children_uss'] / MiB:.1f} MiB, "
                    f"workers {run['sampled']['max_children']}, {run['seconds']:.1f}s, "
                    f"foreign load {run['foreign_load']:.2f}")
        summary = summarise(model, runs)
        if model != "tiny" and not args.no_control:
            n = max(sizes)
            log(f"{model}: control, bare encode_images loop on {n} random images (no pipeline) ...")
            control = run_child(model, n, args, bare=True)
            first = control["timeline"][0][1]
            summary["control_bare_forward"] = dict(
                control, peak_mib=control["peak_main_hwm"] / MiB,
                rise_after_first_batch_mib=(control["peak_main_hwm"] - first) / MiB,
                peak_reached_at_images=next(t[0] for t in control["timeline"] if t[1] == control["peak_main_hwm"]))
            log(f"{model} control: peak {control['peak_main_hwm'] / MiB:.1f} MiB, rose "
                f"{summary['control_bare_forward']['rise_after_first_batch_mib']:.1f} MiB after the first batch")
        models.append(summary)
    record["models"] = models
    record["load_average_end"] = load_average()

    write_results(args.out_name, record, render(record))


if __name__ == "__main__":
    main()
