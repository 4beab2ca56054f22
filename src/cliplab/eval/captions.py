"""Caption scoring (paper 47 and its base, Hessel et al.'s CLIPScore): CLIP-S, RefCLIP-S and the CLIP-S reward.

As the reference code computes them (jmhessel/clipscore ``clipscore.py``; j-min/CLIP-Caption-Reward
``captioning/utils/rewards.py`` and ``captioning/utils/clipscore.py``):

- every caption is embedded with the prompt prefix ``"A photo depicts "`` (``PROMPT``; references too), image and
  text features are L2-normalised, and ``CLIP-S = w * max(cos(image, caption), 0)`` with ``w = 2.5``;
- ``RefCLIP-S`` (``convention="clipscore"``, Hessel's code) is the harmonic mean ``2ab / (a + b)`` of
  ``a = CLIP-S`` and ``b = max_r cos(caption, r)``, the raw best reference cosine: their code neither clips
  ``b`` at 0 nor scales it by ``w`` (the paper's formula clips it; we follow the code);
- ``convention="reward"`` is CLIP-Caption-Reward's ``calc_refclip_s``: ``b = max_r w * relu(cos(caption, r))``
  (padded references masked to 0) and ``2 / (1/a + 1/b)``;
- the self-critical reward (``self_critical_reward``) is ``score(sample) - score(greedy)`` for the K sampled
  captions of each image (rows ``i*K .. i*K+K-1`` belong to image ``i``, their ``expand`` layout), with
  ``score`` CLIP-S or RefCLIP-S (reward convention); it also gives their ``unnormalized_mean_reward``, the
  mean sample score.

Departures: where both terms of a harmonic mean are 0 the answer is 0 (their code gives 0/0 = NaN in numpy, 0
in torch); arithmetic is float64 on the given features.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CliplabError

W = 2.5  # Hessel et al.'s rescaling weight
PROMPT = "A photo depicts"  # their candidate (and reference) prefix
CONVENTIONS = ("clipscore", "reward")


def prompted(captions: Sequence[str], prompt: str = PROMPT) -> list[str]:
    """``prompt + " " + caption`` as both codes build the text (no prefix when ``prompt`` is empty)."""
    if not prompt:
        return [str(c) for c in captions]
    head = prompt if prompt.endswith(" ") else prompt + " "
    return [head + str(c) for c in captions]


def _unit(x) -> np.ndarray:
    a = np.atleast_2d(np.asarray(x, dtype=np.float64))
    norms = np.sqrt(np.sum(a ** 2, axis=1, keepdims=True))
    if np.any(norms == 0):
        raise CliplabError("caption scores: a feature vector is all zeros (cannot normalise it)")
    return a / norms


def clip_s(image_features, text_features, w: float = W) -> np.ndarray:
    """Per row: ``w * max(cos(image_i, text_i), 0)`` (both normalised first). Shapes (n, d) and (n, d)."""
    images, texts = _unit(image_features), _unit(text_features)
    if images.shape != texts.shape:
        raise CliplabError(f"clip_s: {images.shape[0]} images x {images.shape[1]} vs {texts.shape[0]} captions x "
                           f"{texts.shape[1]}: give one image row per caption")
    return w * np.clip(np.sum(images * texts, axis=1), 0, None)


def reference_score(text_features, references: Sequence, w: float = W, convention: str = "clipscore") -> np.ndarray:
    """Per caption i, its best reference: ``max_r cos(text_i, r)`` (clipscore) or ``max_r w*relu(cos)`` (reward).

    ``references[i]`` is an (r_i, d) array of caption i's reference features (at least one row)."""
    if convention not in CONVENTIONS:
        raise CliplabError(f"convention {convention!r}: choose one of {', '.join(CONVENTIONS)}")
    texts = _unit(text_features)
    if len(references) != len(texts):
        raise CliplabError(f"references: {len(references)} reference sets for {len(texts)} captions")
    out = np.empty(len(texts))
    for i, refs in enumerate(references):
        refs = np.asarray(refs, dtype=np.float64)
        if refs.size == 0:
            raise CliplabError(f"references: caption {i} has no reference")
        cosines = _unit(refs) @ texts[i]
        out[i] = cosines.max() if convention == "clipscore" else (w * np.maximum(cosines, 0)).max()
    return out


