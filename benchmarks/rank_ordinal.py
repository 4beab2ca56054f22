"""Text-driven image ranking (issue 28 item 3, paper 15): Kendall tau and pairwise accuracy on the seeded ordinal
sets, the untrained zero-shot cosine to the ranking text against the trained ranking-aware adapter, and seconds
per image.

1. Accuracy (``--model``, default ``recipe:cifar10-signal``, the 32-px ResNet trained here; its image tower has no
   patch grid at 32 px, so the adapter reads the image embedding as one token; ``--vit-model`` adds the ViT twin
   when it is built, whose 8 x 8 patch tokens the adapter reads): for each property (blur, brightness) the seeded
   set of ``--sources`` CIFAR-10 test images at levels 0..5 (level k = ImageNet-C severity k, 0 = clean), split by
   source image into train and test halves; the adapter trains on the train half only; both are scored on the test
   half, over all its images and within each source image.
2. Timing (``--timing-model``, default ``ViT-B-32:random``: random weights, timing only): seconds per image to rank
   ``--timing-images`` images zero-shot and with an (untrained) adapter reading the 7 x 7 patch tokens.

    python benchmarks/rank_ordinal.py [--quick] [--sources 400] [--epochs 20] [--width 128] [--layers 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile

from _common import DATA_ROOT, CpuAccount, benchmark_model, header, log, md_table, write_results
from cliplab.data.ordinal import ordinal_set
from cliplab.eval.ranking import evaluate_ranking, fit_ranker
from cliplab.train.rank_adapter import RankTrainSettings

PROPERTIES = ("blur", "brightness")


def _never_build(spec: str) -> bool:
    """Whether a recipe model is built (this benchmark never starts or joins a recipe build)."""
    if not spec.startswith("recipe:"):
        return True
    from cliplab.train.recipes import RecipeNotBuiltError, recipe_model

    try:
        recipe_model(spec.split(":", 1)[1], DATA_ROOT, build=False)
    except RecipeNotBuiltError:
        return False
    return True


def ridge_reference(backbone, train, test, cache: str) -> dict:
    """A reference that is not the paper's: ridge regression of the level on the image embedding (alpha by
    scikit-learn's leave-one-out CV on the train half), scored on the test half."""
    import numpy as np
    from sklearn.linear_model import RidgeCV

    from cliplab.eval.ranking import ranking_metrics
    from cliplab.features import embed_images

    a = embed_images(backbone, train, cache, progress=False)
    b = embed_images(backbone, test, cache, progress=False)
    model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(a.features, train.targets[a.indices])
    return ranking_metrics(test.targets[b.indices], model.predict(b.features), test.groups[b.indices])


def accuracy_part(spec: str, sources: int, settings: RankTrainSettings, cache: str, width: int | None,
                  layers: int, properties=PROPERTIES) -> list[dict]:
    from cliplab.train.rank_adapter import AdapterConfig

    backbone, note = benchmark_model(spec)
    config = AdapterConfig(dim=backbone.embed_dim, width=width, layers=layers)
    rows = []
    for prop in properties:
        train = ordinal_set(prop, "train", sources=sources, root=DATA_ROOT)
        test = ordinal_set(prop, "test", sources=sources, root=DATA_ROOT)
        log(f"{spec} {prop}: {len(train)} train / {len(test)} test images, text {train.text!r}")
        with CpuAccount() as zs_cpu:
            zero, _ = evaluate_ranking(backbone, test, train.text, None, cache, progress=False)
        with CpuAccount() as fit_cpu:
            ranker = fit_ranker(backbone, train, train.text, settings=settings, config=config, cache_dir=cache,
                                progress=False)
        with CpuAccount() as eval_cpu:
            fitted, _ = evaluate_ranking(backbone, test, train.text, ranker, cache, progress=False)
            seen, _ = evaluate_ranking(backbone, train, train.text, ranker, cache, progress=False)
        ridge = ridge_reference(backbone, train, test, cache)
        log(f"  zero-shot {zero}\n  adapter {fitted}\n  ridge {ridge}")
        rows.append({"ridge": ridge, "adapter_config": config.__dict__,
                     "model": spec, "weights": note, "property": prop, "text": train.text, "tokens": ranker.tokens,
                     "train_images": len(train), "test_images": len(test), "zero_shot": zero, "adapter": fitted,
                     "adapter_on_train": seen, "fit_s": ranker.seconds, "zero_shot_cpu": zs_cpu.result,
                     "fit_cpu": fit_cpu.result, "adapter_eval_cpu": eval_cpu.result})
    return rows


