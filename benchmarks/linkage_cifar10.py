"""Record linkage (CLIPPINGS, paper 40, ``cliplab link``) on seeded near-duplicates of real CIFAR-10 images.

The set: each entity is one CIFAR-10 image; its ``--variants`` records are that image under a seeded random crop
(area ``CROP`` of the picture, any position, resized back to 32 px, bicubic) saved as JPEG at a seeded quality in
``QUALITY``, each with a caption paraphrase (a different cifar10 template with the image's class). Three disjoint
parts: ``--entities`` CIFAR-10 *test* images (scored), ``--tune-entities`` train-split images (the
supervised-contrastive tuning, labels = entity) and ``--val-entities`` val-split images (the threshold: the one
with the best pairwise F1 there is used on test; nothing is chosen on test). The captions name only the class, so
they cannot tell two entities of a class apart (CLIPPINGS' OCR text can): the image carries the entity.

Rows: image only (``image_weight`` 1), text only (0) and the pooled embedding (0.5, the method), each before and
after the tuning (a linear adapter on the pooled embeddings, ``eval.linkage.tune_adapter``), linking by thresholded
nearest neighbours (``--neighbours``) and connected components. The pooled rows are checked against
``link_manifest`` (what ``cliplab link`` runs) at the chosen threshold: identical scores.

Model: ``recipe:cifar10-signal`` (a 32-px ResNet CLIP trained on the CIFAR-10 train images with template captions,
never on test: it knows the classes); seconds per record also for random ``ViT-B-32`` (timing only), each through
``link_manifest`` with empty feature caches.

    python benchmarks/linkage_cifar10.py [--entities 500] [--variants 3] [--tune-entities 600] [--val-entities 200]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from _common import DATA_ROOT, CpuAccount, built_model, header, log, md_table, model_info, write_results
from cliplab.data import load_dataset
from cliplab.data.prompts import fill_template, load_templates
from cliplab.eval.linkage import (
    apply_adapter,
    clusters,
    link_manifest,
    link_pairs,
    pairwise_scores,
    pool,
    read_records,
    tune_adapter,
)

CROP = (0.55, 0.95)
QUALITY = (15, 60)
THRESHOLDS = np.round(np.arange(0.50, 1.0, 0.0025), 4)
WEIGHTS = {"image only": 1.0, "text only": 0.0, "pooled (CLIPPINGS)": 0.5}


def near_duplicates(dataset, indices, variants: int, seed: int, folder: Path, part: str) -> Path:
    """Write ``variants`` records per entity (dataset item) under ``folder``; returns the CSV manifest."""
    templates = load_templates("cifar10")
    names = list(dataset.class_names)
    labels = np.asarray(dataset.labels)
    rows = []
    for index in indices:
        rng = np.random.default_rng([seed, int(index), len(part)])
        picture = dataset.load_image(int(index)).convert("RGB")
        side = picture.size[0]
        chosen = rng.permutation(len(templates))[:variants]
        for v in range(variants):
            area = rng.uniform(*CROP)
            w = h = max(8, round(side * np.sqrt(area)))
            x, y = int(rng.integers(0, side - w + 1)), int(rng.integers(0, side - h + 1))
            crop = picture.crop((x, y, x + w, y + h)).resize((side, side), Image.BICUBIC)
            name = f"{part}-{int(index):05d}-{v}.jpg"
            crop.save(folder / name, quality=int(rng.integers(QUALITY[0], QUALITY[1] + 1)))
            rows.append({"path": name, "caption": fill_template(templates[chosen[v]], names[labels[index]]),
                         "label": f"{part}-{int(index):05d}"})
    manifest = folder / f"{part}.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def features(backbone, manifest: Path, cache: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image features, text features, entity labels) of a manifest's records, through the feature caches."""
    from cliplab.features.embed import embed_images
    from cliplab.features.text import embed_texts

    dataset, texts = read_records(manifest)
    found = embed_images(backbone, dataset, cache, num_workers=0, progress=False)
    assert not found.failures, found.failures[:3]
    image = np.empty((len(dataset), backbone.embed_dim), dtype=np.float32)
    image[np.asarray(found.indices)] = found.features
    return image, embed_texts(backbone, texts, cache), np.asarray(dataset.labels, dtype=np.int64)


