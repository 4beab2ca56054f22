"""Class-name synonyms counted in a caption corpus: REAL's frequency estimate (paper 36, "The Neglected Tails of
Vision-Language Models", sec. 3 and the authors' ``analysis/laion/laion_parser.py``).

**Matching, as the authors' code.** They load LAION's captions into SQLite FTS5 tables (default ``unicode61``
tokenizer) after removing ``'`` and ``"`` and turning ``-`` and ``_`` into spaces, and query each synonym,
cleaned the same way, as a phrase. So a synonym matches a caption when its tokens occur as *consecutive tokens*
of the caption: case-insensitive, diacritics removed, any character that is not a letter or digit separates
tokens (punctuation never blocks a match: "sea-lion," matches "sea lion"), and no stemming ("lions" does not
match "lion"; "sea lion" captions also match "lion"). A synonym's count is the number of captions it matches
(once per caption, as FTS counts rows). Here the FTS index is replaced by one streaming pass over the corpus: a
dict of synonym token-tuples keyed by their first token, looked up at every caption token, so all synonyms of
all classes are counted together and a corpus of millions of captions needs memory only for the counts.

**Most frequent name** (``most_frequent_names``): the authors' ``find_most_common_name`` with its default
"RELAXED" strategy: scanning the synonyms from the most counted down, one with a strictly higher count than the
best so far replaces the class name unless its words are a strict subset of the class name's words ("honda"
for "honda accord", "lion" for "sea lion"); the best count is raised either way (their code does, so a rejected
subset also blocks rarer synonyms). "strict" takes the most counted synonym. Ties keep the earlier name (the
class's own name first). Departures: their function reads the class name from a variable it never sets; here it
is the class name the counts are keyed by. The word sets of that subset test use the caption tokens (punctuation
splits words, accents are stripped), where theirs delete punctuation and keep accents: "A/C unit" vs "ac" and
"jalapeño pepper" vs "jalapeno" can decide differently (checked on 3,000 random count tables: otherwise equal).
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DatasetError, DescriptionError
from ..llm import ask_each, load_llm

CAPTION_FIELDS = ("caption", "text")
_TOKEN = re.compile(r"[^\W_]+")


def normalize(text: str) -> str:
    """The authors' cleaning before FTS: drop ``'`` and ``"``, ``-``/``_`` -> space, lower case, no diacritics."""
    text = text.replace("'", "").replace('"', "").replace("-", " ").replace("_", " ").lower()
    if not text.isascii():
        text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    return text


def tokens(text: str) -> list[str]:
    """FTS5 ``unicode61``-like tokens of ``normalize(text)``: runs of letters and digits."""
    return _TOKEN.findall(normalize(text))


def _words(name: str) -> frozenset[str]:
    return frozenset(tokens(name))


# ---------------------------------------------------------------------------------------------------- corpora


