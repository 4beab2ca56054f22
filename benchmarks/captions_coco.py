"""Caption scoring (paper 47) and ComCLIP (paper 45) on coco_mini.

1. CLIP-S and RefCLIP-S of each image's first caption (references: its other captions) against a shuffled caption
   (the first caption of another image, a seeded derangement; same references): mean scores and the fraction of
   images whose real caption scores higher (pairwise accuracy).
2. The grammar head (CLIP-Caption-Reward) trained on the train split's captions and one corruption each (20% of
   the captions held out), accuracy on the held-out pairs, per corruption.
3. Winoground-style text / image / group scores of CLIP and ComCLIP on the seeded swapped-caption pairs
   (``eval.swapped_pairs``: mirror and real pairs from the COCO boxes).

Seconds per item are wall seconds over the items (first use of the model's feature caches: nothing cached).
``ViT-B-32`` has random weights here (timing only: its scores say nothing about the methods);
``recipe:cifar10-signal`` is a 32-px model trained on CIFAR-10 with template captions: it carries signal for
CIFAR's ten classes, not for COCO's captions, so its numbers are near chance too (said so in the table).

    python benchmarks/captions_coco.py [--models ViT-B-32,recipe:cifar10-signal]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from _common import DATA_ROOT, CpuAccount, benchmark_model, header, log, md_table, model_info, write_results
from cliplab.eval.caption_grammar import train_grammar
from cliplab.eval.captions import CaptionRow, score_rows
from cliplab.eval.swapped_pairs import evaluate_pairs, swapped_pairs

COCO = DATA_ROOT / "coco_mini"


def derangement(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        if not np.any(order == np.arange(n)):
            return order


def caption_scores(backbone, cache: str, seed: int) -> dict:
    from cliplab.data import load_dataset

    data = load_dataset("coco", DATA_ROOT, "test")
    keep = [i for i, caps in enumerate(data.captions) if len(caps) >= 2]
    paths = [str(data.paths[i]) for i in keep]
    firsts = [data.captions[i][0] for i in keep]
    refs = [data.captions[i][1:] for i in keep]
    other = derangement(len(keep), seed)
    real_rows = [CaptionRow(p, c, r) for p, c, r in zip(paths, firsts, refs)]
    shuffled_rows = [CaptionRow(p, firsts[j], r) for p, j, r in zip(paths, other, refs)]
    with CpuAccount() as cpu:
        real = score_rows(backbone, real_rows, cache).rows
    timing = cpu.result
    shuffled = score_rows(backbone, shuffled_rows, cache).rows
    out = {"images": len(keep), "seconds_per_caption": timing["wall_s"] / len(keep),
           "cpu_seconds_per_caption": timing["own_cpu_s"] / len(keep), "foreign_load": timing["foreign_load"]}
    for key in ("clip_s", "refclip_s"):
        a = np.array([r[key] for r in real])
        b = np.array([r[key] for r in shuffled])
        out[key] = {"real_mean": float(a.mean()), "shuffled_mean": float(b.mean()),
                    "pairwise_accuracy": float(np.mean(a > b) + 0.5 * np.mean(a == b))}
    return out


def grammar(backbone, cache: str, seed: int) -> dict:
    from cliplab.data import load_dataset

    data = load_dataset("coco", DATA_ROOT, "train")
    corpus = [c for caps in data.captions for c in caps]
    with CpuAccount() as cpu:
        fit = train_grammar(backbone, corpus, cache, seed=seed, progress=False)
    return {"captions": len(corpus), "train_accuracy": fit.train_accuracy, "held_out_accuracy": fit.held_out_accuracy,
            "held_out_negatives_caught": fit.kinds, "seconds": cpu.result["wall_s"],
            "cpu_seconds": cpu.result["own_cpu_s"]}


def winoground(backbone, cache: str, seed: int) -> dict:
    pairs = swapped_pairs(COCO, seed=seed)
    with CpuAccount() as cpu:
        result = evaluate_pairs(backbone, pairs, cache)
    result.pop("tables")
    result["seconds_per_item"] = cpu.result["wall_s"] / (4 * len(pairs))  # both methods, one pass
    result["cpu_seconds_per_item"] = cpu.result["own_cpu_s"] / (4 * len(pairs))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ViT-B-32,recipe:cifar10-signal")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    record = header("captions_coco", __doc__.splitlines()[0], quick=False)
    record["runs"] = []
    md = ["# Caption scoring (CLIP-S, RefCLIP-S, grammar head) and ComCLIP on coco_mini", ""]
    for spec in args.models.split(","):
        log(f"model {spec}")
        if spec == "ViT-B-32":
            from cliplab.models import load_model

            backbone, note = load_model("ViT-B-32", "random", device="cpu"), "random weights: timing only"
        else:
            backbone, note = benchmark_model(spec)
            note += "; COCO is outside what it learnt"
        with tempfile.TemporaryDirectory() as cache:
            run = {"model": spec, "weights": note, "info": model_info(backbone),
                   "captions": caption_scores(backbone, cache, args.seed)}
            log(f"captions {run['captions']}")
            run["grammar"] = grammar(backbone, cache, args.seed)
            log(f"grammar {run['grammar']}")
            run["winoground"] = winoground(backbone, cache, args.seed)
            log(f"winoground {run['winoground']}")
        record["runs"].append(run)
        c, g, w = run["captions"], run["grammar"], run["winoground"]
        kinds = ", ".join(f"{k} {v['pairs']}" for k, v in w["kinds"].items())
        md += [f"## {spec} ({note})", "",
               f"coco_mini val, {c['images']} images: first caption vs a shuffled one (seed {args.seed}); "
               f"{c['seconds_per_caption']:.3f} s per caption (CLIP-S + RefCLIP-S, features uncached, "
               f"{c['cpu_seconds_per_caption']:.3f} CPU-s; foreign load {c['foreign_load']:.2f} cores)", "",
               md_table(["score", "real mean", "shuffled mean", "real > shuffled"],
                        [[k, c[k]["real_mean"], c[k]["shuffled_mean"], f"{100 * c[k]['pairwise_accuracy']:.1f}%"]
                         for k in ("clip_s", "refclip_s")]), "",
               f"grammar head: {g['captions']} coco_mini train captions + one corruption each, 20% held out: "
               f"train accuracy {100 * g['train_accuracy']:.1f}%, held-out {100 * g['held_out_accuracy']:.1f}%; "
               "held-out negatives caught per corruption: "
               + ", ".join(f"{k} {100 * v:.0f}%" for k, v in g["held_out_negatives_caught"].items())
               + f" ({g['seconds']:.1f} s)", "",
               f"Winoground-style swapped pairs: {w['pairs']} ({kinds}); "
               f"{w['seconds_per_item']:.3f} s per (caption, image) item for CLIP + ComCLIP together "
               f"({w['cpu_seconds_per_item']:.3f} CPU-s)", "",
               md_table(["pairs", "method", "text", "image", "group"],
                        [[f"{kind} ({part['pairs']})", label, *(f"{100 * part[m][k]:.1f}%"
                                                                 for k in ("text", "image", "group"))]
                         for kind, part in [*w["kinds"].items(), ("all", w)]
                         for m, label in (("clip", "CLIP"), ("comclip", "ComCLIP"))]), ""]
    md += ["Chance (independent random scores): text 25%, image 25%, group 16.7%. Ties count as wrong (strict >). "
           "On mirror pairs an encoder that embeds a picture and its mirror image alike (and random weights nearly "
           "do) scores about 0% text and image, not 25%: its two comparisons contradict each other.", ""]
    write_results("captions_coco", record, "\n".join(md))


if __name__ == "__main__":
    main()