def sweep(embeddings: np.ndarray, labels: np.ndarray, neighbours: int) -> list[dict]:
    """Pairwise scores at every threshold of ``THRESHOLDS``: the links at threshold t are the neighbour links at
    -1 whose cosine is at least t (what ``link_pairs`` gives at t; checked where the result is used)."""
    pairs, cosines = link_pairs(embeddings, -1.0, neighbours)
    out = []
    for t in THRESHOLDS:
        keep = cosines >= t
        out.append({"threshold": float(t), **pairwise_scores(clusters(len(labels), pairs[keep]), labels)})
    return out


def evaluate(parts: dict, neighbours: int, adapters: dict) -> list[dict]:
    rows = []
    for label, weight in WEIGHTS.items():
        for tuned in (False, True):
            if tuned and label == "text only":
                continue
            adapter = adapters[weight] if tuned else None
            embed = {k: apply_adapter(pool(p[0], p[1], weight), adapter) for k, p in parts.items()}
            val = sweep(embed["val"], parts["val"][2], neighbours)
            best = max(val, key=lambda r: (r["f1"], r["threshold"]))
            pairs, _ = link_pairs(embed["test"], best["threshold"], neighbours)
            test = pairwise_scores(clusters(len(parts["test"][2]), pairs), parts["test"][2])
            oracle = max(sweep(embed["test"], parts["test"][2], neighbours), key=lambda r: r["f1"])
            rows.append({"embedding": label, "image_weight": weight, "tuned": tuned, "threshold": best["threshold"],
                         "val": best, "test": test, "clusters": int(len(set(clusters(len(parts["test"][2]),
                                                                                      pairs).tolist()))),
                         "test_best_f1_any_threshold": {"threshold": oracle["threshold"], "f1": oracle["f1"]}})
            log(f"{label} tuned={tuned}: threshold {best['threshold']} (val F1 {best['f1']:.3f}) test {test}")
    return rows


def timing(spec: str, manifest: Path, note: str | None = None) -> dict:
    backbone, weights = built_model(spec, held_label="val zero-shot", after="", random_note="random weights: "
                                    "timing only")
    with tempfile.TemporaryDirectory() as cache, CpuAccount() as cpu:
        result = link_manifest(backbone, manifest, 0.9, 10, 0.5, cache, workers=0)
    n = len(result.images)
    return {"model": spec, "weights": note or weights, "records": n, "seconds_per_record": cpu.result["wall_s"] / n,
            "cpu_seconds_per_record": cpu.result["own_cpu_s"] / n, "foreign_load": cpu.result["foreign_load"]}