def load_caption_corpus(path: str | Path, problems: list[str] | None = None) -> Iterator[str]:
    """Stream the captions of a corpus file, one string each.

    ``.txt``: one caption a line (blank lines skipped). ``.jsonl``: one object a line with a ``caption`` or
    ``text`` field (a string, or a list of strings: each is a caption). ``.parquet``: a ``caption`` or ``text``
    column, read in batches. ``.csv``/``.tsv``: a header with such a column. A row that cannot be read is
    ``"<file>: line N: reason"`` (``row N`` for parquet): appended to ``problems`` and skipped when a list is
    given, else raised as ``DatasetError``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: caption corpus not found")
    suffix = path.suffix.lower()
    readers = {".txt": _txt, ".jsonl": _jsonl, ".parquet": _parquet, ".csv": _csv, ".tsv": _csv}
    if suffix not in readers:
        raise DatasetError(f"{path}: unknown caption corpus format {suffix!r} (use .txt, .jsonl, .parquet or .csv)")

    def report(where: str, reason: str) -> None:
        message = f"{path}: {where}: {reason}"
        if problems is None:
            raise DatasetError(message)
        problems.append(message)

    yield from readers[suffix](path, report)


def _txt(path: Path, report) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="strict") as handle:
        number = 0
        while True:
            number += 1
            try:
                line = handle.readline()
            except UnicodeDecodeError as error:
                report(f"line {number}", f"not UTF-8 ({error.reason})")
                return  # the decoder's position is lost: stop here, reported
            if not line:
                return
            if line.strip():
                yield line.rstrip("\r\n")


def _caption_values(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


def _jsonl(path: Path, report) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                report(f"line {number}", f"not valid JSON ({error.msg})")
                continue
            field = next((f for f in CAPTION_FIELDS if isinstance(row, dict) and f in row), None)
            values = _caption_values(row[field]) if field else None
            if values is None:
                report(f"line {number}", "needs a 'caption' or 'text' field holding a string or a list of strings")
                continue
            yield from values


def _parquet(path: Path, report) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise DatasetError(f"{path}: not a readable parquet file ({error})") from None
    names = file.schema_arrow.names
    column = next((c for c in CAPTION_FIELDS if c in names), None)
    if column is None:
        column = next((c for c in names if c.lower() in CAPTION_FIELDS), None)
    if column is None:
        raise DatasetError(f"{path}: needs a 'caption' or 'text' column (has {names})")
    number = 0
    for batch in file.iter_batches(columns=[column], batch_size=65536):
        for value in batch.column(0).to_pylist():
            number += 1
            if not isinstance(value, str):
                report(f"row {number}", f"caption is {'empty' if value is None else type(value).__name__}")
                continue
            yield value


def _csv(path: Path, report) -> Iterator[str]:
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        column = next((c for c in CAPTION_FIELDS if c in (reader.fieldnames or [])), None)
        if column is None:
            raise DatasetError(f"{path}: the header needs a 'caption' or 'text' column")
        for row in reader:
            value = row.get(column)
            if not isinstance(value, str) or None in row:
                report(f"line {reader.line_num}", "wrong number of fields")
                continue
            yield value


# --------------------------------------------------------------------------------------------------- counting


class PhraseMatcher:
    """All synonyms of all classes as token phrases keyed by their first token: ``match(caption)`` gives the
    ``(class, synonym)`` pairs whose phrase occurs in the caption (each once). Every class's own name is a
    candidate too, first; a synonym with no letters or digits matches nothing."""

    def __init__(self, synonyms: Mapping[str, Sequence[str]]):
        self.candidates: dict[str, list[str]] = {}
        self.owners: dict[tuple[str, ...], list[tuple[str, str]]] = {}
        for name, names in synonyms.items():
            self.candidates[name] = list(dict.fromkeys([name, *names]))
            for synonym in self.candidates[name]:
                phrase = tuple(tokens(synonym))
                if phrase:
                    self.owners.setdefault(phrase, []).append((name, synonym))
        self.by_first: dict[str, list[tuple[str, ...]]] = {}
        for phrase in self.owners:
            self.by_first.setdefault(phrase[0], []).append(phrase)

    def phrases(self, caption: str) -> set[tuple[str, ...]]:
        """The synonym phrases that occur in ``caption`` as consecutive tokens."""
        words = tokens(caption)
        found = set()
        for i, word in enumerate(words):
            for phrase in self.by_first.get(word, ()):
                if tuple(words[i:i + len(phrase)]) == phrase:
                    found.add(phrase)
        return found

    def classes(self, caption: str) -> set[str]:
        """The classes one of whose names occurs in ``caption``."""
        return {name for phrase in self.phrases(caption) for name, _ in self.owners[phrase]}


def count_synonyms(corpus: Iterable[str] | str | Path, synonyms: Mapping[str, Sequence[str]],
                   problems: list[str] | None = None) -> dict[str, dict[str, int]]:
    """``{class: {synonym: number of captions it matches}}`` in one pass over ``corpus``.

    ``corpus`` is an iterable of captions or a corpus file (``load_caption_corpus``; ``problems`` collects its
    bad rows). Every class's own name is counted too, first. A synonym with no letters or digits matches nothing.
    An empty corpus is a ``DatasetError``.
    """
    source = str(corpus) if isinstance(corpus, (str, Path)) else "caption corpus"
    captions = load_caption_corpus(corpus, problems) if isinstance(corpus, (str, Path)) else corpus
    matcher = PhraseMatcher(synonyms)
    hits: dict[tuple[str, ...], int] = dict.fromkeys(matcher.owners, 0)
    seen = 0
    for caption in captions:
        seen += 1
        for phrase in matcher.phrases(caption):
            hits[phrase] += 1
    if not seen:
        raise DatasetError(f"{source}: the caption corpus holds no captions")
    counts = {name: dict.fromkeys(names, 0) for name, names in matcher.candidates.items()}
    for phrase, pairs in matcher.owners.items():
        for name, synonym in pairs:
            counts[name][synonym] = hits[phrase]
    return counts


def retrieve(captions: Sequence[Sequence[str]], synonyms: Mapping[str, Sequence[str]]
             ) -> dict[str, list[tuple[int, str]]]:
    """REAL's retrieval: ``{class: [(item index, first caption of the item naming the class), ...]}`` in item
    order, an item retrieved for a class when one of its captions matches one of the class's names (the class
    name or a synonym, matched as ``count_synonyms``). An item may be retrieved for several classes, as the
    authors retrieve each class on its own."""
    matcher = PhraseMatcher(synonyms)
    found: dict[str, list[tuple[int, str]]] = {name: [] for name in synonyms}
    for index, item_captions in enumerate(captions):
        done: set[str] = set()
        for caption in item_captions:
            for name in matcher.classes(caption) - done:
                found[name].append((index, caption))
                done.add(name)
    return found


def load_image_text_corpus(path: str | Path):
    """An image-text corpus the data layer reads, with its captions: a folder or ``.json`` file of COCO-style
    captions (``captions.json`` as ../shared/datasets/coco_mini) or a JSONL/CSV manifest with a caption field."""
    from .folders import coco_captions, manifest

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: image-text corpus not found")
    dataset = coco_captions(path) if path.is_dir() or path.suffix.lower() == ".json" else manifest(path)
    if dataset.captions is None or not any(dataset.captions):
        raise DatasetError(f"{path}: the image-text corpus has no captions")
    return dataset


def most_frequent_names(counts: Mapping[str, Mapping[str, int]], strategy: str = "relaxed") -> dict[str, str]:
    """``{class: chosen name}``: the authors' ``find_most_common_name`` (see the module docstring)."""
    if strategy not in ("relaxed", "strict"):
        raise ValueError(f"strategy must be 'relaxed' or 'strict', got {strategy!r}")
    chosen = {}
    for name, alternates in counts.items():
        official = _words(name)
        best, best_count = name, alternates.get(name, 0)
        for synonym, count in sorted(alternates.items(), key=lambda item: item[1], reverse=True):
            if count > best_count:
                words = _words(synonym)
                if strategy == "strict" or words == official or not words <= official:
                    best = synonym
                best_count = count
        chosen[name] = best
    return chosen


