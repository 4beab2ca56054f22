"""Winoground-style swapped-caption pairs from COCO boxes (coco_mini), and CLIP vs ComCLIP on them.

A pair is two pictures and two captions with the same words in another order, ``"a A to the left of a B"`` and
``"a B to the left of a A"``, each true of one picture. Per picture, each category's largest non-crowd instance of
at least ``min_area`` of the picture is its box; two categories whose box centres are at least ``min_gap`` of the
width apart horizontally give a left/right relation. Two kinds of pairs, seeded:

- ``mirror``: a picture and its horizontal mirror image (boxes mirrored), one pair per picture with a usable
  category pair (drawn by the seed when there are several);
- ``real``: two different pictures holding the same two categories in opposite order (each picture in at most one
  such pair; matched in a seeded order).

Each caption's parse (subject, predicate "to the left of", object) and the boxes of the picture it is scored with
give ComCLIP's sub-images (``comclip.relation_parts``). The category names come from COCO's instance files; the
captions are written from them (COCO's own captions do not say left from right).
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DatasetError
from .comclip import MatchItem, Relation, match_scores, relation_parts, winoground_scores

PREDICATE = "to the left of"
KINDS = ("mirror", "real")


@dataclass(frozen=True)
class SwappedPair:
    """Pictures 0 and 1 (``mirrored[j]``: picture j is the left-right mirror of its file), the categories ``left``
    and ``right`` as picture 0 shows them, and each picture's boxes by category (COCO xywh, in that picture)."""

    kind: str
    paths: tuple[str, str]
    mirrored: tuple[bool, bool]
    left: str
    right: str
    boxes: tuple[dict, dict]

    @property
    def captions(self) -> tuple[str, str]:
        return caption(self.left, self.right), caption(self.right, self.left)


def caption(a: str, b: str) -> str:
    return f"a {a} {PREDICATE} a {b}"


def coco_instances(root: str | Path) -> tuple[dict[str, dict], dict[str, tuple[int, int]]]:
    """Per picture file: {category: largest instance's box}, and its (width, height), from ``instances_*.json``."""
    root = Path(root)
    files = sorted(root.glob("instances_*.json"))
    if not files:
        raise DatasetError(f"{root}: no instances_*.json (COCO boxes) found")
    boxes, sizes = {}, {}
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{file}: cannot read COCO instances ({exc})") from exc
        names = {c["id"]: c["name"] for c in data.get("categories", [])}
        split = file.stem.removeprefix("instances_")
        paths = {im["id"]: str(root / "images" / split / im["file_name"]) for im in data.get("images", [])}
        for im in data.get("images", []):
            sizes[paths[im["id"]]] = (int(im["width"]), int(im["height"]))
            boxes.setdefault(paths[im["id"]], {})
        areas: dict[tuple[str, str], float] = {}
        for ann in data.get("annotations", []):
            if ann.get("iscrowd") or ann["image_id"] not in paths:
                continue
            path, name = paths[ann["image_id"]], names[ann["category_id"]]
            if ann["area"] > areas.get((path, name), -1):
                areas[(path, name)] = ann["area"]
                boxes[path][name] = [float(v) for v in ann["bbox"]]
        for (path, name), area in areas.items():
            width, height = sizes[path]
            boxes[path].setdefault("_areas", {})[name] = area / (width * height)
    return boxes, sizes


def _mirror(box, width: int) -> list[float]:
    x, y, w, h = box
    return [width - x - w, y, w, h]


