"""CPU inference runtimes side by side: torch fp32, torch bf16 (autocast), onnxruntime fp32, int8 dynamic.

Every variant runs the full pipeline, ``embed_images`` on CIFAR-10 test images (decoded from the dataset's
files, preprocessed in DataLoader workers, embedded, written to a fresh empty feature cache of its own so
nothing is served from cache), at batch 64 and batch 1, in one process. The variants run interleaved (the
images in chunks; each round runs every variant on one chunk, the order rotated) so that load from other
processes falls on all alike; speedups are against torch fp32 at the same batch size. For each variant:
images/s, speedup, min/mean cosine of its embeddings to fp32's, and top-1 agreement of its zero-shot
predictions with fp32's (class weights from the variant's own text encoder, CIFAR-10 class names and
CLIP_benchmark's CIFAR-10 templates). Exports (ONNX) and quantisation happen before the timed runs and are
reported separately.

Also CLIP_benchmark's default zero-shot loop on the same images, written here to match its code
(``clip_benchmark/metrics/zeroshot_classification.py`` + ``cli.py`` defaults): ``torch.no_grad`` and
``torch.autocast(device, enabled=amp)`` with amp on (bf16 on a CPU), a ``DataLoader`` (batch 64, 4 workers,
no shuffle, the model's preprocess) and ``100 * normalize(encode_image) @ classifier``; its classifier is
built per class under the same autocast.

    python benchmarks/cpu_runtime.py --model SPEC [--images N] [--images-b1 M] [--rounds R] [--variants ...]

``SPEC`` is anything ``load_model`` takes; a bare open_clip architecture name means random weights.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import shutil
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from _common import DATA_ROOT, CpuAccount, header, load_average, log, md_table, model_info, write_results
from cliplab.data import Subset, load_dataset
from cliplab.data.prompts import class_prompts
from cliplab.features import class_weights, embed_images
from cliplab.models import DEFAULT_PRECISION, DEFAULT_RUNTIME, load_model
from cliplab.models.runtime import onnx_missing

NAME = "cpu_runtime"
VARIANTS = {"torch-fp32": ("fp32", "torch"), "torch-bf16": ("bf16", "torch"), "onnx-fp32": ("fp32", "onnx"),
            "int8-dynamic": ("fp32", "int8")}
DEFAULT_VARIANT = next(name for name, options in VARIANTS.items() if options == (DEFAULT_PRECISION, DEFAULT_RUNTIME))
MIN_COSINE, MIN_AGREEMENT = 0.999, 0.995  # the rule for the default
TARGET_SPEEDUP = 1.8
TEMPLATES = "cifar10"


def spread_subset(dataset, n: int):
    """``n`` items spread evenly over the dataset (all classes), or the dataset itself."""
    if n >= len(dataset):
        return dataset
    return Subset(dataset, np.linspace(0, len(dataset) - 1, n).round().astype(int))


def variant_backbone(base, name: str, onnx_dir: Path):
    """The base weights with ``name``'s precision and runtime (a shallow copy sharing the model)."""
    precision, runtime = VARIANTS[name]
    return copy.copy(base).set_inference(precision, runtime, onnx_dir=onnx_dir)


def prepare(backbone, warmup: torch.Tensor) -> dict:
    """Export / quantise both towers and warm up, outside the timed runs."""
    with CpuAccount() as cpu:
        ids = {"image": backbone.encoding_id, "text": backbone.text_encoding_id}
    with CpuAccount() as warm:
        backbone.encode_images(warmup)
        backbone.encode_images(warmup[:1])
    return {"encoding": ids, "prepare_seconds": cpu.result["wall_s"], "warmup_seconds": warm.result["wall_s"]}


def pipeline_run(backbone, dataset, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="cliplab-bench-") as cache_dir, CpuAccount() as cpu:
        out = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, progress=False)
        features = np.array(out.features)
    n = len(dataset)
    if out.computed != n or len(out) != n or out.failures:
        raise RuntimeError(f"pipeline computed {out.computed}/{n}, returned {len(out)}, failures {out.failures[:3]}")
    return {"images": n, "seconds": cpu.result["wall_s"], "images_per_s": n / cpu.result["wall_s"],
            "foreign_load": cpu.result["foreign_load"], "features": features}