# --------------------------------------------------------------------------------------------------- synonyms

SYNONYM_PROMPT = ("Give the other names people commonly use for \"{name}\" when they write captions for photos "
                  "of it on the web: common names, scientific or trade names, and spelling variants. Answer with "
                  "a JSON list of strings only, without \"{name}\" itself.")


def read_synonyms(source: str | Path | Mapping[str, Sequence[str]], class_names: Sequence[str]
                  ) -> dict[str, list[str]]:
    """``{class: [synonyms]}`` from a JSON file or mapping, for ``class_names`` (a class the file leaves out keeps
    only its own name; a key that is not a class name, also case-insensitively, is a ``DescriptionError``)."""
    if isinstance(source, Mapping):
        data, where = dict(source), "synonyms"
    else:
        where = str(source)
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DescriptionError(f"{where}: synonyms file not found") from None
        except (OSError, ValueError) as error:
            raise DescriptionError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise DescriptionError(f"{where}: synonyms must be a JSON object {{class: [synonyms]}}")
    lower = {name.lower(): name for name in class_names}
    out: dict[str, list[str]] = {name: [] for name in class_names}
    for key, values in data.items():
        name = key if key in out else lower.get(str(key).lower())
        if name is None:
            raise DescriptionError(f"{where}: class {key!r} is not among the labels")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise DescriptionError(f"{where}: synonyms of {key!r} must be a list of strings")
        out[name] = [v.strip() for v in values if v.strip()]
    return out


def check_synonym_answer(answer: Any) -> None:
    """``ValueError`` unless an LLM's synonym answer is a JSON list of strings (the LLM's ``validate``)."""
    if not isinstance(answer, list) or not all(isinstance(v, str) for v in answer):
        raise ValueError("answer is not a list of strings")


def llm_synonyms(llm: Any, class_names: Sequence[str], give_up_after: int | None = 3
                 ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Ask ``llm`` (an ``LLM`` or a ``load_llm`` spec) for each class's synonyms: ``({class: [synonyms]},
    {class: reason})``; a class whose answer failed or is not a list of strings (retried by the LLM first) keeps
    only its own name. When the first ``give_up_after`` classes all fail, the rest are reported as not asked."""
    model = load_llm(llm) if isinstance(llm, str) else llm
    answers, failures = ask_each(model, {n: SYNONYM_PROMPT.format(name=n) for n in class_names},
                                 json={"type": "array"}, validate=check_synonym_answer, give_up_after=give_up_after)
    out: dict[str, list[str]] = {name: [] for name in class_names}
    for name, answer in answers.items():
        out[name] = [v.strip() for v in answer if v.strip() and v.strip() != name]
    return out, failures


def resolve_synonyms(class_names: Sequence[str], synonyms: str | Path | Mapping[str, Sequence[str]] | None = None,
                     llm: Any = None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Synonyms from a file/mapping, else from the LLM, else none: ``({class: [synonyms]}, LLM failures)``."""
    if synonyms is not None:
        return read_synonyms(synonyms, class_names), {}
    if llm is not None:
        return llm_synonyms(llm, class_names)
    return {name: [] for name in class_names}, {}
