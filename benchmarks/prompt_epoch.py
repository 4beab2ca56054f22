"""Seconds per epoch of the prompt-learning methods on a 16-shot split (CPU): CoOp, CoCoOp (batch 1 as the authors,
and batch 32 with the B x C text passes batched) and, where their modules are registered, MaPLe and CLIP-SVD.

Each method is fitted through its own head (``create_head(name, ...).fit``) on 10 classes x 16 shots of synthetic
L2-normalised features (CoOp, CoCoOp: cached image features, as their fits take) or random images at the model's
input size (methods that train through the image tower and declare ``needs=("images",)``). One epoch's cost is the
fit with ``max_epoch=1`` less the fit with ``max_epoch=0`` (building the learner, SVDs, the final text pass), wall
and own CPU seconds, the median of the repeats, with the other load on the machine recorded. Models: tiny and
ViT-B-32, random weights (the time does not depend on them). Where a whole 16-shot epoch is too long for a shared
2-core CPU (ViT-B-32: CoCoOp runs its 12-layer text tower on 10 prompts per image, MaPLe and CLIP-SVD run the image
tower forward and backward), the fit on the same 16-shot split is stopped after its first ``STEPS`` steps and the
epoch is the mean time of steps 2..``STEPS`` (the first one allocates) times the steps in an epoch (steps of an
epoch are alike: same batch size and prompts); the tables say which rows are measured so.

CLIP-SVD's setup (deriving the model and the SVD of every decomposed matrix, before its first step) is timed inside
its fit (``setup``: wall and CPU seconds of ``ClipSVD._reparametrised``) and not counted in the epoch;
``--profile-svd`` also times ``torch.linalg.svd(full_matrices=False)`` of one matrix of each shape, in float64 (what
the head runs) and float32.
``--only METHOD@MODEL`` (repeatable) measures only those rows and merges them into the existing results (the other
rows stay as they were measured).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS_DIR,
    CpuAccount,
    header,
    load_average,
    log,
    md_table,
    median,
    model_info,
    write_results,
)
from cliplab.data.base import ArrayImageDataset  # noqa: E402
from cliplab.errors import CliplabError  # noqa: E402
from cliplab.heads import create_head, list_heads  # noqa: E402
from cliplab.heads.clip_svd import ClipSVD  # noqa: E402
from cliplab.models import load_model  # noqa: E402

NAME = "prompt_epoch"
CLASSES, SHOTS = 10, 16
STEPS = 4  # steps timed where an epoch is extrapolated from its steps
# (label, registered method, parameters): the methods' own defaults otherwise
VARIANTS = [
    ("CoOp (batch 32)", "coop", {}),
    ("CoCoOp (batch 1, authors')", "cocoop", {}),
    ("CoCoOp (batch 32, B x C batched)", "cocoop", {"batch_size": 32}),
    ("MaPLe", "maple", {}),
    ("CLIP-SVD", "clip-svd", {}),
]
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _inputs(backbone, needs_images: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(CLASSES), SHOTS)
    X = rng.normal(size=(len(y), backbone.embed_dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    extra = {}
    if needs_images:
        size = backbone.preprocess_config.get("size", 224)
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        images = rng.integers(0, 256, size=(len(y), size, size, 3), dtype=np.uint8)
        extra["images"] = ArrayImageDataset(images, y, NAMES, Path("synthetic"), "synthetic")
    return X, y, extra


def _fit_cost(backbone, method: str, params: dict, epochs: int, X, y, extra) -> dict:
    head = create_head(method, backbone=backbone, class_names=NAMES, max_epoch=epochs, progress=False, **params)
    with CpuAccount() as cost:
        head.fit(X, y, **extra)
    return cost.result


class _Enough(Exception):
    """Raised from the loop's callback once the timed steps are done."""


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _step_cost(backbone, method: str, params: dict, module_name: str, X, y, extra) -> dict:
    """(wall, CPU) seconds per epoch from the first STEPS steps of a 1-epoch fit: the loop is wrapped where the head's
    module and train/prompts.py call it, and its callback stops the fit after STEPS steps."""
    import cliplab.train.engine as engine

    original = engine.run_training
    seen: dict = {}

    def timed(module, objective, data, settings, **kwargs):
        seen["steps"] = len(data(0))
        marks = seen.setdefault("marks", [])

        def callback(step, loss):
            marks.append((time.perf_counter(), _own_cpu()))
            if len(marks) >= STEPS:
                raise _Enough

        return original(module, objective, data, settings, **kwargs, callback=callback)

    patched = [m for m in (importlib.import_module(module_name), importlib.import_module("cliplab.train.prompts"))
               if getattr(m, "run_training", None) is original]
    for module in patched:
        module.run_training = timed
    try:
        head = create_head(method, backbone=backbone, class_names=NAMES, max_epoch=1, progress=False, **params)
        with CpuAccount() as cost, contextlib.suppress(_Enough):
            head.fit(X, y, **extra)
    finally:
        for module in patched:
            module.run_training = original
    marks = seen.get("marks", [])
    if len(marks) < 3:
        raise CliplabError(f"{method}: only {len(marks)} steps timed")
    wall = (marks[-1][0] - marks[0][0]) / (len(marks) - 1)
    cpu = (marks[-1][1] - marks[0][1]) / (len(marks) - 1)
    return {"wall_s": wall * seen["steps"], "own_cpu_s": cpu * seen["steps"], "foreign_load": cost.result[
        "foreign_load"], "steps_per_epoch": seen["steps"], "steps_timed": len(marks) - 1}