def swapped_pairs(root: str | Path, seed: int = 0, kinds=KINDS, min_area: float = 0.02,
                  min_gap: float = 0.15) -> list[SwappedPair]:
    """The seeded pairs of ``kinds`` from the COCO folder ``root`` (``instances_*.json`` + ``images/<split>/``)."""
    boxes, sizes = coco_instances(root)
    rng = np.random.default_rng(seed)
    usable: dict[str, list[tuple[str, str]]] = {}  # path -> [(left, right)] categories
    for path in sorted(boxes):
        found = boxes[path]
        width = sizes[path][0]
        names = sorted(n for n, a in found.get("_areas", {}).items() if a >= min_area)
        relations = []
        for a, b in itertools.combinations(names, 2):
            ca, cb = (found[n][0] + found[n][2] / 2 for n in (a, b))
            if abs(ca - cb) >= min_gap * width:
                relations.append((a, b) if ca < cb else (b, a))
        if relations:
            usable[path] = relations
    pairs = []
    if "mirror" in kinds:
        for path, relations in usable.items():
            left, right = relations[int(rng.integers(len(relations)))]
            width = sizes[path][0]
            own = {n: [boxes[path][n]] for n in (left, right)}
            flipped = {n: [_mirror(boxes[path][n], width)] for n in (left, right)}
            pairs.append(SwappedPair("mirror", (path, path), (False, True), left, right, (own, flipped)))
    if "real" in kinds:
        by_pair = defaultdict(list)
        for path, relations in usable.items():
            for left, right in relations:
                by_pair[tuple(sorted((left, right)))].append((path, left, right))
        used = set()
        for key in sorted(by_pair):
            entries = [by_pair[key][i] for i in rng.permutation(len(by_pair[key]))]
            one = [e for e in entries if e[1] == key[0]]
            other = [e for e in entries if e[1] == key[1]]
            for p0, p1 in zip(one, other):
                if p0[0] in used or p1[0] in used or p0[0] == p1[0]:
                    continue
                used.update((p0[0], p1[0]))
                left, right = p0[1], p0[2]
                pairs.append(SwappedPair("real", (p0[0], p1[0]), (False, False), left, right,
                                         tuple({n: [boxes[p][n]] for n in (left, right)} for p in (p0[0], p1[0]))))
    if not pairs:
        raise DatasetError(f"{root}: no picture has two categories far enough apart for a left/right pair")
    return pairs


def pair_items(pair: SwappedPair, pictures: dict[str, Image.Image] | None = None) -> list[MatchItem]:
    """The four (caption c, picture i) items of a pair in order c0i0, c0i1, c1i0, c1i1."""
    pictures = {} if pictures is None else pictures
    items = []
    for c, (subject, obj) in enumerate(((pair.left, pair.right), (pair.right, pair.left))):
        relation = Relation(subject, PREDICATE, obj)
        for i in range(2):
            key = pair.paths[i] + ("#mirror" if pair.mirrored[i] else "")
            if key not in pictures:
                with Image.open(pair.paths[i]) as opened:
                    picture = opened.convert("RGB")
                pictures[key] = ImageOps.mirror(picture) if pair.mirrored[i] else picture
            items.append(MatchItem(pictures[key], pair.captions[c], relation_parts(relation, pair.boxes[i]), key))
    return items


def evaluate_pairs(backbone, pairs: list[SwappedPair], cache_dir=None) -> dict:
    """Winoground text/image/group scores of CLIP and ComCLIP on ``pairs``, overall and per kind, and the
    2x2 tables (``s[c][i]``)."""
    pictures: dict[str, Image.Image] = {}
    items = [item for pair in pairs for item in pair_items(pair, pictures)]
    clip, com = match_scores(backbone, items, cache_dir)
    tables = {"clip": clip.reshape(-1, 2, 2), "comclip": com.reshape(-1, 2, 2)}
    out = {"pairs": len(pairs), "kinds": {}}
    for kind in sorted({p.kind for p in pairs}):
        rows = [n for n, p in enumerate(pairs) if p.kind == kind]
        out["kinds"][kind] = {"pairs": len(rows),
                              **{m: winoground_scores(t[rows]) for m, t in tables.items()}}
    out.update({m: winoground_scores(t) for m, t in tables.items()})
    out["tables"] = {m: t.tolist() for m, t in tables.items()}
    return out