def measure(backbones: dict, names: list[str], data, batch_size: int, rounds: int) -> dict[str, dict]:
    """Every variant over ``data`` in ``rounds`` interleaved chunks (round r: chunk r for each variant, the order
    rotated by r), so load from other processes falls on all variants alike; throughput = images / total time."""
    chunks = np.array_split(np.arange(len(data)), rounds)
    parts: dict[str, list[dict]] = {name: [] for name in names}
    for r, rows in enumerate(chunks):
        for name in names[r % len(names):] + names[: r % len(names)]:
            parts[name].append(pipeline_run(backbones[name], Subset(data, rows), batch_size))
    out = {}
    for name, runs in parts.items():
        seconds = sum(run["seconds"] for run in runs)
        out[name] = {"images": len(data), "seconds": seconds, "images_per_s": len(data) / seconds,
                     "foreign_load": sum(run["foreign_load"] * run["seconds"] for run in runs) / seconds,
                     "images_per_s_by_round": [run["images_per_s"] for run in runs],
                     "features": np.concatenate([run["features"] for run in runs])}
    return out


def text_weights(backbone, class_names) -> tuple[np.ndarray, float]:
    with tempfile.TemporaryDirectory(prefix="cliplab-bench-") as cache_dir, CpuAccount() as cpu:
        weights = class_weights(backbone, class_names, TEMPLATES, cache_dir=cache_dir)
    return weights, cpu.result["wall_s"]


def compare(features: np.ndarray, weights: np.ndarray, ref_features: np.ndarray, ref_pred: np.ndarray,
            labels: np.ndarray) -> dict:
    cos = (features * ref_features[: len(features)]).sum(axis=1)
    pred = (features @ weights).argmax(axis=1)
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "agreement": float((pred == ref_pred[: len(pred)]).mean()),
            "top1": float((pred == labels[: len(pred)]).mean())}


