"""MetaCLIP curation (paper 17, "Demystifying CLIP Data"): balance an image-text pool over metadata entries.

Algorithm 1 of the paper, as in facebookresearch/MetaCLIP (``metaclip/metaclip1/substr_matching.py``,
``balancing.py``, ``indexing/balance_sampling.py`` and ``metaclip/curation/curate.py``):

1. **Substring matching** (Alg. 1, lines 7-9). A caption matches entry ``e`` when ``" e "`` occurs in the
   caption after MetaCLIP's ``spacing``: wrap it in spaces, put spaces around ``, . ; : ? ! ``` and turn
   tabs and line breaks into spaces. Matching is case-sensitive, as theirs. Captions that match no entry
   are dropped (``cc_matching.py`` keeps only texts with a match).
2. **Counting** (lines 10-11): ``count[e]`` = number of captions that match ``e`` (once per caption).
3. **Balancing** (lines 13-18): ``p[e] = t / max(count[e], t)``, i.e. ``min(1, t / count[e])``; t = 20,000
   by default ("the magic 20k", their CLIP-400M setting). A caption is kept with probability
   ``1 - prod_e (1 - p[e])`` over its matched entries: one uniform draw per matched caption against that
   value, as ``metaclip/curation/curate.py`` does. MetaCLIP 1's ``balancing.py`` draws once per matched
   entry and keeps on the first success (``balance_sampling.py`` the same with numpy); the probability of
   keeping is the same, and one draw per caption makes the result independent of the order of the
   entries. A caption matched to an entry with ``count <= t`` is always kept. The i-th matched caption (in
   pool order) uses the i-th number of ``numpy.random.default_rng(seed)``, so a seed repeats a run.

Departures from their code, all small:

- Matching runs on tokens, not on the spaced string: the caption after spacing is split on single spaces,
  single-word entries are looked up in a dict and multi-word entries in a token trie. ``" e "`` occurs in
  the spaced caption exactly when ``e.split(" ")`` occurs as consecutive tokens of it (both ends of an
  occurrence sit on spaces), so the matched ids are the same as theirs (a test compares them on random
  text); this runs in pure Python at about the speed of their ``pyahocorasick`` variant, so no dependency.
- Metadata entries are stripped of surrounding whitespace; blank lines and repeated entries are left out
  (their counts go to the first occurrence) and reported. Entries that can never match (a word with one of
  the wrapped punctuation marks inside, e.g. ``St. Louis``, as in their code) are counted in the report.
- MetaCLIP 2's curation picks one text per image before sampling; here every caption is its own
  image-text pair (the COCO layout gives 5 pairs per image), as in MetaCLIP 1's ``balancing.py``.

Bounded memory: pass 1 streams the pool (JSONL line by line, CSV/TSV row by row; a COCO-style ``.json``
is one document and is read whole), matches every caption and keeps only the per-entry counts in memory.
Each matched caption is spilled to a temporary file in the output folder as ``"id id ...\\t<manifest
line>"``; pass 2 streams that file, samples, and copies kept lines into the manifest without parsing or
matching again. Spilling rather than re-matching: matching is most of the cost of pass 1 and the pool may
be slow to parse, while the spill is at most the size of the manifest before sampling and read once
sequentially. Memory is O(entries) (counts, probabilities, the trie); rows that cannot be used are
written to ``skipped.tsv`` as they come (only counts and the first few are kept for the report).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CliplabError, DatasetError
from ..fileio import atomic_write, atomic_write_text, temporary_name

DEFAULT_T = 20_000
WRAPPED_PUNCTUATION = ",.;:?!`"  # MetaCLIP's ``puncts_to_wrap``
_SPACED = [(p, f" {p} ") for p in WRAPPED_PUNCTUATION] + [("\t", " "), ("\n", " "), ("\r", " ")]
_END = None  # trie key marking the end of a multi-word entry (tokens are always strings)
POOL_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".json": "json"}
IMAGE_COLUMNS = ("image", "path")
CAPTION_COLUMNS = ("caption", "captions", "text")
EXAMPLES = 20  # skipped rows and never-matching entries kept in the report (all skipped rows go to skipped.tsv)
_BLOCK = 65_536  # random numbers drawn at a time (the stream does not depend on it)

MANIFEST_NAME = "curated.jsonl"
REPORT_JSON, REPORT_MD, PLOT_NAME, SKIPPED_NAME = "report.json", "report.md", "entry_distribution.png", "skipped.tsv"


# -- matching ------------------------------------------------------------------------------------------------
def spaced_tokens(text: str) -> list[str]:
    """MetaCLIP's ``spacing(text)`` without its two outer spaces, split on single spaces (empty tokens kept)."""
    for old, new in _SPACED:
        if old in text:
            text = text.replace(old, new)
    return text.split(" ")


