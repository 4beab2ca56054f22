"""ComCLIP (paper 45): compositional image-text matching with sub-images, and Winoground's text/image/group scores.

Following eric-ai-lab/ComCLIP ``winoground/comclip.py`` and ``winoground/helper_function.py``:

- each word of the caption's parse (subject, object, with attributes prefixed, and the predicate) gets a
  sub-image: the whole picture blacked out outside the word's boxes (``black_outside_rectangle``, PIL's inclusive
  rectangle; several boxes are overlaid: their union shows); a word without boxes gets the whole picture; the
  predicate's sub-image is the overlay of its subject's and object's sub-images (the whole picture when either
  is missing);
- each sub-image k is scored against its word: ``s_k = logit_scale * cos(word_k, sub_k)`` (their
  ``logits_per_text``), the weights are ``s_k / sum_j s_j`` (``normalize_tensor_list``: raw scores over their
  sum, no softmax, no clipping; the logit scale cancels), and the image embedding becomes
  ``e = e_image + sum_k (s_k / sum s) e_sub_k`` with L2-normalised image embeddings (HF's ``image_embeds``);
- the score is ``cos(text, e / |e|)`` for the whole caption's embedding (no prompt template).

Departures: where ``sum s == 0`` (only possible with non-positive cosines that cancel) the sub-images are
ignored (theirs divides by zero); their sub-images are keyed by word in a dict, so a repeated word keeps its last
sub-image; here parts are a mapping too, so the same holds. Boxes are COCO ``[x, y, w, h]`` (pixels) and become
``(x, y, x + w, y + h)`` corners as their detector's boxes.

Winoground (``text_correct``, ``image_correct``, ``group_correct`` as their helpers): for scores ``s[c][i]`` of
caption c with image i, text correct is ``s00 > s10 and s11 > s01``, image correct ``s00 > s01 and s11 > s10``,
group correct both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..errors import CliplabError

Box = Sequence[float]  # COCO [x, y, w, h]


def black_outside(image: Image.Image, boxes: Sequence[Box]) -> Image.Image:
    """``image`` (RGB) black everywhere except inside the ``boxes`` (their union), as ComCLIP's sub-images."""
    rgb = image.convert("RGB")
    out = Image.new("RGB", rgb.size, color="black")
    mask = Image.new("L", rgb.size, color=0)
    draw = ImageDraw.Draw(mask)
    for x, y, w, h in boxes:
        draw.rectangle([(x, y), (x + w, y + h)], fill=255)
    out.paste(rgb, mask=mask)
    return out


def composed_embedding(image_embedding, sub_embeddings, sub_scores) -> np.ndarray:
    """``e_image + sum_k (s_k / sum s) e_sub_k`` (d,); the image embedding itself with no (or zero-sum) scores."""
    image = np.asarray(image_embedding, dtype=np.float64).reshape(-1)
    scores = np.asarray(sub_scores, dtype=np.float64).reshape(-1)
    subs = np.asarray(sub_embeddings, dtype=np.float64).reshape(len(scores), -1) if len(scores) else None
    if subs is None or scores.sum() == 0:
        return image
    if subs.shape[1] != image.shape[0]:
        raise CliplabError(f"comclip: sub-image embeddings of width {subs.shape[1]} for an image of {image.shape[0]}")
    return image + (scores / scores.sum()) @ subs


def _cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def comclip_score(text_embedding, image_embedding, sub_embeddings=(), word_embeddings=()) -> float:
    """ComCLIP's score of a caption with an image: ``cos(text, e)`` for the composed ``e``; sub-image k is
    weighted by ``cos(word_k, sub_k)`` over the sum of those cosines (``logit_scale`` cancels)."""
    subs, words = list(sub_embeddings), list(word_embeddings)
    if len(subs) != len(words):
        raise CliplabError(f"comclip: {len(subs)} sub-images for {len(words)} words")
    scores = [_cos(w, s) for w, s in zip(words, subs)]
    return _cos(text_embedding, composed_embedding(image_embedding, subs, scores))


# -- parsing a caption into subject / predicate / object ---------------------------------------------------------
ARTICLES = {"a", "an", "the", "some", "two", "three"}
PREDICATES = ("to the left of", "to the right of", "on top of", "in front of", "next to", "behind", "holding",
              "riding", "on", "in", "under", "above", "below", "with", "near", "beside", "by", "at", "eating",
              "carrying", "wearing", "watching")


@dataclass(frozen=True)
class Relation:
    """A caption's subject, predicate and object words ("" when the parser found none)."""

    subject: str
    predicate: str
    object: str