def render(record: dict) -> str:
    """The markdown of a results record (its notes at the end)."""
    args = argparse.Namespace(**record["settings"])
    note, rows, timings = record["weights"], record["rows"], record["timing"]
    embed_cpu, tuning = record["embedding_cpu"], record["tuning_cpu"]
    n = args.variants
    md = [f"# Record linkage (CLIPPINGS, paper 40) on CIFAR-10 near-duplicates · {args.model}", "",
          f"**Weights: {note}.**", "",
          f"Set: {args.entities} CIFAR-10 test images x {n} records (random crop of {CROP[0]:.0%}-{CROP[1]:.0%} of "
          f"the area resized back to 32 px, JPEG quality {QUALITY[0]}-{QUALITY[1]}, a cifar10-template caption with "
          f"the class: {args.entities * n * (n - 1) // 2} true pairs among {args.entities * n} records). Tuning: "
          f"{args.tune_entities} train-split images x {n} (supervised contrastive, linear adapter from the identity, "
          f"{args.epochs} epochs, lr {args.lr}, temperature {args.temperature}); threshold: best pairwise F1 on "
          f"{args.val_entities} val-split images x {n} (grid {THRESHOLDS[0]}-{THRESHOLDS[-1]}, step 0.0025). "
          f"Links: one of the other's {args.neighbours} nearest neighbours with cosine >= threshold; clusters: "
          "connected components.", "",
          md_table(["embedding", "tuned", "threshold (val)", "precision", "recall", "F1", "clusters",
                    "test F1 at its best threshold (not a result)"],
                   [[r["embedding"], "yes" if r["tuned"] else "no", r["threshold"], r["test"]["precision"],
                     r["test"]["recall"], r["test"]["f1"], r["clusters"],
                     f"{r['test_best_f1_any_threshold']['f1']:.3f} at {r['test_best_f1_any_threshold']['threshold']}"]
                    for r in rows]), "",
          "The last column picks the threshold on test: an upper bound that says how much the val-chosen "
          "threshold leaves, not a result. The pooled rows equal `link_manifest`'s (what `cliplab link` runs).", "",
          "## Seconds per record (`link_manifest`: embed image + caption, pool, link, cluster; empty caches)", "",
          md_table(["model", "weights", "records", "wall s / record", "CPU s / record", "foreign load (cores)"],
                   [[t["model"], t["weights"], t["records"], t["seconds_per_record"], t["cpu_seconds_per_record"],
                     t["foreign_load"]] for t in timings]), "",
          f"Embedding the three parts: {embed_cpu['wall_s']:.1f} s wall; tuning: "
          + ", ".join(f"w={k} {v['wall_s']:.1f} s" for k, v in tuning.items()) + ".", ""]
    md += record.get("notes", [])
    return "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="recipe:cifar10-signal")
    parser.add_argument("--timing-model", default="ViT-B-32:random")
    parser.add_argument("--entities", type=int, default=500)
    parser.add_argument("--variants", type=int, default=3)
    parser.add_argument("--tune-entities", type=int, default=600)
    parser.add_argument("--val-entities", type=int, default=200)
    parser.add_argument("--timing-records", type=int, default=150)
    parser.add_argument("--neighbours", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", action="store_true", help="rewrite the markdown from results/linkage_cifar10.json")
    args = parser.parse_args()
    if args.render:
        import json

        from _common import RESULTS_DIR, environment_md

        record = json.loads((RESULTS_DIR / "linkage_cifar10.json").read_text())
        (RESULTS_DIR / "linkage_cifar10.md").write_text(render(record).rstrip() + "\n\n" + environment_md(record))
        return
    import torch

    torch.set_num_threads(2)
    backbone, note = built_model(args.model, held_label="val zero-shot", after=": it knows these ten classes",
                                 random_note="random weights: the numbers say nothing about the method")
    record = header("linkage_cifar10", __doc__.splitlines()[0], quick=False)
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as cache:
        folder = Path(folder)
        manifests = {}
        for part, split, count in (("test", "test", args.entities), ("tune", "train", args.tune_entities),
                                   ("val", "val", args.val_entities)):
            data = load_dataset("cifar10", DATA_ROOT, split)
            picked = np.sort(np.random.default_rng([args.seed, len(split)]).permutation(len(data))[:count])
            manifests[part] = near_duplicates(data, picked, args.variants, args.seed, folder, part)
        log(f"records written: {', '.join(f'{k} {args.variants} x' for k in manifests)} entities")
        with CpuAccount() as embed_cpu:
            parts = {k: features(backbone, m, cache) for k, m in manifests.items()}
        adapters, tuning = {}, {}
        for weight in (1.0, 0.5):
            with CpuAccount() as cpu:
                adapters[weight] = tune_adapter(pool(parts["tune"][0], parts["tune"][1], weight), parts["tune"][2],
                                                args.epochs, args.lr, args.temperature, seed=args.seed)
            tuning[weight] = cpu.result
            log(f"adapter w={weight}: {cpu.result['wall_s']:.1f} s")
        rows = evaluate(parts, args.neighbours, adapters)
        # the pooled rows as `cliplab link` computes them (link_manifest from the manifest, features cached)
        for row in rows:
            if row["image_weight"] == 0.5:
                got = link_manifest(backbone, manifests["test"], row["threshold"], args.neighbours, 0.5, cache,
                                    workers=0, adapter=adapters[0.5] if row["tuned"] else None)
                assert abs(got.scores["f1"] - row["test"]["f1"]) < 1e-12, (got.scores, row["test"])
                row["link_manifest_f1"] = got.scores["f1"]
        timings = [timing(args.model, manifests["test"], note)]
        small = folder / "timing.csv"
        with manifests["test"].open() as handle:
            lines = handle.readlines()
        small.write_text("".join(lines[:1 + args.timing_records]))
        timings.append(timing(args.timing_model, small))
        log(f"timings {timings}")
    record.update(model=args.model, weights=note, info=model_info(backbone), settings=vars(args),
                  set={"crop_area": CROP, "jpeg_quality": QUALITY, "thresholds": [float(THRESHOLDS[0]),
                                                                                  float(THRESHOLDS[-1]), 0.0025]},
                  embedding_cpu=embed_cpu.result, tuning_cpu={str(k): v for k, v in tuning.items()}, rows=rows,
                  timing=timings)
    write_results("linkage_cifar10", record, render(record))


if __name__ == "__main__":
    main()
