"""Caption scores (paper 47) and ComCLIP (paper 45) with a model that knows the classes: CIFAR-10 test images.

``captions_coco`` measures the same methods on coco_mini, where no model here carries signal (random ViT-B-32;
the CIFAR-10 recipe does not know COCO). Here the model is ``recipe:cifar10-signal`` (a 32-px ResNet CLIP trained on
the CIFAR-10 train images with template captions, never on test) and every image is a CIFAR-10 *test* image:

1. CLIP-S and RefCLIP-S (Hessel et al.'s definitions, ``eval.captions.score_rows``): ``--items`` seeded test images,
   each with a candidate caption (one of the 18 cifar10 templates with its true class, drawn by the seed) and 4
   references (4 other templates with the true class); the shuffled candidate is the same template with another
   class (drawn by the seed), same references. Mean scores and the fraction of images whose real caption scores
   higher (ties count half), with CLIP-S's prompt ``"A photo depicts"`` and without a prompt.
2. Winoground-style text / image / group scores of CLIP and ComCLIP (``eval.comclip``) on seeded swapped-caption
   pairs: a 64 x 64 black picture holds two 32-px test tiles side by side (rows 16..47), caption
   ``"a A to the left of a B"``; its boxes are the tiles, so ComCLIP's sub-images are exact (subject tile, object
   tile, their union for the predicate). Kinds: ``swap`` (picture 1 is picture 0 with its tiles exchanged),
   ``real`` (picture 1 holds other test images of the two classes, in the opposite order), and the control
   ``noun`` (picture 1 and caption 1 replace the right-hand class by a third class: no word order needed).

Seconds per item are wall seconds of the model's passes (the feature caches start empty); random ViT-B-32 timings
are in ``captions_coco``.

    python benchmarks/captions_cifar10.py [--model recipe:cifar10-signal] [--items 2000] [--pairs 200]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from _common import DATA_ROOT, CpuAccount, built_model, header, log, md_table, model_info, write_results
from cliplab.data import load_dataset
from cliplab.data.prompts import fill_template, load_templates
from cliplab.eval.captions import CaptionRow, score_rows
from cliplab.eval.comclip import match_scores, winoground_scores
from cliplab.eval.swapped_pairs import SwappedPair, pair_items

TILE, SIDE, TOP = 32, 64, 16
KINDS = ("swap", "real", "noun")


def caption_rows(test, folder: Path, items: int, seed: int) -> tuple[list[CaptionRow], list[CaptionRow], dict]:
    """(real rows, shuffled rows, what was drawn) for ``items`` seeded test images written as PNG under ``folder``."""
    rng = np.random.default_rng([seed, 47])
    templates = load_templates("cifar10")
    names = list(test.class_names)
    picked = np.sort(rng.permutation(len(test))[:items])
    labels = np.asarray(test.labels)
    real, shuffled = [], []
    for i in picked:
        path = folder / f"test-{i:05d}.png"
        test.load_image(int(i)).convert("RGB").save(path)
        y = int(labels[i])
        t, *refs = rng.permutation(len(templates))[:5]
        other = (y + int(rng.integers(1, len(names)))) % len(names)
        references = [fill_template(templates[r], names[y]) for r in refs]
        real.append(CaptionRow(str(path), fill_template(templates[t], names[y]), references))
        shuffled.append(CaptionRow(str(path), fill_template(templates[t], names[other]), references))
    return real, shuffled, {"images": len(picked), "templates": len(templates), "references_per_image": 4}


def _canvas(test, left: int, right: int) -> Image.Image:
    out = Image.new("RGB", (SIDE, SIDE), color="black")
    out.paste(test.load_image(left).convert("RGB"), (0, TOP))
    out.paste(test.load_image(right).convert("RGB"), (TILE, TOP))
    return out


def _boxes(left: str, right: str) -> dict[str, list[list[float]]]:
    return {left: [[0.0, float(TOP), float(TILE), float(TILE)]], right: [[float(TILE), float(TOP), float(TILE),
                                                                          float(TILE)]]}


def tile_pairs(test, count: int, seed: int) -> tuple[list[SwappedPair], dict[str, Image.Image]]:
    """``count`` seeded pairs of each kind in ``KINDS`` (module docstring) and their pictures by key."""
    rng = np.random.default_rng([seed, 45])
    labels = np.asarray(test.labels)
    names = list(test.class_names)
    by_class = [np.flatnonzero(labels == c) for c in range(len(names))]
    pairs, pictures = [], {}
    for kind in KINDS:
        for n in range(count):
            a, b, c = (int(v) for v in rng.permutation(len(names))[:3])
            ia, ib, ja, jb, ic = (int(rng.choice(by_class[k])) for k in (a, b, a, b, c))
            key0, key1 = f"{kind}-{n}-0", f"{kind}-{n}-1"
            pictures[key0] = _canvas(test, ia, ib)
            if kind == "noun":  # picture 1: A | C; the pair's captions are A-left-of-B and A-left-of-C
                pictures[key1] = _canvas(test, ia, ic)
                pairs.append(_NounPair(SwappedPair(kind, (key0, key1), (False, False), names[a], names[b],
                                                   (_boxes(names[a], names[b]), _boxes(names[a], names[c]))),
                                       names[c]))
                continue
            pictures[key1] = _canvas(test, ib, ia) if kind == "swap" else _canvas(test, jb, ja)
            pairs.append(SwappedPair(kind, (key0, key1), (False, False), names[a], names[b],
                                     (_boxes(names[a], names[b]), _boxes(names[b], names[a]))))
    return pairs, pictures


class _NounPair:
    """A control pair: captions ``A left of B`` / ``A left of C`` with pictures A|B and A|C."""

    def __init__(self, pair: SwappedPair, third: str):
        self.pair, self.third, self.kind = pair, third, pair.kind

    def items(self, pictures: dict[str, Image.Image]):
        from cliplab.eval.comclip import MatchItem, Relation, relation_parts
        from cliplab.eval.swapped_pairs import PREDICATE, caption

        p = self.pair
        out = []
        for subject, obj in ((p.left, p.right), (p.left, self.third)):
            relation = Relation(subject, PREDICATE, obj)
            for i in range(2):
                key = p.paths[i]
                out.append(MatchItem(pictures[key], caption(subject, obj), relation_parts(relation, p.boxes[i]), key))
        return out


def winoground(backbone, pairs, pictures, cache: str) -> dict:
    items = [it for p in pairs for it in (p.items(pictures) if isinstance(p, _NounPair) else pair_items(p, pictures))]
    with CpuAccount() as cpu:
        clip, com = match_scores(backbone, items, cache)
    tables = {"clip": clip.reshape(-1, 2, 2), "comclip": com.reshape(-1, 2, 2)}
    out = {"pairs": len(pairs), "kinds": {}, "seconds_per_item": cpu.result["wall_s"] / len(items),
           "cpu_seconds_per_item": cpu.result["own_cpu_s"] / len(items), "foreign_load": cpu.result["foreign_load"]}
    for kind in KINDS:
        rows = [n for n, p in enumerate(pairs) if p.kind == kind]
        out["kinds"][kind] = {"pairs": len(rows), **{m: winoground_scores(t[rows]) for m, t in tables.items()}}
        # how often each caption's own picture and words give the higher raw score, for the reading
        out["kinds"][kind]["mean_margin"] = {m: float(np.mean(t[rows][:, 0, 0] - t[rows][:, 1, 0])) for m, t in
                                             tables.items()}
    return out


def caption_part(backbone, test, items: int, seed: int, cache: str, folder: Path) -> dict:
    real_rows, shuffled_rows, drawn = caption_rows(test, folder, items, seed)
    out = {**drawn, "prompts": {}}
    for label, prompt in (("A photo depicts", "A photo depicts"), ("none", "")):
        with CpuAccount() as cpu:
            real = score_rows(backbone, real_rows, cache, prompt=prompt).rows
        shuffled = score_rows(backbone, shuffled_rows, cache, prompt=prompt).rows
        part = {"seconds_per_caption": cpu.result["wall_s"] / len(real_rows),
                "cpu_seconds_per_caption": cpu.result["own_cpu_s"] / len(real_rows),
                "foreign_load": cpu.result["foreign_load"]}
        for key in ("clip_s", "refclip_s"):
            a = np.array([r[key] for r in real])
            b = np.array([r[key] for r in shuffled])
            part[key] = {"real_mean": float(a.mean()), "shuffled_mean": float(b.mean()),
                         "pairwise_accuracy": float(np.mean(a > b) + 0.5 * np.mean(a == b))}
        out["prompts"][label] = part
        log(f"prompt {label!r}: {part}")
    return out


def render(record: dict) -> str:
    """The markdown of a results record."""
    c, w, note, seed = record["captions"], record["winoground"], record["weights"], record["settings"]["seed"]
    md = [f"# Caption scores and ComCLIP on CIFAR-10 test images · {record['model']}", "",
          f"**Weights: {note}.**", "",
          f"## CLIP-S / RefCLIP-S: real vs shuffled caption ({c['images']} test images, seed {seed})", "",
          "Candidate: a cifar10 template with the true class; shuffled: the same template with another class; "
          "references: 4 other templates with the true class (so RefCLIP-S's reference term favours the real "
          "caption by construction: the CLIP-S column is the image-side test).", "",
          md_table(["prompt", "score", "real mean", "shuffled mean", "real > shuffled", "s / caption"],
                   [[label, key, part[key]["real_mean"], part[key]["shuffled_mean"],
                     f"{100 * part[key]['pairwise_accuracy']:.1f}%", part["seconds_per_caption"]]
                    for label, part in c["prompts"].items() for key in ("clip_s", "refclip_s")]), "",
          f"## Winoground-style pairs from two CIFAR-10 test tiles ({w['pairs']} pairs, seed {seed})", "",
          "A 64 x 64 black picture, tile A left and tile B right; captions 'a A to the left of a B' / 'a B to the "
          "left of a A'; ComCLIP's sub-images are the tiles (exact boxes). swap: the same two tiles exchanged; real: "
          "other images of the two classes in the opposite order; noun (control, no word order needed): picture "
          "A | C with caption 'a A to the left of a C'.", "",
          md_table(["pairs", "method", "text", "image", "group", "mean s00 - s10"],
                   [[f"{kind} ({part['pairs']})", label, *(f"{100 * part[m][k]:.1f}%" for k in ("text", "image",
                                                                                               "group")),
                     part["mean_margin"][m]]
                    for kind, part in w["kinds"].items() for m, label in (("clip", "CLIP"), ("comclip", "ComCLIP"))]),
          "",
          f"{w['seconds_per_item']:.4f} s per (caption, picture) item for CLIP + ComCLIP together "
          f"({w['cpu_seconds_per_item']:.4f} CPU-s; foreign load {w['foreign_load']:.2f} cores).", "",
          "Seconds per caption: the first prompt's row includes embedding the images (empty cache), the second "
          "reuses them. Sizes: the defaults are 2,000 images and 200 pairs per kind; this run's are in the JSON's "
          "settings (smaller runs when the machine was saturated).", "",
          "Chance (independent random scores): text 25%, image 25%, group 16.7%; ties count as wrong (strict >). "
          "mean s00 - s10: caption 0's score with picture 0 minus caption 1's (the text-score margin).", ""]
    md += [note for note in record.get("notes", [])]
    return "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="recipe:cifar10-signal")
    parser.add_argument("--items", type=int, default=2000, help="CIFAR-10 test images for CLIP-S / RefCLIP-S")
    parser.add_argument("--pairs", type=int, default=200, help="pairs per kind for the Winoground-style scores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", action="store_true", help="rewrite the markdown from results/captions_cifar10.json")
    args = parser.parse_args()
    if args.render:
        import json

        from _common import RESULTS_DIR, environment_md

        record = json.loads((RESULTS_DIR / "captions_cifar10.json").read_text())
        (RESULTS_DIR / "captions_cifar10.md").write_text(render(record).rstrip() + "\n\n" + environment_md(record))
        return
    backbone, note = built_model(args.model, held_label="val zero-shot", after=": it knows these ten classes",
                                 random_note="random weights: timing only")
    test = load_dataset("cifar10", DATA_ROOT, "test")
    record = header("captions_cifar10", __doc__.splitlines()[0], quick=False)
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as folder:
        captions = caption_part(backbone, test, args.items, args.seed, cache, Path(folder))
        pairs, pictures = tile_pairs(test, args.pairs, args.seed)
        wino = winoground(backbone, pairs, pictures, cache)
        log(f"winoground {wino}")
    record.update(model=args.model, weights=note, info=model_info(backbone), settings=vars(args), captions=captions,
                  winoground=wino)
    write_results("captions_cifar10", record, render(record))


if __name__ == "__main__":
    main()