def never_matches(entry: str) -> bool:
    """True if ``" entry "`` can occur in no spaced caption: a word of it holds a wrapped punctuation mark
    beside other characters (spacing always splits those off), or a tab or line break."""
    return any(("\t" in w or "\n" in w or "\r" in w or (len(w) > 1 and any(p in w for p in WRAPPED_PUNCTUATION)))
               for w in entry.split(" "))


class SubstringMatcher:
    """The ids of the entries whose spaced form ``" e "`` occurs in MetaCLIP's spacing of a caption.

    Single-word entries sit in a dict, longer ones in a trie of words; ``match`` walks the caption's tokens
    once. Ids are positions in ``entries``; a repeated entry answers with its first position.
    """

    def __init__(self, entries: Sequence[str]):
        self.entries = list(entries)
        self._single: dict[str, int] = {}
        self._trie: dict = {}
        for index, entry in enumerate(self.entries):
            words = entry.split(" ")
            if len(words) == 1:
                self._single.setdefault(entry, index)
                continue
            node = self._trie
            for word in words:
                node = node.setdefault(word, {})
            node.setdefault(_END, index)

    def match(self, text: str) -> list[int]:
        """Sorted ids of the entries matched by ``text``."""
        tokens = spaced_tokens(text)
        found = set()
        single, trie = self._single.get, self._trie.get
        for position, token in enumerate(tokens):
            index = single(token)
            if index is not None:
                found.add(index)
            node = trie(token)
            if node is not None:
                for following in tokens[position + 1:]:
                    node = node.get(following)
                    if node is None:
                        break
                    index = node.get(_END)
                    if index is not None:
                        found.add(index)
        return sorted(found)


# -- metadata ------------------------------------------------------------------------------------------------
@dataclass
class Metadata:
    """Entries read from a file, with what was left out of it."""

    path: Path
    entries: list[str]
    blank: int = 0
    duplicates: int = 0
    never_match: list[str] = field(default_factory=list)


