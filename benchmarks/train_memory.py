"""Peak memory of ``cliplab pretrain`` vs the number of training pairs: streaming reader vs the earlier bank.

The streaming reader (``train/pairs.py: PairStream``, what ``pretrain`` uses now) keeps an index array of the
usable pairs and decodes each batch's images when the batch is read; the earlier loop (git revision
``--baseline``, default 4429d21, the last one before the training engine) decoded every image into a uint8
bank first, then trained from memory.

Data: a JSONL manifest of N image-caption pairs, each with its own caption; the images are a pool of 2,000
CIFAR-10 test images saved as 32 px PNG files, each used N/2,000 times (every pair is decoded on its own, so
the bank holds N images, as with N distinct files). Model: a small open_clip ViT config at 32 px (random
weights). Each (reader, N) runs ``pretrain`` for ``--steps`` steps of ``--batch-size`` pairs (no held-out
check: a manifest without splits) in a **fresh subprocess** with an empty cache, and reports the process's
peak RSS (``VmHWM``), its RSS after imports (baseline), wall seconds and CPU seconds (user + system).
The old revision runs from ``git archive REV src`` put first on ``PYTHONPATH``, with this venv.

    python benchmarks/train_memory.py [--sizes 10000,100000] [--steps 20] [--batch-size 128] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from _common import BENCH_DIR, DATA_ROOT, MiB, header, load_average, log, md_table, write_results

NAME = "train_memory"
POOL = 2000
MODEL = {"embed_dim": 64,
         "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def make_data(folder: Path, sizes: list[int]) -> dict[int, Path]:
    """PNG pool + one manifest per size (pair k: image k mod POOL, caption 'pair k, a <class> ...')."""
    import numpy as np
    from PIL import Image

    from cliplab.data import load_dataset

    cifar = load_dataset("cifar10", root=DATA_ROOT, split="test")
    pool = folder / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(POOL):
        path = pool / f"{i:05d}.png"
        if not path.exists():
            Image.fromarray(np.asarray(cifar.images[i])).save(path)
        names.append((str(path), cifar.class_names[int(cifar.labels[i])]))
    manifests = {}
    for n in sizes:
        manifest = folder / f"pairs-{n}.jsonl"
        with open(manifest, "w") as handle:
            for k in range(n):
                path, name = names[k % POOL]
                handle.write(json.dumps({"image": path, "caption": f"pair {k}: a small photo of a {name}."}) + "\n")
        manifests[n] = manifest
    return manifests


def child(manifest: str, steps: int, batch_size: int, out: str, dataset_only: bool = False) -> None:
    """One run: pretrain on the manifest (or, with ``dataset_only``, only ``load_dataset`` of it: the part of the
    peak both readers share); prints a JSON record."""
    import torch  # noqa: F401  (imported before the baseline reading, as pretrain imports it)

    import cliplab.train.loop as loop
    from cliplab.train import PretrainConfig, pretrain

    def hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    config_path = Path(out).parent / "model.json"
    config_path.write_text(json.dumps(MODEL))
    baseline = hwm()
    usage0, began = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if dataset_only:
        from cliplab.data import load_dataset

        dataset = load_dataset(manifest)  # noqa: F841  (held until the peak is read)
        steps_done = 0
    else:
        config = PretrainConfig(source=manifest, model=str(config_path), steps=steps, batch_size=batch_size,
                                warmup=2, eval_split=None, checkpoint_every=10 * steps, eval_every=10 * steps)
        steps_done = pretrain(config, out, progress=False).steps_done
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"peak_rss_bytes": hwm(), "baseline_rss_bytes": baseline,
                      "wall_s": time.perf_counter() - began,
                      "cpu_s": (usage.ru_utime - usage0.ru_utime) + (usage.ru_stime - usage0.ru_stime),
                      "steps": steps_done, "engine": hasattr(loop, "run_training")}))


def run_child(src: Path | None, manifest: Path, steps: int, batch_size: int, work: Path, dataset_only: bool) -> dict:
    env = dict(os.environ, CLIPLAB_CACHE=str(work / "cache"))
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    out = work / "model"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(manifest), "--steps", str(steps),
               "--batch-size", str(batch_size), "--out", str(out), *(["--dataset-only"] if dataset_only else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=BENCH_DIR)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_src(rev: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "src.tar"
    with open(archive, "wb") as handle:
        subprocess.run(["git", "-C", str(BENCH_DIR.parent), "archive", rev, "src"], stdout=handle, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--baseline", default="4429d21", help="git revision of the earlier (bank) loop; '' skips it")
    parser.add_argument("--quick", action="store_true", help="sizes 2000,8000 and 5 steps")
    parser.add_argument("--child")
    parser.add_argument("--out")
    parser.add_argument("--dataset-only", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.batch_size, args.out, args.dataset_only)
        return
    if args.quick:
        args.sizes, args.steps = "2000,8000", 5
    sizes = [int(s) for s in args.sizes.split(",")]
    record = header(NAME, __doc__.split("\n\n")[0], args.quick)
    record.update(sizes=sizes, steps=args.steps, batch_size=args.batch_size, baseline=args.baseline, runs=[],
                  load_before=load_average())
    with tempfile.TemporaryDirectory(prefix="train-memory-") as tmp:
        tmp = Path(tmp)
        log("writing the PNG pool and manifests")
        manifests = make_data(tmp / "data", sizes)
        readers = [("load_dataset only (shared by both)", None), ("stream (now)", None)]
        if args.baseline:
            readers.append((f"bank ({args.baseline})", baseline_src(args.baseline, tmp / "old")))
        for n in sizes:
            for label, src in readers:
                work = tmp / f"run-{len(record['runs'])}"
                work.mkdir()
                log(f"{label}: {n:,} pairs")
                run = run_child(src, manifests[n], args.steps, args.batch_size, work, label.startswith("load_dataset"))
                run.update(reader=label, pairs=n)
                record["runs"].append(run)
                log(f"  peak {run['peak_rss_bytes'] / MiB:,.0f} MiB, {run['wall_s']:.1f} s wall, "
                    f"{run['cpu_s']:.1f} s CPU")
    record["load_after"] = load_average()
    rows = [[r["reader"], f"{r['pairs']:,}", r["peak_rss_bytes"] / MiB, (r["peak_rss_bytes"] - r["baseline_rss_bytes"])
             / MiB, r["wall_s"], r["cpu_s"]] for r in record["runs"]]
    growth = []
    for label, _ in readers:
        mine = sorted((r for r in record["runs"] if r["reader"] == label), key=lambda r: r["pairs"])
        if len(mine) >= 2:
            per_k = ((mine[-1]["peak_rss_bytes"] - mine[0]["peak_rss_bytes"]) / MiB
                     / ((mine[-1]["pairs"] - mine[0]["pairs"]) / 1000))
            growth.append(f"- {label}: {per_k:.2f} MiB of peak RSS per 1,000 more pairs")
    record["growth"] = growth
    body = "\n".join([
        "# Pretraining memory: streaming pairs vs the decoded bank",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        f"{args.steps} steps of {args.batch_size} pairs each, 32 px images, {POOL:,} distinct PNG files; peak = "
        "VmHWM of the training process; 'over baseline' = peak minus its RSS after imports.",
        "",
        md_table(["reader", "pairs", "peak RSS (MiB)", "over baseline (MiB)", "wall (s)", "CPU (s)"], rows),
        "",
        "Growth of the peak with the number of pairs (the manifest's own rows, paths and captions as Python "
        "objects, are the 'load_dataset only' line; the bank adds the decoded images, 3 KiB a pair at 32 px):",
        "",
        *growth,
        "",
        f"Load average before {record['load_before']}, after {record['load_after']} (2 cores shared: wall "
        "times are noisy, CPU seconds less so).",
        "",
    ])
    write_results(NAME, record, body)


if __name__ == "__main__":
    main()