def timing_part(spec: str, images: int, cache: str) -> dict:
    from cliplab.data.base import Subset
    from cliplab.eval.ranking import rank_images
    from cliplab.train.rank_adapter import AdapterConfig, FittedRanker, RankAdapter, image_tokens

    backbone, note = benchmark_model(spec)
    data = ordinal_set("blur", "test", sources=2 * max(1, images // 6 + 1), root=DATA_ROOT)
    data = Subset(data, range(min(images, len(data))))
    text = "how blurry is the image"
    with CpuAccount() as zs:
        rank_images(backbone, data, text, None, cache, progress=False)
    adapter = RankAdapter(AdapterConfig(dim=backbone.embed_dim)).eval()
    ranker = FittedRanker(adapter, text, backbone.model_id, 0.0, 5.0)
    with CpuAccount() as tokens_cpu:
        tokens, _, _, source = image_tokens(backbone, data, cache)
    with CpuAccount() as ad:
        rank_images(backbone, data, None, ranker, cache, progress=False)  # tokens cached now: the adapter alone
    n = len(data)
    return {"model": spec, "weights": note, "images": n, "tokens": source,
            "zero_shot_s_per_image": zs.result["wall_s"] / n, "zero_shot_cpu_s_per_image": zs.result["own_cpu_s"] / n,
            "tokens_s_per_image": tokens_cpu.result["wall_s"] / n,
            "tokens_cpu_s_per_image": tokens_cpu.result["own_cpu_s"] / n,
            "adapter_s_per_image": ad.result["wall_s"] / n, "adapter_cpu_s_per_image": ad.result["own_cpu_s"] / n,
            "foreign_load": [zs.result["foreign_load"], tokens_cpu.result["foreign_load"], ad.result["foreign_load"]]}


def kept(args, rows: list[dict], timing: dict | None, skipped: list[str]) -> tuple[list[dict], dict, list[str]]:
    """This run's rows with the saved rows of other (model, property) pairs (saved with the same settings): the
    saved models first, then property order; the saved timing where none was measured."""
    import json

    from _common import RESULTS_DIR

    path = RESULTS_DIR / "rank_ordinal.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    settings = old.get("settings", {})
    same = (settings.get("sources") == args.sources and settings.get("train", {}).get("epochs") == args.epochs
            and all(r.get("adapter_config", {}).get("width") == args.width
                    and r.get("adapter_config", {}).get("layers") == args.layers for r in old.get("accuracy", [])))
    if not same:
        log("--keep: the saved results were made with other settings; nothing kept")
        return rows, timing, skipped
    new = {(r["model"], r["property"]) for r in rows}
    merged = [r for r in old.get("accuracy", []) if (r["model"], r["property"]) not in new] + rows
    order = list(dict.fromkeys(r["model"] for r in merged))  # saved models first, then this run's
    merged.sort(key=lambda r: (order.index(r["model"]), PROPERTIES.index(r["property"])))
    measured = {r["model"] for r in merged}
    return merged, timing or old.get("timing"), [s for s in skipped if s not in measured]


def _row(r: dict, key: str, label: str) -> list:
    m = r[key]
    return [r["property"], r["tokens"], label, m["kendall_tau"], m["pairwise_accuracy"], m["within_tau"],
            m["within_pairwise"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="recipe:cifar10-signal")
    parser.add_argument("--vit-model", default="recipe:cifar10-vit-signal")
    parser.add_argument("--timing-model", default="ViT-B-32:random")
    parser.add_argument("--sources", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--timing-images", type=int, default=24)
    parser.add_argument("--width", type=int, default=128, help="adapter width")
    parser.add_argument("--layers", type=int, default=2, help="adapter fusion blocks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a shared 2-core machine)")
    parser.add_argument("--properties", default=",".join(PROPERTIES), help="comma-separated subset of blur,brightness")
    parser.add_argument("--keep", action="store_true", help="keep the rows (and, with --timing-model '', the "
                        "timing) of results/rank_ordinal.json that this run does not measure (same --sources/--epochs/"
                        "--width/--layers): a model or property added in parts")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.sources, args.epochs, args.timing_images = 20, 3, 6
    settings = RankTrainSettings(epochs=args.epochs)
    record = header("rank_ordinal", __doc__.splitlines()[0], args.quick)
    record["settings"] = {"sources": args.sources, "train": settings.__dict__}
    cache = tempfile.mkdtemp(prefix="rank-bench-")
    try:
        rows, skipped = [], []
        for spec in (args.model, args.vit_model):
            if spec and _never_build(spec):
                rows += accuracy_part(spec, args.sources, settings, cache, args.width, args.layers,
                                      [p for p in args.properties.split(",") if p])
            elif spec:
                skipped.append(spec)
                log(f"{spec}: not built; skipped (this benchmark never builds a recipe)")
        timing = timing_part(args.timing_model, args.timing_images, cache) if args.timing_model else None
        log(f"timing {timing}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if args.keep:
        rows, timing, skipped = kept(args, rows, timing, skipped)
    record.update(accuracy=rows, timing=timing, skipped=skipped)
    sections = ["# Text-driven image ranking on seeded ordinal sets (paper 15)"]
    for spec in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == spec]
        r0 = mine[0]
        sections += [
            f"## {spec}: {r0['weights']}",
            f"{r0['train_images']} train / {r0['test_images']} test images per property ({args.sources} CIFAR-10 test "
            "images at levels 0..5, split by source image); scored on the test half; the adapter trained "
            f"{args.epochs} epochs on the train half (width {args.width}, {args.layers} fusion blocks: chosen on a "
            "validation part of the blur train half; settings in the JSON). Tau: Kendall tau-b; within: mean over "
            "the source images.",
            md_table(["property", "image tokens", "ranker", "Kendall tau", "pairwise acc.", "within tau",
                      "within pairwise"],
                     [row for r in mine for row in (_row(r, "zero_shot", "zero-shot cosine"),
                                                    _row(r, "adapter", "rank adapter"),
                                                    _row(r, "ridge", "reference: ridge on the embedding"))]),
            "The ridge row is not the paper's method: a linear regression of the level on the image embedding "
            "(alpha by leave-one-out CV on the train half), to show what a linear read-out of the same features "
            "reaches.",
            md_table(["property", "fit wall s", "fit CPU s", "adapter on train: tau"],
                     [[r["property"], r["fit_cpu"]["wall_s"], r["fit_cpu"]["own_cpu_s"],
                       r["adapter_on_train"]["kendall_tau"]] for r in mine]),
        ]
    if skipped:
        sections.append(f"Not built, so not measured: {', '.join(skipped)}.")
    t = timing
    sections += [] if t is None else [
        f"## Seconds per image, {t['model']} ({t['weights']}; timing only), {t['images']} images",
        md_table(["step", "wall s / image", "CPU s / image"],
                 [["zero-shot (embed + cosine)", t["zero_shot_s_per_image"], t["zero_shot_cpu_s_per_image"]],
                  [f"image tokens ({t['tokens']})", t["tokens_s_per_image"], t["tokens_cpu_s_per_image"]],
                  ["adapter on cached tokens", t["adapter_s_per_image"], t["adapter_cpu_s_per_image"]]]),
        f"torch threads: {args.threads} (--threads). Load from other processes during the three steps (cores): "
        + ", ".join(f"{v:.2f}" for v in t["foreign_load"]) + ".",
    ]
    write_results("rank_ordinal" + ("_quick" if args.quick else ""), record, "\n\n".join(sections))


if __name__ == "__main__":
    main()