# -- CLIP_benchmark's default loop, written to match its code ---------------------------------------
class _Images(Dataset):
    """(preprocessed image, label) pairs, as CLIP_benchmark's torchvision datasets give with ``transform``."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.transform(self.dataset.load_image(index)), int(self.dataset.labels[index])


def clip_benchmark_classifier(model, tokenizer, prompts, device: str, amp: bool = True) -> torch.Tensor:
    """(d, C): per class, the renormalised mean of normalised prompt embeddings, under autocast (its defaults)."""
    with torch.no_grad(), torch.autocast(device, enabled=amp):
        columns = []
        for texts in prompts:
            embeddings = model.encode_text(tokenizer(texts).to(device))
            mean = F.normalize(embeddings, dim=-1).mean(dim=0)
            columns.append(mean / mean.norm())
        return torch.stack(columns, dim=1).to(device)


def clip_benchmark_loop(model, classifier, dataset, transform, device: str, batch_size: int = 64,
                        num_workers: int = 4, amp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets as CLIP_benchmark's ``run_classification`` computes them."""
    loader = DataLoader(_Images(dataset, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    logits, targets = [], []
    with torch.no_grad():
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            with torch.autocast(device, enabled=amp):
                features = F.normalize(model.encode_image(images), dim=-1)
                scores = 100.0 * features @ classifier
            targets.append(target.cpu())
            logits.append(scores.float().cpu())
    return torch.cat(logits), torch.cat(targets)


def run_clip_benchmark(base, dataset, class_names, ref_pred, labels) -> dict:
    model = base.model
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        return {"skipped": f"{type(model).__name__} is not an open_clip model (CLIP_benchmark loads those)"}
    prompts = class_prompts(class_names, TEMPLATES)
    with CpuAccount() as text:
        classifier = clip_benchmark_classifier(model, base.tokenize, prompts, "cpu")
    with CpuAccount() as cpu:
        logits, targets = clip_benchmark_loop(model, classifier, dataset, base.preprocess, "cpu")
    pred = logits.argmax(dim=1).numpy()
    n = len(dataset)
    return {"images": n, "seconds": cpu.result["wall_s"], "images_per_s": n / cpu.result["wall_s"],
            "foreign_load": cpu.result["foreign_load"], "text_seconds": text.result["wall_s"],
            "agreement": float((pred == ref_pred[:n]).mean()), "top1": float((pred == labels[:n]).mean()),
            "targets_match": bool((targets.numpy() == labels[:n]).all()),
            "settings": {"batch_size": 64, "num_workers": 4, "amp": True, "autocast_dtype": "bfloat16 (CPU default)"}}


def load_base(spec: str, pretrained: str | None):
    """A bare open_clip architecture name means random weights."""
    if pretrained is None and ":" not in spec and open_clip.get_model_config(spec) is not None:
        pretrained = "random"
    return load_model(spec, pretrained, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="load_model spec; a bare architecture = random weights")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--images", type=int, default=1000, help="CIFAR-10 test images at batch 64 (default 1000)")
    parser.add_argument("--images-b1", type=int, default=None, help="images at batch 1 (default: --images / 4)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved chunks per batch size (default 4)")
    parser.add_argument("--no-clip-benchmark", action="store_true", help="skip CLIP_benchmark's loop")
    parser.add_argument("--name", default=NAME, help=f"results file name (default {NAME})")
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    names = ["torch-fp32"] + [v for v in names if v != "torch-fp32"]

    record = header(NAME, __doc__.strip().splitlines()[0], args.images < 1000)
    record["load_average_start"] = load_average()
    base = load_base(args.model, args.pretrained)
    record["model"] = dict(model_info(base), spec=args.model)
    random_weights = bool(base.info.random_weights)
    test = load_dataset("cifar10", root=DATA_ROOT, split="test")
    data64 = spread_subset(test, args.images)
    n1 = args.images_b1 or max(1, len(data64) // 4)
    data1 = Subset(data64, np.arange(min(n1, len(data64))))  # the first images of the same subset
    labels = np.asarray(data64.labels)
    class_names = list(test.class_names)
    record["dataset"] = {"name": "cifar10", "split": "test", "root": str(DATA_ROOT), "images_batch64": len(data64),
                         "images_batch1": len(data1), "templates": TEMPLATES,
                         "note": "CIFAR-10 in its official pickle layout: each item decoded to a PIL image, "
                                 "then the model's preprocessing (upscaled to the model's input size)"}
    record["onnx"] = onnx_missing() or "available"
    log(f"{args.model}: {base.model_id} ({'random weights' if random_weights else 'trained weights'}); "
        f"{len(data64)} images at batch 64, {len(data1)} at batch 1; torch threads {torch.get_num_threads()}")

    warmup = torch.stack([base.preprocess(data64.load_image(i)) for i in range(min(64, len(data64)))])
    onnx_dir = Path(tempfile.mkdtemp(prefix="cliplab-onnx-"))  # a fresh export, timed in "prepared in"
    atexit.register(shutil.rmtree, onnx_dir, ignore_errors=True)
    backbones, variants = {}, {}
    for name in names:
        backbones[name] = variant_backbone(base, name, onnx_dir)
        variants[name] = prepare(backbones[name], warmup)
        weights, seconds = text_weights(backbones[name], class_names)
        variants[name].update(text_seconds=seconds, weights=weights)
        log(f"{name}: runs as {variants[name]['encoding']}, prepared in {variants[name]['prepare_seconds']:.1f}s, "
            f"class weights in {seconds:.1f}s")

    runs = []
    reference: dict[int, dict] = {}
    for batch, data in ((64, data64), (1, data1)):
        rounds = max(1, min(args.rounds, len(data) // (2 * batch)))  # a chunk of at least two batches
        measured = measure(backbones, names, data, batch, rounds)
        for name in names:
            run = measured[name]
            features = run.pop("features")
            if name == "torch-fp32":
                if batch == 64:
                    reference[64] = {"features": features,
                                     "pred": (features @ variants[name]["weights"]).argmax(axis=1)}
                fp32_rate = run["images_per_s"]
            ref = {key: value[: len(data)] for key, value in reference[64].items()}
            run.update(compare(features, variants[name]["weights"], ref["features"], ref["pred"], labels),
                       variant=name, batch_size=batch, rounds=rounds, speedup=run["images_per_s"] / fp32_rate)
            runs.append(run)
            log(f"batch {batch} {name}: {run['images_per_s']:.2f} img/s ({run['speedup']:.2f}x), cos min "
                f"{run['cos_min']:.5f}, agreement {run['agreement']:.3f}, foreign load {run['foreign_load']:.2f}")

    clip_benchmark = None
    if not args.no_clip_benchmark:
        log("CLIP_benchmark's default loop (bf16 autocast, batch 64, 4 workers) ...")
        clip_benchmark = run_clip_benchmark(base, data64, class_names, reference[64]["pred"], labels)
        if "images_per_s" in clip_benchmark:
            log(f"CLIP_benchmark loop: {clip_benchmark['images_per_s']:.2f} img/s, "
                f"agreement {clip_benchmark['agreement']:.3f}")
    for name in variants:
        variants[name].pop("weights")
    record.update(variants=variants, runs=runs, clip_benchmark=clip_benchmark, default_variant=DEFAULT_VARIANT,
                  rule={"min_cosine": MIN_COSINE, "min_agreement": MIN_AGREEMENT, "target_speedup": TARGET_SPEEDUP},
                  load_average_end=load_average())
    write_results(args.name, record, markdown(record, args.model, random_weights, runs, clip_benchmark))


def markdown(record, model: str, random_weights: bool, runs, clip_benchmark) -> str:
    weights = "random weights" if random_weights else "trained weights"
    rows = []
    for run in runs:
        rows.append([run["batch_size"], run["variant"], run["images"], f"{run['images_per_s']:.2f}",
                     f"{run['speedup']:.2f}x", " / ".join(f"{v:.1f}" for v in run["images_per_s_by_round"]),
                     f"{run['cos_min']:.5f}", f"{run['cos_mean']:.5f}", f"{100 * run['agreement']:.1f}%",
                     f"{100 * run['top1']:.1f}%", f"{run['foreign_load']:.2f}"])
    if clip_benchmark and "images_per_s" in clip_benchmark:
        fp32 = next(r["images_per_s"] for r in runs if r["batch_size"] == 64 and r["variant"] == "torch-fp32")
        rows.append([64, "CLIP_benchmark default loop (bf16 autocast)", clip_benchmark["images"],
                     f"{clip_benchmark['images_per_s']:.2f}", f"{clip_benchmark['images_per_s'] / fp32:.2f}x", "-", "-",
                     "-", f"{100 * clip_benchmark['agreement']:.1f}%", f"{100 * clip_benchmark['top1']:.1f}%",
                     f"{clip_benchmark['foreign_load']:.2f}"])
    first64 = {r["variant"]: r for r in runs if r["batch_size"] == 64}
    passing = [name for name, r in first64.items()
               if r["cos_min"] >= MIN_COSINE and r["agreement"] >= MIN_AGREEMENT]
    fastest = max(passing, key=lambda name: first64[name]["images_per_s"]) if passing else None
    default = first64.get(DEFAULT_VARIANT)
    lines = [
        f"# CPU runtime: precision and runtime side by side — {model}, {weights}",
        "",
        f"CIFAR-10 test images through the full `embed_images` pipeline (fresh empty cache per run), "
        f"{record['dataset']['images_batch64']} images at batch 64 and the first {record['dataset']['images_batch1']} "
        f"of them at batch 1. Model id `{record['model']['model_id']}` (**{weights}**). Cosine and agreement are "
        "against torch fp32's embeddings and zero-shot predictions on the same images; each variant's class weights "
        f"come from its own text encoder (CIFAR-10 names, `{TEMPLATES}` templates). Variants run interleaved: "
        "the images are split into chunks (rounds) and each round runs every variant on its chunk, the order "
        "rotated, so other processes' load falls on all alike; images/s = images / total seconds, speedup against "
        "torch fp32 at the same batch size.",
        "",
        md_table(["batch", "variant", "images", "images/s", "speedup", "img/s by round", "cos min", "cos mean",
                  "top-1 agreement",
                  "top-1 acc", "foreign load"], rows),
        "",
        "Prepared before timing (not in images/s): "
        + "; ".join(f"{name} runs as {v['encoding']['image']} / {v['encoding']['text']} (image / text), "
                    f"prepared in {v['prepare_seconds']:.1f}s, class weights {v['text_seconds']:.1f}s"
                    for name, v in record["variants"].items()) + ".",
        "",
        f"- Rule for the default (issue 12): cosine >= {MIN_COSINE} to fp32 and top-1 agreement >= "
        f"{100 * MIN_AGREEMENT:.1f}% on a real dataset with weights that carry signal. Passing here at batch 64: "
        f"{', '.join(passing) or 'none'}; fastest of those: **{fastest or 'none'}**."
        + (" With random weights this says little: rerun with trained weights." if random_weights else ""),
        f"- Current default: {DEFAULT_VARIANT} (`DEFAULT_PRECISION`/`DEFAULT_RUNTIME` in `cliplab.models.runtime`)"
        + (f", {default['speedup']:.2f}x torch fp32 at batch 64 (target {TARGET_SPEEDUP}x)" if default else "")
        + (f"; CLIP_benchmark's loop {clip_benchmark['images_per_s']:.2f} img/s vs the default's "
           f"{default['images_per_s']:.2f} img/s" if default and clip_benchmark and "images_per_s" in clip_benchmark
           else "") + ".",
        "- 'foreign load' = cores' worth of other processes' work during a variant's runs (2 cores here; "
        f"load average start {record['load_average_start']}, end {record['load_average_end']}); the rounds' "
        "spread shows the noise.",
        "- bf16 runs as torch autocast; on CPUs without AVX512-BF16/AMX (this one: AMD EPYC, AVX2) bf16 matrix "
        "products are emulated and slower than fp32. int8: `torch.ao.quantization.quantize_dynamic` on the "
        "`nn.Linear` layers (open_clip's attention in-projections are not `nn.Linear` and stay fp32). onnx: "
        "`torch.onnx.export` (dynamo) + onnxruntime CPU provider with torch's thread count.",
        "- CLIP_benchmark's loop: reimplemented to match its `zeroshot_classification.py` and `cli.py` defaults "
        "(DataLoader batch 64, 4 workers, autocast amp on = bf16 on CPU, classifier under the same autocast); "
        "its class-weight time is not in images/s"
        + (f" ({clip_benchmark['text_seconds']:.1f}s)." if clip_benchmark and "text_seconds" in clip_benchmark
           else "."),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