def parse_relation(caption: str, nouns: Sequence[str] | None = None) -> Relation:
    """A simple parser: with ``nouns``, the first and last of them found in the caption (longest match) are
    subject and object and the words between them (articles dropped) the predicate; without, the caption is split
    at the first known predicate phrase (``PREDICATES``), articles dropped from both sides."""
    text = " ".join(re.findall(r"[a-z0-9']+", caption.lower()))
    if nouns:
        names = sorted({n.lower() for n in nouns}, key=len, reverse=True)
        found = []
        for name in names:
            for m in re.finditer(rf"\b{re.escape(name)}\b", text):
                if not any(s < m.end() and m.start() < e for s, e, _ in found):
                    found.append((m.start(), m.end(), name))
        found.sort()
        if len(found) >= 2:
            (_, end, subject), (start, _, obj) = found[0], found[-1]
            middle = [w for w in text[end:start].split() if w not in ARTICLES]
            return Relation(subject, " ".join(middle), obj)
        return Relation(found[0][2] if found else "", "", "")
    for phrase in PREDICATES:
        m = re.search(rf"\b{re.escape(phrase)}\b", text)
        if m:
            def strip(part: str) -> str:
                return " ".join(w for w in part.split() if w not in ARTICLES)
            return Relation(strip(text[:m.start()]), phrase, strip(text[m.end():]))
    return Relation(" ".join(w for w in text.split() if w not in ARTICLES), "", "")


def relation_parts(relation: Relation, boxes: Mapping[str, Sequence[Box]]) -> dict[str, list[Box] | None]:
    """The sub-images of a parse as ComCLIP builds them: subject and object with their boxes (``None``: the
    whole picture, when a word has no boxes), the predicate with the union of both (whole picture if either lacks
    boxes)."""
    parts: dict[str, list[Box] | None] = {}
    for word in (relation.subject, relation.object):
        if word:
            parts[word] = list(boxes[word]) if boxes.get(word) else None
    if relation.predicate:
        s, o = parts.get(relation.subject), parts.get(relation.object)
        parts[relation.predicate] = (list(o) + list(s)) if s and o else None
    return parts


# -- Winoground -------------------------------------------------------------------------------------------------
def text_correct(s) -> bool:
    """``s[c][i]``: each image prefers its own caption: ``s00 > s10 and s11 > s01``."""
    return bool(s[0][0] > s[1][0] and s[1][1] > s[0][1])


def image_correct(s) -> bool:
    """Each caption prefers its own image: ``s00 > s01 and s11 > s10``."""
    return bool(s[0][0] > s[0][1] and s[1][1] > s[1][0])


def group_correct(s) -> bool:
    return text_correct(s) and image_correct(s)


def winoground_scores(examples: Sequence) -> dict[str, float]:
    """Fractions of 2x2 score tables (``s[c][i]``) that are text, image and group correct."""
    if not len(examples):
        raise CliplabError("winoground: no examples")
    n = len(examples)
    return {"text": sum(map(text_correct, examples)) / n, "image": sum(map(image_correct, examples)) / n,
            "group": sum(map(group_correct, examples)) / n}


# -- scoring with a model ---------------------------------------------------------------------------------------
@dataclass
class MatchItem:
    """A caption with an image (a PIL image, or a path) and its parts: word -> COCO boxes (``None`` or ``[]``:
    the whole picture). ``key`` names the picture for reuse of its embeddings (a path's own name by default)."""

    image: Image.Image | str
    caption: str
    parts: Mapping[str, Sequence[Box] | None] = field(default_factory=dict)
    key: str | None = None


def _open(image: Image.Image | str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except OSError as exc:
        raise CliplabError(f"{image}: cannot read the image ({exc})") from exc


def match_scores(backbone, items: Sequence[MatchItem], cache_dir=None, batch_size: int = 32) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """(CLIP scores, ComCLIP scores) of each item: ``cos(text, image)`` and ``comclip_score``.

    Pictures and sub-images are embedded once per distinct (picture key, boxes); texts through the text cache."""
    import torch

    from ..features.text import embed_texts

    pictures: dict[str, Image.Image] = {}
    wanted: dict[tuple, tuple[str, tuple | None]] = {}
    for n, item in enumerate(items):
        key = item.key or (item.image if isinstance(item.image, str) else f"#{n}")
        if key not in pictures:
            pictures[key] = _open(item.image)
        wanted[(key, None)] = (key, None)
        for boxes in item.parts.values():
            spec = tuple(tuple(float(v) for v in b) for b in boxes) if boxes else None
            wanted[(key, spec)] = (key, spec)
    order = list(wanted)
    embeddings = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        pixels = [backbone.preprocess(pictures[k] if spec is None else black_outside(pictures[k], spec))
                  for k, spec in chunk]
        with torch.no_grad():
            out = backbone.encode_images(torch.stack(pixels)).numpy()
        embeddings.update(zip(chunk, out))
    texts = list(dict.fromkeys([it.caption for it in items] + [w for it in items for w in it.parts]))
    text_rows = dict(zip(texts, embed_texts(backbone, texts, cache_dir))) if texts else {}
    clip, com = np.empty(len(items)), np.empty(len(items))
    for n, item in enumerate(items):
        key = item.key or (item.image if isinstance(item.image, str) else f"#{n}")
        image = embeddings[(key, None)]
        subs, words = [], []
        for word, boxes in item.parts.items():
            spec = tuple(tuple(float(v) for v in b) for b in boxes) if boxes else None
            subs.append(embeddings[(key, spec)])
            words.append(text_rows[word])
        clip[n] = _cos(text_rows[item.caption], image)
        com[n] = comclip_score(text_rows[item.caption], image, subs, words)
    return clip, com