def load_metadata(path: str | Path) -> Metadata:
    """Entries from a JSON list of strings (``.json``, MetaCLIP's ``metadata.json``) or a text file, one a line.

    Entries are stripped; blank ones and repeats are left out and counted. A non-text JSON item is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: metadata file not found")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, list):
                raise DatasetError(f"{path}: metadata JSON must be a list of entries (strings)")
            bad = next((i for i, item in enumerate(raw) if not isinstance(item, str)), None)
            if bad is not None:
                raise DatasetError(f"{path}: metadata item {bad} is not text ({type(raw[bad]).__name__})")
        else:
            raw = path.read_text(encoding="utf-8").splitlines()
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{path}: unreadable metadata ({exc})") from exc
    stripped = [item.strip() for item in raw]
    kept = list(dict.fromkeys(item for item in stripped if item))
    if not kept:
        raise DatasetError(f"{path}: no metadata entries")
    blank = sum(1 for item in stripped if not item)
    return Metadata(path, kept, blank, len(stripped) - blank - len(kept), [e for e in kept if never_matches(e)])


# -- reading the pool ----------------------------------------------------------------------------------------
# A record is (where, image, caption, problem): ``problem`` (kind, detail) when the row is unusable as read.
Record = tuple[str, object, object, "tuple[str, str] | None"]


class PoolReader:
    """Streams the image-caption pairs of a pool file; ``position`` / ``size`` (bytes) drive a progress bar.

    JSONL: one object a line with ``image`` (or ``path``) and ``caption`` (a string or a list), ``captions``
    (a list) or ``text``. CSV/TSV: a header with those column names. ``.json``: a COCO-style captions file
    (``{"images": [{"image", "captions": [...]}]}`` as ``../shared/datasets/coco_mini``, or the official
    ``images`` + ``annotations`` layout) or a list of rows as in JSONL, read whole. Image paths are relative
    to the pool's folder. Malformed lines, missing fields and bad captions become problems, never errors.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(f"{self.path}: pool file not found")
        self.format = POOL_FORMATS.get(self.path.suffix.lower())
        if self.format is None:
            raise DatasetError(f"{self.path}: unknown pool format {self.path.suffix!r} (use .jsonl, .csv, .tsv or a "
                               "COCO-style captions .json)")
        self.size = self.path.stat().st_size
        self.position = 0
        if self.format in ("csv", "tsv"):
            self._columns()  # a bad header fails before any work

    def __iter__(self) -> Iterator[Record]:
        yield from {"jsonl": self._jsonl, "csv": self._csv, "tsv": self._csv, "json": self._json}[self.format]()
        self.position = self.size

    def _jsonl(self) -> Iterator[Record]:
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not number & 4095:
                    self.position = handle.tell()
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except ValueError as exc:  # also invalid UTF-8
                    yield f"line {number}", None, None, ("malformed line", f"not JSON ({_short(exc)})")
                    continue
                yield from _row_pairs(f"line {number}", row)

    def _columns(self) -> tuple[str, str]:
        delimiter = "\t" if self.format == "tsv" else ","
        with open(self.path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
            header = next(csv.reader(handle, delimiter=delimiter), None) or []
        image = next((c for c in IMAGE_COLUMNS if c in header), None)
        caption = next((c for c in CAPTION_COLUMNS if c in header), None)
        if image is None or caption is None:
            raise DatasetError(f"{self.path}: the header needs an 'image' (or 'path') column and a 'caption' (or "
                               f"'text') column; it has {', '.join(map(repr, header)) or 'none'}")
        return image, caption

    def _csv(self) -> Iterator[Record]:
        image_column, caption_column = self._columns()
        delimiter = "\t" if self.format == "tsv" else ","
        with open(self.path, "rb") as binary:
            handle = io.TextIOWrapper(binary, encoding="utf-8", errors="surrogateescape", newline="")
            reader = csv.DictReader(handle, delimiter=delimiter)
            try:
                for number, row in enumerate(reader, start=1):
                    if not number & 4095:
                        self.position = binary.tell()
                    yield f"line {reader.line_num}", row.get(image_column), row.get(caption_column), None
            except csv.Error as exc:
                yield f"line {reader.line_num}", None, None, ("malformed line", f"CSV error, rest of file not read "
                                                                                f"({exc})")

    def _json(self) -> Iterator[Record]:
        try:
            data = json.loads(self.path.read_bytes())
        except ValueError as exc:
            raise DatasetError(f"{self.path}: not a JSON document ({_short(exc)})") from exc
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            files = {image.get("id"): image.get("file_name") for image in data.get("images", [])
                     if isinstance(image, dict)}
            for number, annotation in enumerate(data["annotations"], start=1):
                if not isinstance(annotation, dict):
                    yield f"annotation {number}", None, None, ("malformed line", "not an object")
                    continue
                yield (f"annotation {number}", files.get(annotation.get("image_id")), annotation.get("caption"),
                       None)
            return
        rows = data.get("images") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise DatasetError(f"{self.path}: expected a COCO-style captions file (an 'images' list) or a list of rows")
        for number, row in enumerate(rows, start=1):
            yield from _row_pairs(f"image {number}" if isinstance(data, dict) else f"row {number}", row)


def _row_pairs(where: str, row) -> Iterator[Record]:
    """The pairs of one JSON row: one per caption."""
    if not isinstance(row, dict):
        yield where, None, None, ("malformed line", f"not an object ({type(row).__name__})")
        return
    image = row.get("image", row.get("path"))
    key = next((k for k in CAPTION_COLUMNS if k in row), None)
    if key is None:
        yield where, image, None, ("no caption", "no 'caption', 'captions' or 'text' field")
        return
    value = row[key]
    if isinstance(value, list):
        if not value:
            yield where, image, None, ("empty caption", f"empty '{key}' list")
        for number, caption in enumerate(value, start=1):
            yield f"{where} caption {number}", image, caption, None
    else:
        yield where, image, value, None


def caption_problem(caption) -> tuple[str, str] | None:
    """Why ``caption`` cannot be matched (kind, detail), or None for usable text."""
    if isinstance(caption, str):
        if not caption.strip():
            return "empty caption", "empty" if not caption else "only whitespace"
        if not caption.isascii() and not _is_unicode(caption):
            return "non-text caption", "not valid UTF-8"
        return None
    if caption is None:
        return "no caption", "no caption value"
    return "non-text caption", f"{type(caption).__name__} {_short(caption)}"


def _image_problem(image) -> tuple[str, str] | None:
    if isinstance(image, str) and image.strip():
        return None if image.isascii() or _is_unicode(image) else ("no image", "image path is not valid UTF-8")
    return "no image", "no image path" if image in (None, "") else f"image is not a path ({type(image).__name__})"


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: undecodable bytes of a CSV, or \udcxx escapes in JSON
        return False
    return True


def _short(value, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- balancing -----------------------------------------------------------------------------------------------
def entry_probabilities(counts, t: float):
    """MetaCLIP's ``count_to_prob``: ``t / max(count, t)`` per entry (1 for every entry matched t times or fewer)."""
    import numpy as np

    counts = np.asarray(counts, dtype=np.float64)
    return t / np.maximum(counts, t)


def keep_probability(entry_ids: Sequence[int], probabilities) -> float:
    """Probability that a caption matched to ``entry_ids`` is kept: ``1 - prod(1 - p[e])``."""
    miss = 1.0
    for index in entry_ids:
        miss *= 1.0 - float(probabilities[index])
    return 1.0 - miss


# -- the whole run -------------------------------------------------------------------------------------------
@dataclass
class CurationResult:
    """What ``curate`` wrote and the figures of its report (``summary`` is the report JSON without the table)."""

    manifest: Path
    report_json: Path
    report_md: Path
    plot: Path
    skipped_file: Path
    summary: dict
    entries: list[dict]  # every matched entry: entry, before, probability, after (most matched first)


def curate(pool: str | Path, metadata: str | Path, output_dir: str | Path, t: int = DEFAULT_T, seed: int = 0,
           progress: bool = True, top: int = 25) -> CurationResult:
    """Balance ``pool`` over the entries of ``metadata`` (MetaCLIP Algorithm 1) into ``output_dir``.

    Writes ``curated.jsonl`` (``image``, ``caption``, ``entries`` per kept pair; image paths relative to
    ``output_dir``, so ``manifest()`` and ``cliplab pretrain`` read it), ``report.json`` (summary and the
    per-entry counts before and after), ``report.md`` (summary and the ``top`` entries), the plot
    ``entry_distribution.png`` and ``skipped.tsv`` (every unusable row: where, kind, detail), each atomically.
    """
    from tqdm import tqdm

    if not isinstance(t, int | float) or isinstance(t, bool) or not t >= 1 or not math.isfinite(t):
        raise CliplabError(f"t must be a number of matches of at least 1 (got {t!r})")
    start = time.perf_counter()
    meta = load_metadata(metadata)
    reader = PoolReader(pool)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    matcher = SubstringMatcher(meta.entries)
    names = meta.entries
    prefix = _path_prefix(reader.path.parent, output_dir)

    counts = [0] * len(names)
    problems: Counter[str] = Counter()
    examples: list[str] = []
    read = valid = matched = 0
    spill = temporary_name(output_dir / MANIFEST_NAME)
    skipped_tmp = temporary_name(output_dir / SKIPPED_NAME)
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    try:
        with open(spill, "wb") as out, open(skipped_tmp, "w", encoding="utf-8") as skipped, \
                tqdm(total=reader.size, unit="B", unit_scale=True, desc="match", disable=not progress,
                     leave=False) as bar:
            skipped.write("where\tkind\tdetail\n")
            shown = 0
            for where, image, caption, problem in reader:
                read += 1
                if problem is None:
                    problem = caption_problem(caption) or _image_problem(image)
                if problem is not None:
                    problems[problem[0]] += 1
                    detail = problem[1].replace("\t", " ").replace("\n", " ")
                    skipped.write(f"{where}\t{problem[0]}\t{detail}\n")
                    if len(examples) < EXAMPLES:
                        examples.append(f"{where}: {problem[0]} ({problem[1]})")
                    continue
                valid += 1
                ids = matcher.match(caption)
                if ids:
                    matched += 1
                    for index in ids:
                        counts[index] += 1
                    line = dumps({"image": _relocate(image, prefix), "caption": caption,
                                  "entries": [names[i] for i in ids]})
                    out.write(f"{' '.join(map(str, ids))}\t{line}\n".encode())
                if reader.position != shown:
                    bar.update(reader.position - shown)
                    shown = reader.position
            bar.update(reader.size - shown)
        pass1 = time.perf_counter() - start

        probabilities = entry_probabilities(counts, t)
        after = [0] * len(names)
        kept = 0

        def sample(handle) -> None:
            import numpy as np

            nonlocal kept
            rng = np.random.default_rng(seed)
            miss = (1.0 - probabilities).tolist()
            draws: list[float] = []
            position = 0
            with open(spill, "rb") as source, tqdm(total=matched, unit=" pairs", desc="sample",
                                                   disable=not progress, leave=False) as bar2:
                for number, raw in enumerate(source, start=1):
                    if position == len(draws):
                        draws, position = rng.random(_BLOCK).tolist(), 0
                    head, line = raw.split(b"\t", 1)
                    ids = [int(i) for i in head.split()]
                    chance = 1.0
                    for index in ids:
                        chance *= miss[index]
                    if draws[position] < 1.0 - chance:
                        handle.write(line)
                        kept += 1
                        for index in ids:
                            after[index] += 1
                    position += 1
                    if not number & 8191:
                        bar2.update(8192)
                bar2.update(matched - bar2.n)

        manifest = atomic_write(output_dir / MANIFEST_NAME, sample)
        os.replace(skipped_tmp, output_dir / SKIPPED_NAME)
    finally:
        spill.unlink(missing_ok=True)
        skipped_tmp.unlink(missing_ok=True)
    pass2 = time.perf_counter() - start - pass1

    summary = {
        "method": "MetaCLIP balancing (paper 17, Algorithm 1)",
        "pool": str(reader.path), "pool_format": reader.format, "metadata": str(meta.path),
        "t": t, "seed": seed,
        "metadata_entries": len(names), "metadata_blank_lines": meta.blank, "metadata_duplicates": meta.duplicates,
        "entries_never_matchable": len(meta.never_match),
        "entries_never_matchable_examples": meta.never_match[:EXAMPLES],
        "captions_read": read, "captions_skipped": dict(sorted(problems.items())),
        "skipped_examples": examples,
        "pairs_in": valid, "pairs_matched": matched, "pairs_unmatched": valid - matched, "pairs_out": kept,
        **_distribution(counts, "before", t), **_distribution(after, "after", t),
        "seconds": {"pass1_match_count": round(pass1, 3), "pass2_sample": round(pass2, 3),
                    "total": round(pass1 + pass2, 3)},
        "captions_per_s": round(read / max(pass1 + pass2, 1e-9), 1),
        "outputs": {"manifest": MANIFEST_NAME, "report_md": REPORT_MD, "plot": PLOT_NAME, "skipped": SKIPPED_NAME},
    }
    order = sorted((i for i, c in enumerate(counts) if c), key=lambda i: (-counts[i], i))
    table = [{"entry": names[i], "before": counts[i], "probability": float(probabilities[i]), "after": after[i]}
             for i in order]
    rows = ",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in table)  # one entry a line
    text = json.dumps(summary, indent=1, ensure_ascii=False)[:-2] + f',\n "entry_counts": [\n{rows}\n ]\n}}\n'
    report_json = atomic_write_text(output_dir / REPORT_JSON, text)
    report_md = atomic_write_text(output_dir / REPORT_MD, _markdown(summary, table, top))
    plot = plot_distribution(counts, after, t, output_dir / PLOT_NAME)
    return CurationResult(manifest, report_json, report_md, plot, output_dir / SKIPPED_NAME, summary, table)


def _path_prefix(pool_dir: Path, output_dir: Path) -> str:
    """What to put before a pool-relative image path in the output folder's manifest: the pool's folder
    relative to the output folder ('' when they are the same), or absolute when they share only the root."""
    pool_dir, output_dir = Path(os.path.abspath(pool_dir)), Path(os.path.abspath(output_dir))
    if len(Path(os.path.commonpath([pool_dir, output_dir])).parts) <= 1:
        return pool_dir.as_posix() + "/"
    relative = os.path.relpath(pool_dir, output_dir)
    return "" if relative == "." else Path(relative).as_posix() + "/"


def _relocate(image: str, prefix: str) -> str:
    """A pool-relative image path made relative to the output folder (absolute paths and URLs unchanged)."""
    if not prefix or os.path.isabs(image) or "://" in image:
        return image
    return prefix + image


def _distribution(counts: list[int], when: str, t: float) -> dict:
    """Entries matched, head (count > t) and tail (0 < count <= t) sizes, and the tail/head ratio of matches.

    ``tail_head_ratio`` = matches of tail entries / matches of head entries (None without a head entry);
    ``tail_share`` = tail matches / all matches (MetaCLIP's ``t_to_p``, with ``<= t`` for the tail).
    """
    head = [c for c in counts if c > t]
    tail = [c for c in counts if 0 < c <= t]
    head_sum, tail_sum = sum(head), sum(tail)
    return {
        f"entries_matched_{when}": len(head) + len(tail),
        f"head_entries_{when}": len(head), f"tail_entries_{when}": len(tail),
        f"matches_{when}": head_sum + tail_sum,
        f"max_count_{when}": max(counts, default=0),
        f"tail_head_ratio_{when}": round(tail_sum / head_sum, 6) if head_sum else None,
        f"tail_share_{when}": round(tail_sum / (head_sum + tail_sum), 6) if head_sum + tail_sum else None,
    }


def _markdown(summary: dict, table: list[dict], top: int) -> str:
    s = summary

    def ratio(value) -> str:
        return "n/a (no entry above t)" if value is None else f"{value:.4g}"

    skipped = ", ".join(f"{n:,} {kind}" for kind, n in s["captions_skipped"].items()) or "none"
    lines = [
        "# MetaCLIP curation report",
        "",
        f"Pool `{s['pool']}` ({s['pool_format']}), metadata `{s['metadata']}` ({s['metadata_entries']:,} entries), "
        f"t = {s['t']:,}, seed {s['seed']}. Balancing as MetaCLIP (paper 17, Algorithm 1): entry probability "
        "min(1, t / count), a pair is kept with probability 1 - prod(1 - p) over its matched entries.",
        "",
        "| | before | after |",
        "|---|---:|---:|",
        f"| pairs | {s['pairs_matched']:,} matched of {s['pairs_in']:,} | {s['pairs_out']:,} |",
        f"| entries matched | {s['entries_matched_before']:,} | {s['entries_matched_after']:,} |",
        f"| head entries (count > t) | {s['head_entries_before']:,} | {s['head_entries_after']:,} |",
        f"| matches (pair-entry) | {s['matches_before']:,} | {s['matches_after']:,} |",
        f"| largest entry count | {s['max_count_before']:,} | {s['max_count_after']:,} |",
        f"| tail/head ratio of matches | {ratio(s['tail_head_ratio_before'])} | {ratio(s['tail_head_ratio_after'])} |",
        "",
        f"- captions read: {s['captions_read']:,}; skipped: {skipped} (every one in `{SKIPPED_NAME}`)",
        f"- pairs matching no entry (dropped): {s['pairs_unmatched']:,}",
        f"- metadata: {s['metadata_blank_lines']:,} blank lines and {s['metadata_duplicates']:,} repeated "
        f"entries left out; {s['entries_never_matchable']:,} entries can never match (punctuation inside "
        "a word)",
        f"- throughput: {s['captions_per_s']:,.0f} captions/s ({s['seconds']['total']} s: match and count "
        f"{s['seconds']['pass1_match_count']} s, sample {s['seconds']['pass2_sample']} s)",
        f"- plot: `{PLOT_NAME}`; every entry's counts: `{REPORT_JSON}`",
    ]
    if s["skipped_examples"]:
        lines += ["", "First skipped captions:", ""] + [f"- {e}" for e in s["skipped_examples"]]
    if top and table:
        lines += ["", f"## Top {min(top, len(table))} entries by count before curation", "",
                  "| entry | before | probability | after |", "|---|---:|---:|---:|"]
        lines += [f"| {_md_cell(r['entry'])} | {r['before']:,} | {r['probability']:.4g} | {r['after']:,} |"
                  for r in table[:top]]
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "\\`")


def plot_distribution(before: Sequence[int], after: Sequence[int], t: float, path: Path) -> Path:
    """Entry counts before and after, each sorted from the most matched down, with the line y = t.

    Counts on a log scale; ranks too when over 100 entries are matched (a Zipf plot).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    many = sum(1 for c in before if c) > 100
    for counts, label in ((before, "before"), (after, "after")):
        values = np.sort(np.asarray(counts, dtype=np.int64))[::-1]
        values = values[values > 0]
        if len(values):
            ax.plot(np.arange(1, len(values) + 1), values, marker=None if many else "o", markersize=3,
                    label=f"{label} ({len(values):,} entries, {int(values.sum()):,} matches)")
    ax.axhline(t, color="black", linestyle="--", linewidth=1, label=f"t = {t:,}")
    if many:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("metadata entries matched, sorted by count (rank" + (", log)" if many else ")"))
    ax.set_ylabel("pairs matching the entry")
    ax.set_title("MetaCLIP balancing: entry distribution")
    ax.legend(fontsize=8)
    fig.tight_layout()

    def save(handle) -> None:
        fig.savefig(handle, format="png", dpi=110)

    try:
        atomic_write(path, save)
    finally:
        plt.close(fig)
    return path