@contextlib.contextmanager
def svd_setup(found: list):
    """While active, each CLIP-SVD fit's setup (``ClipSVD._reparametrised``: derive + SVD of every decomposed
    matrix) is timed and appended to ``found``: wall and CPU seconds, matrix count and shapes."""
    original = ClipSVD._reparametrised

    def timed(self, backbone, towers):
        with CpuAccount() as cost:
            derived, names = original(self, backbone, towers)
        shapes: dict[str, int] = {}
        for name, param in derived.model.named_parameters():
            if name.endswith("original"):  # parametrised weights: one SVD per matrix, packed q/k/v as three
                parts = 3 if "in_proj_weight" in name else 1
                shape = f"{param.shape[0] // parts}x{param.shape[1]}"
                shapes[shape] = shapes.get(shape, 0) + parts
        found.append({"wall_s": cost.result["wall_s"], "own_cpu_s": cost.result["own_cpu_s"],
                      "foreign_load": cost.result["foreign_load"], "weights": len(names), "svds": shapes,
                      "towers": list(towers)})
        return derived, names

    ClipSVD._reparametrised = timed
    try:
        yield found
    finally:
        ClipSVD._reparametrised = original


def svd_profile(shapes: dict[str, int], repeats: int = 3) -> list[dict]:
    """Per matrix shape: median wall and CPU seconds of one ``torch.linalg.svd(full_matrices=False)`` of a random
    matrix of that shape, float64 and float32, and the largest reconstruction error of the float32 one."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for shape, count in shapes.items():
        m, n = (int(v) for v in shape.split("x"))
        weight = torch.randn(m, n, generator=generator) * 0.02
        row = {"shape": shape, "count": count}
        for dtype in (torch.float64, torch.float32):
            walls, cpus = [], []
            for _ in range(repeats):
                start_wall, start_cpu = time.perf_counter(), _own_cpu()
                u, sv, vh = torch.linalg.svd(weight.to(dtype), full_matrices=False)
                walls.append(time.perf_counter() - start_wall)
                cpus.append(_own_cpu() - start_cpu)
            key = "float64" if dtype == torch.float64 else "float32"
            row[f"{key}_wall_s"], row[f"{key}_cpu_s"] = median(walls), median(cpus)
            if dtype == torch.float32:
                row["float32_max_reconstruction_error"] = float(((u * sv) @ vh - weight).abs().max())
        rows.append(row)
    return rows


def measure(backbone, repeats: int, by_steps: bool, skip: dict[str, str],
            only: set[str] | None = None) -> list[dict]:
    registered = {e.name: e for e in list_heads()}
    rows = []
    for label, method, params in VARIANTS:
        entry = registered.get(method)
        if entry is None:
            log(f"{label}: not registered here, skipped")
            continue
        if only is not None and method not in only:
            continue
        if method in skip:
            rows.append({"variant": label, "method": method, "error": f"not measured: {skip[method]}"})
            continue
        needs_images = "images" in entry.needs
        X, y, extra = _inputs(backbone, needs_images)
        walls, cpus, loads, setups, steps = [], [], [], [], None
        svd_setups: list[dict] = []  # CLIP-SVD's setups, timed inside its fits (before its first step)
        try:
            with svd_setup(svd_setups):
                for _ in range(repeats):
                    if by_steps:
                        cost = _step_cost(backbone, method, params, entry.cls.__module__, X, y, extra)
                        walls.append(cost["wall_s"])
                        cpus.append(cost["own_cpu_s"])
                        loads.append(cost["foreign_load"])
                        steps = cost["steps_per_epoch"]
                        continue
                    zero = _fit_cost(backbone, method, params, 0, X, y, extra)
                    one = _fit_cost(backbone, method, params, 1, X, y, extra)
                    walls.append(one["wall_s"] - zero["wall_s"])
                    cpus.append(one["own_cpu_s"] - zero["own_cpu_s"])
                    loads.append(one["foreign_load"])
                    setups.append(zero["wall_s"])
        except (CliplabError, TypeError, ValueError) as exc:
            log(f"{label}: {exc}")
            rows.append({"variant": label, "method": method, "error": str(exc).splitlines()[0]})
            continue
        batch = create_head(method, backbone=backbone, class_names=NAMES, **params).get_params().get("batch_size")
        setup = svd_setups[-1] if svd_setups else None  # the last fit's (the epoch's fit where two ran)
        if setup:
            log(f"{backbone.info.name} {label} setup: {setup['wall_s']:.1f} s wall, {setup['own_cpu_s']:.1f} CPU s, "
                f"{sum(setup['svds'].values())} SVDs")
        row = {"variant": label, "method": method, "params": params, "batch_size": batch, "setup": setup,
               "input": "images" if needs_images else "cached features", "items": len(y),
               "measured": f"steps 2-{STEPS}, x {steps} steps" if by_steps else "whole epoch",
               "wall_s_per_epoch": median(walls), "cpu_s_per_epoch": median(cpus),
               "setup_wall_s": median(setups) if setups else None,
               "foreign_load": median(loads), "walls": walls, "cpus": cpus}
        log(f"{backbone.info.name} {label}: {row['wall_s_per_epoch']:.2f} s wall, {row['cpu_s_per_epoch']:.2f} CPU s "
            f"per epoch (other load {row['foreign_load']:.1f} cores)")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--repeats", type=int, default=1, help="runs per method (the median is reported)")
    parser.add_argument("--skip", action="append", default=[], metavar="METHOD@MODEL=REASON",
                        help="leave one method out on one model, saying why (repeatable)")
    parser.add_argument("--only", action="append", default=[], metavar="METHOD@MODEL",
                        help="measure only this method on this model and merge it into the existing results "
                        "(repeatable)")
    parser.add_argument("--profile-svd", action="store_true",
                        help="with CLIP-SVD: time one SVD of each matrix shape in float64 and float32")
    args = parser.parse_args()
    skips: dict[str, dict[str, str]] = {}
    for item in args.skip:
        key, _, reason = item.partition("=")
        method, _, model = key.partition("@")
        skips.setdefault(model, {})[method] = reason or "left out"
    only: dict[str, set[str]] = {}
    for item in args.only:
        method, _, model = item.partition("@")
        only.setdefault(model, set()).add(method)
    repeats = args.repeats
    # (model, pretrained, epoch from its first steps): ViT-B-32's epochs are extrapolated from their first steps
    models = [("tiny", None, False)] if args.quick else [("tiny", None, False), ("ViT-B-32", "random", True)]
    if only:
        models = [m for m in models if m[0] in only]
    record = header(NAME, __doc__.strip().splitlines()[0], args.quick)
    record.update(classes=CLASSES, shots=SHOTS, repeats=repeats, device="cpu", torch_threads=torch.get_num_threads(),
                  models=[])
    path = RESULTS_DIR / f"{NAME}.json"
    if only and path.exists():  # merge: the rows not measured now stay as they were
        previous = json.loads(path.read_text())
        keys = ("started", "git", "command", "repeats", "load_average_end")
        record["models"] = previous["models"]
        record["earlier_runs"] = previous.get("earlier_runs", []) + [{k: previous.get(k) for k in keys}]
    for name, pretrained, by_steps in models:
        backbone = load_model(name, pretrained=pretrained, device="cpu") if pretrained else load_model(name,
                                                                                                        device="cpu")
        rows = measure(backbone, repeats, by_steps, skips.get(name, {}), only.get(name) if only else None)
        for row in rows:
            row["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if args.profile_svd and row.get("setup"):
                row["svd_profile"] = svd_profile(row["setup"]["svds"])
                for line in row["svd_profile"]:
                    log(f"  SVD {line}")
        entry = next((m for m in record["models"] if m["model"]["name"] == name), None)
        if entry is None:
            record["models"].append({"model": model_info(backbone), "rows": rows})
        else:
            fresh = {(r["variant"]) for r in rows}
            kept = [r for r in entry["rows"] if r["variant"] not in fresh]
            order = [label for label, _, _ in VARIANTS]
            entry["rows"] = sorted(kept + rows, key=lambda r: order.index(r["variant"]))
        _write(record, repeats)  # after each model: an interrupted run keeps what it measured


def _body_rows(record: dict) -> list[list]:
    body_rows = []
    for entry in record["models"]:
        rows, name = entry["rows"], entry["model"]["name"]
        coop = next((r for r in rows if r["method"] == "coop" and "error" not in r), None)
        for row in rows:
            shown = f"{name} (random weights)"
            if "error" in row:
                body_rows.append([shown, row["variant"], "", "", row["error"], "", "", "", "", ""])
                continue
            ratio = row["wall_s_per_epoch"] / coop["wall_s_per_epoch"] if coop else float("nan")
            setup = row.get("setup")
            if setup:
                setup_cell = f"{setup['wall_s']:.1f} / {setup['own_cpu_s']:.1f} (SVDs)"
            elif row.get("setup_wall_s") is not None:
                setup_cell = f"{row['setup_wall_s']:.2f} / –"
            else:
                setup_cell = ""
            body_rows.append([shown, row["variant"], row["input"], row["batch_size"], row["measured"],
                              row["wall_s_per_epoch"], row["cpu_s_per_epoch"], f"{ratio:.1f}x", setup_cell,
                              f"{row['foreign_load']:.1f}"])
    return body_rows


def _svd_lines(record: dict) -> list[str]:
    lines = []
    for entry in record["models"]:
        for row in entry["rows"]:
            setup = row.get("setup")
            if not setup:
                continue
            lines += ["", f"CLIP-SVD setup on {entry['model']['name']} (random weights): {setup['weights']} weights, "
                      f"{sum(setup['svds'].values())} SVDs (packed q/k/v as three), "
                      f"{setup['wall_s']:.1f} s wall / {setup['own_cpu_s']:.1f} CPU-s "
                      f"(other load {setup['foreign_load']:.1f} cores); shapes: "
                      + ", ".join(f"{k} x {v}" for k, v in setup["svds"].items()) + "."]
            profile = row.get("svd_profile")
            if profile:
                lines += ["", md_table(["matrix", "count", "float64 s (wall / CPU)", "float32 s (wall / CPU)",
                                        "float32 max abs(U S Vt - W)", "all of this shape, float64 CPU-s"],
                                       [[p["shape"], p["count"],
                                         f"{p['float64_wall_s']:.3f} / {p['float64_cpu_s']:.2f}",
                                         f"{p['float32_wall_s']:.3f} / {p['float32_cpu_s']:.2f}",
                                         f"{p['float32_max_reconstruction_error']:.1e}",
                                         f"{p['count'] * p['float64_cpu_s']:.1f}"] for p in profile])]
    return lines


def _write(record: dict, repeats: int) -> None:
    record["load_average_end"] = load_average()
    body = "\n".join([
        "# Seconds per epoch of the prompt-learning methods (CPU, random weights)", "",
        f"{CLASSES} classes x {SHOTS} shots ({CLASSES * SHOTS} items); one epoch = fit(max_epoch=1) - "
        f"fit(max_epoch=0), or (ViT-B-32) the mean of steps 2..{STEPS} of a fit times the steps an epoch has, "
        f"median of {repeats}; each method's own defaults otherwise (CoOp batch 32, CoCoOp batch 1 as the authors); "
        "CoOp and CoCoOp train on cached image features, MaPLe and CLIP-SVD on images through the image tower. "
        "Random weights: the times do not depend on them. 'other load' is the CPU (in cores) other processes used "
        "during the measurement: on a shared 2-core machine it slows every row. 'setup': the wall seconds of "
        "fit(max_epoch=0) (building the learner, CLIP-SVD's SVDs, the final text pass) where an epoch is "
        "fit(1) - fit(0); for CLIP-SVD measured by steps, the derived model and the SVD of every matrix alone "
        "(wall / CPU s), never counted in the epoch.", "",
        md_table(["model", "method", "input", "batch", "measured", "wall s / epoch", "CPU s / epoch",
                  "vs CoOp (wall)", "setup s", "other load (cores)"], _body_rows(record)),
        *_svd_lines(record),
        *([""] + ["Rows measured before this run come from earlier runs: "
                  + "; ".join(f"started {e['started']} (git {e['git']}, `{e['command']}`)"
                              for e in record.get("earlier_runs", []))
                  + ". Each row's JSON entry has its own load and time."] if record.get("earlier_runs") else []),
    ])
    write_results(NAME, record, body)


if __name__ == "__main__":
    main()