def harmonic_mean(a, b) -> np.ndarray:
    """``2ab / (a + b)`` elementwise; 0 where ``a + b == 0`` (see the module's departures)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    total = a + b
    safe = np.where(total == 0, 1.0, total)
    return np.where(total == 0, 0.0, 2 * a * b / safe)


def refclip_s(image_features, text_features, references: Sequence, w: float = W,
              convention: str = "clipscore") -> np.ndarray:
    """RefCLIP-S per caption: the harmonic mean of CLIP-S and the best reference score (``reference_score``)."""
    return harmonic_mean(clip_s(image_features, text_features, w), reference_score(text_features, references, w,
                                                                                      convention))


def self_critical_reward(image_features, sample_features, greedy_features, w: float = W, mode: str = "clip_s",
                         references: Sequence | None = None) -> tuple[np.ndarray, float]:
    """CLIP-Caption-Reward's reward: ``score(sample) - score(greedy)`` per sample, and the mean sample score.

    ``image_features`` (B, d), ``greedy_features`` (B, d), ``sample_features`` (B*K, d) with image i's samples
    at rows ``i*K .. i*K+K-1``; ``mode`` ``clip_s`` or ``refclip_s`` (then ``references[i]`` is image i's (r, d)
    reference features, reward convention)."""
    images = _unit(image_features)
    samples, greedy = _unit(sample_features), _unit(greedy_features)
    n = len(images)
    if len(greedy) != n or len(samples) % max(n, 1) or not len(samples):
        raise CliplabError(f"reward: {n} images, {len(greedy)} greedy captions and {len(samples)} samples "
                           "(give one greedy caption per image and K samples per image)")
    k = len(samples) // n
    repeated = np.repeat(images, k, axis=0)
    if mode == "clip_s":
        sample_score, greedy_score = clip_s(repeated, samples, w), clip_s(images, greedy, w)
    elif mode == "refclip_s":
        if references is None or len(references) != n:
            raise CliplabError("reward: mode refclip_s needs one reference set per image")
        sample_refs = [references[i // k] for i in range(len(samples))]
        sample_score = refclip_s(repeated, samples, sample_refs, w, "reward")
        greedy_score = refclip_s(images, greedy, references, w, "reward")
    else:
        raise CliplabError(f"reward mode {mode!r}: choose clip_s or refclip_s")
    return sample_score - np.repeat(greedy_score, k), float(sample_score.mean())


# -- scoring captions of image files ----------------------------------------------------------------------------
@dataclass
class CaptionRow:
    """One caption to score: its image file, the caption, optional references and an optional baseline caption
    (the greedy one: then ``reward`` = CLIP-S(caption) - CLIP-S(baseline))."""

    image: str
    caption: str
    references: list[str] | None = None
    baseline: str | None = None


@dataclass
class CaptionScores:
    """Per-row results (dicts in input order), the images that failed, timings."""

    rows: list[dict]
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def score_rows(backbone, rows: Sequence[CaptionRow], cache_dir: str | Path | None = None, *, w: float = W,
               prompt: str = PROMPT, batch_size: int = 64, workers: int | None = 0, progress: bool = False,
               grammar=None) -> CaptionScores:
    """CLIP-S for every row, RefCLIP-S where it has references, the reward where it has a baseline, and the
    grammar head's probability where ``grammar`` (a fitted ``caption_grammar.GrammarHead``) is given.

    Images are embedded through the feature cache (a failed image gives a row without scores, with ``error``);
    texts through the text cache, with ``prompt`` prefixed."""
    from ..data.base import FileImageDataset
    from ..features.embed import embed_images
    from ..features.text import embed_texts

    start = time.perf_counter()
    if not rows:
        raise CliplabError("caption scores: no captions to score")
    paths = list(dict.fromkeys(str(Path(r.image)) for r in rows))
    dataset = FileImageDataset([Path(p) for p in paths], [-1] * len(paths), [], Path("/"), "captions")
    features = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=workers,
                            progress=progress)
    row_of = {paths[int(item)]: k for k, item in enumerate(features.indices)}
    by_item = {dataset.item_id(k): p for k, p in enumerate(paths)}
    failed = {by_item.get(item, item): reason for item, reason in features.failures}

    texts = list(dict.fromkeys([r.caption for r in rows] + [t for r in rows for t in (r.references or [])]
                               + [r.baseline for r in rows if r.baseline is not None]))
    encoded = embed_texts(backbone, prompted(texts, prompt), cache_dir)  # one call: one pass through the cache
    row_of_text = {t: n for n, t in enumerate(texts)}

    def embed(some: list[str]) -> np.ndarray:
        return encoded[[row_of_text[t] for t in some]]

    out = []
    for r in rows:
        record = {"image": r.image, "caption": r.caption}
        key = str(Path(r.image))
        if key not in row_of:
            record["error"] = failed.get(key, "the image was not embedded")
            out.append(record)
            continue
        image = features.features[row_of[key]][None]
        caption = embed([r.caption])
        record["clip_s"] = float(clip_s(image, caption, w)[0])
        if r.references:
            record["refclip_s"] = float(refclip_s(image, caption, [embed(list(r.references))], w)[0])
        if r.baseline is not None:
            record["reward"] = float(self_critical_reward(image, caption, embed([r.baseline]), w)[0][0])
        if grammar is not None:
            record["grammar"] = float(grammar.probability(caption)[0])
        out.append(record)
    return CaptionScores(out, sorted(failed.items()), time.perf_counter() - start)


def _row(record: dict, where: str, base: Path) -> CaptionRow:
    if not isinstance(record, dict):
        raise CliplabError(f"{where}: expected an object with 'image' and 'caption'")
    image, caption = record.get("image"), record.get("caption")
    if not isinstance(image, str) or not image.strip() or not isinstance(caption, str) or not caption.strip():
        raise CliplabError(f"{where}: needs a non-empty 'image' path and 'caption' text")
    refs = record.get("references")
    if isinstance(refs, str):
        refs = [r.strip() for r in refs.split("|") if r.strip()]
    if refs is not None and (not isinstance(refs, list) or not all(isinstance(r, str) for r in refs)):
        raise CliplabError(f"{where}: 'references' must be a list of strings (CSV: separated by '|')")
    baseline = record.get("baseline") or None
    if baseline is not None and not isinstance(baseline, str):
        raise CliplabError(f"{where}: 'baseline' must be a caption string")
    path = Path(image).expanduser()
    return CaptionRow(str(path if path.is_absolute() else base / path), caption, refs or None, baseline)


def read_caption_rows(path: str | Path, references: str | Path | None = None) -> list[CaptionRow]:
    """Rows of a captions file: JSONL (one object a line) or a JSON list with ``image``, ``caption`` and optional
    ``references`` (a list; CSV: ``|``-separated) and ``baseline``, or a CSV with those columns. Image paths are
    relative to the file's folder. ``references``: a JSON object mapping an image (as written in the rows, or its
    file stem, as Hessel's ``references_json``) to its reference captions (a list or one string)."""
    import csv
    import json

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliplabError(f"{path}: cannot read the captions ({exc})") from exc
    base = path.parent
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise CliplabError(f"{path}: a CSV needs 'image' and 'caption' columns")
        rows = [_row(dict(r), f"{path}: row {n}", base) for n, r in enumerate(reader, 2)]
    else:
        try:
            if path.suffix.lower() == ".json":
                records = json.loads(text)
                if not isinstance(records, list):
                    raise CliplabError(f"{path}: a JSON file must hold a list of caption objects")
                numbered = list(enumerate(records, 1))
            else:
                numbered = [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        except ValueError as exc:
            raise CliplabError(f"{path}: not valid JSON ({exc})") from None
        rows = [_row(r, f"{path}: row {n}", base) for n, r in numbered]
    if not rows:
        raise CliplabError(f"{path}: no captions")
    originals = [r.image for r in rows]
    if references is not None:
        try:
            mapping = json.loads(Path(references).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CliplabError(f"{references}: cannot read the references ({exc})") from None
        if not isinstance(mapping, dict):
            raise CliplabError(f"{references}: expected an object mapping images to reference captions")
        for row, image in zip(rows, originals):
            name = Path(image)
            found = next((mapping[k] for k in (str(image), name.name, name.stem) if k in mapping), None)
            if found is None:
                found = next((v for k, v in mapping.items() if (base / k) == name), None)
            if found is None:
                raise CliplabError(f"{references}: no references for {name.name}")
            row.references = [found] if isinstance(found, str) else [str(r) for r in found]
    return rows
