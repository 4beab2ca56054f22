"""Counting (issue 27 item 3): CLIP-EBC's MAE/RMSE on the synthetic counting scenes against zero-shot prompt baselines.

Scenes (``cliplab.data.counting``): 192 x 192 px, 0-50 CIFAR-10 objects of 14-20 px pasted on DTD textures;
train scenes from CIFAR-10 train images and half of the textures, test scenes from CIFAR-10 test images and the
other half (seed 0). The model (default ``recipe:cifar10-signal``, a 32-px ResNet trained here on CIFAR-10 with
template captions; the benchmark never builds a recipe) sees 32-px inputs, so counting runs on 32-px blocks
(``blocks=tiles``: every block is one model input, 6 x 6 blocks per scene). Rows:

- train mean: every test scene gets the mean training count (what a count-blind predictor scores);
- zero-shot, whole image: the scene (the model's own preprocessing, 192 -> 32 px) against "a photo of N objects."
  for N = 0..50, the best N (the issue's "how many" prompt baseline);
- zero-shot, per block: each 32-px block against "a photo of N objects." for N = 0..4, the best N summed;
- CLIP-EBC untrained: blockwise classification with the bin prompts ("There is no object.", ..., "There are more
  than four objects."), middle anchors, identity projection, s = 1/0.07;
- CLIP-EBC trained (frozen encoder; identity-initialised linear map and logit scale trained, average anchors)
  with the authors' loss (CE + DM-Count), and two ablations: CE + blockwise MAE, CE alone;
- reference: a logistic-regression probe (scikit-learn) from the same frozen block embeddings to the bins, with the
  trained counter's anchors: what the frozen features allow a linear classifier.

    python benchmarks/counting_scenes.py [--quick] [--model recipe:cifar10-signal] [--train-scenes 300]
        [--rows mean,zs-image,...] [--cache blocks.pt] [--render]

Parts: ``--rows`` measures some rows now and keeps the others from the JSON when its settings are the same;
``--cache`` keeps the block embeddings between the parts. A run with other settings (another model) starts a new
table and records the earlier rows it replaces.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from _common import DATA_ROOT, RESULTS_DIR, benchmark_model, header, log, md_table, write_results
from cliplab.data.counting import CountingSpec, block_counts, load_counting_scenes
from cliplab.regions.counting import (
    CounterConfig,
    EBCCounter,
    count_features,
    embed_blocks,
    fit_counter,
    zero_shot_counts,
)
from cliplab.train.engine import TrainSettings

RANGES = ((0, 16), (17, 33), (34, 50))


def _never_build(spec: str) -> None:
    """A recipe model must be built already: this benchmark never starts (or joins) a recipe build."""
    if spec.startswith("recipe:"):
        from cliplab.train.recipes import recipe_model

        recipe_model(spec.split(":", 1)[1], DATA_ROOT, build=False)


def scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    out = {"mae": float(np.abs(pred - truth).mean()), "rmse": float(np.sqrt(((pred - truth) ** 2).mean())),
           "mean_pred": float(pred.mean())}
    for low, high in RANGES:
        keep = (truth >= low) & (truth <= high)
        out[f"mae_{low}_{high}"] = float(np.abs(pred[keep] - truth[keep]).mean()) if keep.any() else None
    return out


@torch.no_grad()
def per_block_zero_shot(backbone, features, top: int = 4) -> np.ndarray:
    """Each block against "a photo of N objects." (N = 0..top), the best N summed over the blocks."""
    texts = [f"a photo of {n} objects." for n in range(top + 1)]
    weights = torch.nn.functional.normalize(torch.as_tensor(backbone.encode_texts(texts), dtype=torch.float32), dim=-1)
    return np.array([float((torch.nn.functional.normalize(f, dim=-1) @ weights.t()).argmax(-1).sum())
                     for f in features])


def probe_counts(train_feats, train_counts, test_feats, anchors, truncation: int = 4) -> np.ndarray:
    """Reference: logistic regression (scikit-learn, C = 100) from the normalised block embeddings to the bins,
    block count = probabilities . the trained counter's anchors, summed per scene."""
    from sklearn.linear_model import LogisticRegression

    def rows(feats):
        x = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
        return torch.nn.functional.normalize(x, dim=-1).numpy()

    y = np.minimum(np.concatenate([c.ravel() for c in train_counts]), truncation).astype(int)
    model = LogisticRegression(C=100.0, max_iter=3000).fit(rows(train_feats), y)
    probs = model.predict_proba(rows(test_feats)) @ np.asarray(anchors)[model.classes_]
    sizes = np.cumsum([0] + [f.shape[0] * f.shape[1] for f in test_feats])
    return np.array([probs[a:b].sum() for a, b in zip(sizes[:-1], sizes[1:])])


def timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - start, time.process_time() - cpu


ROWS = ("mean", "zs-image", "zs-block", "untrained", "dmcount", "mae", "ce", "probe")
VARIANTS = {"dmcount": ("CLIP-EBC trained: CE + DM-Count (authors' loss)", "dmcount", 1.0),
            "mae": ("CLIP-EBC trained: CE + blockwise MAE", "mae", 1.0),
            "ce": ("CLIP-EBC trained: CE only", "mae", 0.0)}
SETTINGS = ("model", "train_scenes", "test_scenes", "epochs", "lr", "block")


def render(record: dict) -> str:
    order = {key: k for k, key in enumerate(ROWS)}
    rows = sorted(record["rows"], key=lambda r: order.get(r.get("key"), len(ROWS)))
    body = [
        "# Counting scenes: CLIP-EBC vs zero-shot prompt baselines",
        f"Model: {record['model']} ({record['weights']}). {record['test_scenes']} test scenes (192 px, 0-50 CIFAR-10 "
        f"test objects of 14-20 px on DTD textures, mean count {record['test_count_mean']:.1f}); CLIP-EBC trained on "
        f"{record['train_scenes']} train scenes (CIFAR-10 train objects, the other DTD textures), {record['epochs']} "
        f"epochs, AdamW lr {record['lr']:g}, batch 8, frozen encoder. Blocks: {record['block']} px, each one model "
        "input (tiles). MAE per true-count range in the last columns.",
        md_table(["method", "MAE", "RMSE", "mean predicted", "MAE 0-16", "MAE 17-33", "MAE 34-50", "wall s", "CPU s"],
                 [[r["method"], r["mae"], r["rmse"], r["mean_pred"], r["mae_0_16"], r["mae_17_33"], r["mae_34_50"],
                   r["wall_s"], r["cpu_s"]] for r in rows]),
        f"Every block of the train and test scenes is embedded once ({record['embed_wall_s']:.0f} s wall, "
        f"{record['embed_cpu_s']:.0f} s CPU, not in the rows); trained rows: training and counting the test scenes "
        "from those embeddings. The encoder is frozen (the authors fine-tune ResNet encoders and add a decoder); see "
        "src/cliplab/regions/counting.py for the departures.",
    ]
    if len(record.get("runs", [])) > 1:
        body.append("Rows measured in parts (block embeddings computed once and cached between the parts): "
                    + "; ".join(f"`{r['command']}` ({r['started']})" for r in record["runs"]) + ".")
    old = record.get("replaces")
    if old:
        body.append(f"These rows replace an earlier run (started {old['started']}, git {old['git']}) on {old['model']} "
                    f"({old['weights']}), same settings: " + "; ".join(
                        f"{r['method']}: MAE {r['mae']:.2f}, RMSE {r['rmse']:.2f}" for r in old["rows"]) + ".")
    return "\n\n".join(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="recipe:cifar10-signal")
    parser.add_argument("--train-scenes", type=int, default=300)
    parser.add_argument("--test-scenes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--note", default=None, help="What the weights are, for the table (default: from the model).")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to measure now, of {', '.join(ROWS)}; the "
                        "others are kept from the JSON when it has the same settings ('probe' needs 'dmcount')")
    parser.add_argument("--cache", default=None, help="a .pt file holding the block embeddings between parts")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    args = parser.parse_args()
    if args.quick:
        args.train_scenes, args.test_scenes, args.epochs = 16, 8, 2
    name = "counting_scenes" + ("_quick" if args.quick else "")
    path = RESULTS_DIR / f"{name}.json"
    if args.render:
        record = json.loads(path.read_text())
        write_results(name, record, render(record))
        return
    wanted = args.rows.split(",")
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows: {', '.join(unknown)}")
    record = header("counting_scenes", __doc__.splitlines()[0], args.quick)
    settings = {"model": args.model, "train_scenes": args.train_scenes, "test_scenes": args.test_scenes,
                "epochs": args.epochs, "lr": args.lr, "block": args.block}
    old = json.loads(path.read_text()) if path.is_file() else None
    kept, runs = [], []
    if old and all(old.get(k) == v for k, v in settings.items()):
        kept = [r for r in old["rows"] if r.get("key") not in wanted]
        runs = old.get("runs", [])
        if old.get("replaces"):
            record["replaces"] = old["replaces"]
    elif old and not args.quick:
        record["replaces"] = {"model": old["model"], "weights": old["weights"], "started": old["started"],
                              "git": old.get("git"), "rows": [{k: r[k] for k in ("method", "mae", "rmse")}
                                                              for r in old["rows"]]}
    record["runs"] = runs + [{"command": record["command"], "started": record["started"], "git": record["git"],
                              "rows": wanted}]
    _never_build(args.model)
    backbone, note = benchmark_model(args.model)
    note = args.note or note
    train = load_counting_scenes(DATA_ROOT, "train", CountingSpec(count=args.train_scenes, seed=0))
    test = load_counting_scenes(DATA_ROOT, "test", CountingSpec(count=args.test_scenes, seed=0))
    truth = test.counts().astype(float)
    log(f"{args.model}: {len(train)} train / {len(test)} test scenes, block {args.block}, rows {', '.join(wanted)}")
    rows = list(kept)

    def add(key: str, name: str, pred: np.ndarray, wall: float, cpu: float, **extra) -> None:
        row = {"key": key, "method": name, **scores(np.asarray(pred, dtype=float), truth), "wall_s": wall,
               "cpu_s": cpu, **extra}
        rows.append(row)
        log(f"{name}: MAE {row['mae']:.2f} RMSE {row['rmse']:.2f} ({wall:.0f} s)")

    config = CounterConfig(block=args.block)
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache)
        if saved["settings"] != settings:
            parser.error(f"{cache} holds the embeddings of other settings: {saved['settings']}")
        train_feats, test_feats = saved["train"], saved["test"]
        embed_wall, embed_cpu = saved["wall_s"], saved["cpu_s"]
        log(f"block embeddings read from {cache}")
    else:
        (train_feats, test_feats), embed_wall, embed_cpu = timed(
            lambda: (embed_blocks(backbone, [train[i].image for i in range(len(train))], config),
                     embed_blocks(backbone, [test[i].image for i in range(len(test))], config)))
        log(f"embedded {sum(f.shape[0] * f.shape[1] for f in train_feats + test_feats)} blocks once "
            f"({embed_wall:.0f} s)")
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"settings": settings, "train": train_feats, "test": test_feats, "wall_s": embed_wall,
                        "cpu_s": embed_cpu}, cache)
    if "mean" in wanted:
        add("mean", "train mean (constant)", np.full(len(test), float(train.counts().mean())), 0.0, 0.0)
    if "zs-image" in wanted:
        images = [test[i].image for i in range(len(test))]
        pred, wall, cpu = timed(lambda: zero_shot_counts(backbone, images, max_count=50))
        add("zs-image", "zero-shot, whole image: 'a photo of N objects.' N=0..50", pred, wall, cpu)
    if "zs-block" in wanted:
        pred, wall, cpu = timed(lambda: per_block_zero_shot(backbone, test_feats))
        add("zs-block", "zero-shot, per block: 'a photo of N objects.' N=0..4, summed", pred, wall, cpu)
    if "untrained" in wanted:
        untrained = EBCCounter(backbone, config)
        pred, wall, cpu = timed(lambda: [r.total for r in count_features(untrained, test_feats)])
        add("untrained", "CLIP-EBC untrained (bin prompts, middle anchors)", pred, wall, cpu)
    for key, (label, loss, weight) in VARIANTS.items():
        if key not in wanted:
            continue
        config = CounterConfig(block=args.block, count_loss=loss, weight_count=weight)
        settings_ = TrainSettings(epochs=args.epochs, lr=args.lr, weight_decay=1e-4, seed=0, progress=False,
                                  desc="clip-ebc")

        def run(config=config, settings_=settings_):
            counter, result = fit_counter(backbone, train, config, settings_, features=train_feats)
            return counter, result, [r.total for r in count_features(counter, test_feats)]

        (counter, result, pred), wall, cpu = timed(run)
        scale = float(counter.logit_scale.detach().exp())
        add(key, label, pred, wall, cpu, anchors=counter.anchors.tolist(), logit_scale=scale,
            last_loss=result.last_loss, steps=result.steps)
    if "probe" in wanted:
        anchors = next((r["anchors"] for r in rows if r.get("key") == "dmcount"), None)
        if anchors is None:
            parser.error("the probe row needs the dmcount row's anchors: measure dmcount first (or with it)")
        counts = [block_counts(train[i].points, 192, 192, args.block) for i in range(len(train))]
        pred, wall, cpu = timed(lambda: probe_counts(train_feats, counts, test_feats, anchors))
        add("probe", "reference: logistic-regression probe on the same block embeddings (C=100)", pred, wall, cpu)
    record.update(settings, weights=note, scene=test.describe(), embed_wall_s=embed_wall, embed_cpu_s=embed_cpu,
                  batch_size=8, test_count_mean=float(truth.mean()), rows=rows)
    write_results(name, record, render(record))


if __name__ == "__main__":
    main()
