"""Generate class-description sets with a language model: DCLIP descriptors (paper 7) and CuPL sentences.

Two styles, each producing the JSON shape ``data.descriptions`` reads (``{class: [strings]}``):

- ``"dclip"`` (paper 7, Menon & Vondrick): one question per class asking for the visual features that identify
  it, answered as short attribute phrases ("has four legs", "pointed ears") that ``heads/dclip.py`` joins to
  the class name ("cat, which has four legs").
- ``"cupl"`` (CuPL, Pratt et al., the sentences in ../shared/descriptions/cupl): several questions per class
  ("what does it look like", "how do you recognise it", "what does a photo of it show", ...), each answered
  with full sentences that name the class; the CuPL head embeds and ensembles them.

The prompts are written in our own words after the papers (:data:`DCLIP_PROMPT`, :data:`CUPL_QUESTIONS`); an
optional ``domain`` hint ("a type of texture", "a photo of a pet") is added to each, as CuPL's per-dataset
prompts do. Every prompt goes through :func:`cliplab.llm.ask_each`, so answers are cached on disk (a rerun asks
only what failed), retried, and failures are reported per class, never dropped silently.

Departures from the authors' code:

- Both papers sample plain-text completions (DCLIP parses a "-" bullet list from GPT-3, CuPL draws 10
  completions per question at temperature 0.99). Here every prompt asks for one JSON object holding a list
  (``{"features": [...]}`` / ``{"sentences": [...]}``), with ``n_per_prompt`` items per CuPL question, so one
  deterministic (temperature 0), cacheable call gives several distinct answers, and JSON mode works with
  OpenAI-compatible servers (whose ``json_object`` mode must return an object). An answer that is not a JSON
  object, or whose cleaned list is empty, is retried (inside the LLM's retry loop, before it is cached), then
  reported; inside the object, the list under the expected key or its only list is used.
- Cleaning (:func:`clean_answer`): bullets, numbering and surrounding quotes are stripped, whitespace is
  collapsed, empty items and case-insensitive duplicates dropped, and at most ``n_per_prompt`` items are kept
  per prompt (the first ones). DCLIP phrases lose a trailing full stop (the head phrases them into a clause).
  CuPL sentences get a final full stop where they have no end punctuation (CuPL's code appends "." too).
- A CuPL sentence that does not mention its class (loosely: case and underscores ignored, so "Cats are ..."
  mentions "cat") would describe no class in particular once embedded, so by default (``mention="prepend"``)
  it gets the class name prepended, "automobile: It has four wheels."; ``mention="drop"`` drops it and
  ``"keep"`` keeps it as CuPL does.
- A class is described only when all its prompts were answered with at least one usable item; otherwise it is
  in ``failures`` with the reason (the answers that did arrive are in the LLM's disk cache, so a rerun asks
  only the failed prompts). When the first ``give_up_after`` classes all fail and none has succeeded, the
  endpoint is taken to be down and the remaining classes are reported without being asked.

Making a replay file (``load_llm("replay:FILE")``, offline and exact): pass ``record=FILE`` (CLI ``--record``)
to a run against a real model; every answered prompt is merged into FILE as ``{prompt text: answer}``. Or write
one by hand: the prompts are :func:`build_prompts`'s (``cliplab describe --show-prompts`` prints them), the
answers JSON values such as ``{"features": ["has four legs"]}``; tests/data/describe_replay_cifar10.json is
one for CIFAR-10, both styles.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DescriptionError
from ..fileio import atomic_write_text
from ..llm import LLM, ask_each, load_llm
from .descriptions import Descriptions, check_descriptions
from .prompts import _loose, check_class_names

STYLES = ("dclip", "cupl")
DEFAULT_N = {"dclip": 8, "cupl": 5}
MENTION = ("prepend", "drop", "keep")

DCLIP_PROMPT = (
    'Which visual features identify {a} "{c}"{domain} in a photo? List up to {n} short attribute phrases, '
    'each one something you can see, e.g. "has four legs" or "pointed ears". '
    'Answer with a JSON object {{"features": [...]}}.'
)
CUPL_QUESTIONS = (
    "Describe what {a} {c}{domain} looks like.",
    "How can you identify {a} {c}{domain}?",
    "What does a photo of {a} {c}{domain} look like?",
    "Describe a picture of {a} {c}{domain} that you might find on the internet.",
    "Write a caption for an image of {a} {c}{domain}.",
)
CUPL_ANSWER = (
    " Answer with {n} different full sentences, each of which names the {c}, "
    'as a JSON object {{"sentences": [...]}}.'
)

_BULLET = re.compile(r"^\s*(?:[-*+\u2022\u00b7\u2013\u2014>]+|\(?\d{1,3}[.):]|#+)\s*")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_ANSWER_KEYS = {"dclip": ("features", "descriptors", "attributes"), "cupl": ("sentences", "descriptions")}


def article(name: str) -> str:
    """"an" before a vowel sound's letter (a, e, i, o, u), else "a"; good enough for class names."""
    return "an" if name[:1].lower() in "aeiou" else "a"


def _domain(domain: str | None) -> str:
    return f" ({domain.strip()})" if domain and domain.strip() else ""


def build_prompts(class_names: Sequence[str], style: str = "dclip", *, n_per_prompt: int | None = None,
                  domain: str | None = None) -> dict[str, list[str]]:
    """class -> the prompts asked for it (one for DCLIP, ``len(CUPL_QUESTIONS)`` for CuPL)."""
    if style not in STYLES:
        raise DescriptionError(f"unknown description style {style!r}: use one of {', '.join(STYLES)}")
    n = DEFAULT_N[style] if n_per_prompt is None else int(n_per_prompt)
    if n < 1:
        raise DescriptionError(f"n_per_prompt must be at least 1, got {n}")
    names = check_class_names(list(class_names), "class names")
    out: dict[str, list[str]] = {}
    for c in names:
        fill = {"a": article(c), "c": c, "domain": _domain(domain), "n": n}
        if style == "dclip":
            out[c] = [DCLIP_PROMPT.format(**fill)]
        else:
            out[c] = [q.format(**fill) + CUPL_ANSWER.format(**fill) for q in CUPL_QUESTIONS]
    return out


def _items(answer: Any, style: str) -> list[Any]:
    """The list inside an answer: {"features"|"sentences": [...]} or the object's only list (a list as it is)."""
    if isinstance(answer, Mapping):
        for key in _ANSWER_KEYS[style]:
            if isinstance(answer.get(key), list):
                return answer[key]
        lists = [value for value in answer.values() if isinstance(value, list)]
        if len(lists) == 1:
            return lists[0]
        raise ValueError(f"answer is a JSON object without a {_ANSWER_KEYS[style][0]!r} list")
    if isinstance(answer, list):
        return answer
    raise ValueError(f"answer is a JSON {type(answer).__name__}, not a list of strings")


def _strip(item: str) -> str:
    text = " ".join(item.split())
    while True:
        before = text
        text = _BULLET.sub("", text).strip()
        if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
            text = text[1:-1].strip()
        if text == before:
            return text


def _mentions(sentence: str, class_name: str) -> bool:
    return _loose(class_name) in _loose(sentence)


def clean_answer(answer: Any, class_name: str, style: str, n_per_prompt: int | None = None,
                 mention: str = "prepend") -> list[str]:
    """The usable descriptions in one answer (see the module docstring for the rules); may be empty.

    Raises ``ValueError`` when the answer has no list of items at all.
    """
    if mention not in MENTION:
        raise DescriptionError(f"unknown mention rule {mention!r}: use one of {', '.join(MENTION)}")
    n = DEFAULT_N[style] if n_per_prompt is None else n_per_prompt
    out: list[str] = []
    seen: set[str] = set()
    for item in _items(answer, style):
        if not isinstance(item, str):
            continue
        text = _strip(item)
        if style == "dclip":
            text = text.rstrip(" .;,")
        elif text:
            if text[-1] not in ".!?":
                text += "."
            if not _mentions(text, class_name):
                if mention == "drop":
                    continue
                if mention == "prepend":
                    text = f"{class_name}: {text}"
        if not text or text.casefold() in seen:
            continue
        seen.add(text.casefold())
        out.append(text)
        if len(out) >= n:
            break
    return out


def generate_descriptions(llm: LLM | str, class_names: Sequence[str], style: str = "dclip", *,
                          n_per_prompt: int | None = None, domain: str | None = None, mention: str = "prepend",
                          record: str | Path | None = None, give_up_after: int = 3, progress: bool = True,
                          ) -> tuple[Descriptions, dict[str, str]]:
    """Ask ``llm`` (an ``LLM`` or a ``load_llm`` spec) about every class; ``(descriptions, failures)``.

    ``descriptions``: class -> cleaned items (all its prompts' answers, in prompt order, duplicates across
    prompts dropped), checked with ``check_descriptions``; ``failures``: class -> one-line reason. Each class is
    in exactly one of the two. ``record``: a replay file to merge every answered prompt into.
    """
    if mention not in MENTION:
        raise DescriptionError(f"unknown mention rule {mention!r}: use one of {', '.join(MENTION)}")
    llm = load_llm(llm)
    prompts = build_prompts(class_names, style, n_per_prompt=n_per_prompt, domain=domain)
    descriptions: Descriptions = {}
    failures: dict[str, str] = {}
    answered: dict[str, Any] = {}
    classes = list(prompts)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(classes), desc=f"describe ({style})", unit="class", leave=False)
    try:
        for index, name in enumerate(classes):
            if give_up_after and not descriptions and len(failures) >= give_up_after:
                reason = f"not asked: the first {len(failures)} classes all failed ({next(iter(failures.values()))})"
                failures.update(dict.fromkeys(classes[index:], reason))
                break
            keyed = {str(i): prompt for i, prompt in enumerate(prompts[name])}
            answers, failed = ask_each(llm, keyed, json={"type": "object"},
                                       validate=answer_validator(name, style, n_per_prompt, mention))
            answered.update({keyed[i]: answer for i, answer in answers.items()})
            if failed:
                reasons = sorted(set(failed.values()))
                count = f"{len(failed)} of {len(keyed)} prompts failed: " if len(keyed) > 1 else ""
                failures[name] = count + reasons[0]
            else:
                failures_or_items = _collect(name, [answers[i] for i in keyed], style, n_per_prompt, mention)
                if isinstance(failures_or_items, str):
                    failures[name] = failures_or_items
                else:
                    descriptions[name] = failures_or_items
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if record is not None and answered:
            record_answers(record, answered)
    if descriptions:
        descriptions = check_descriptions(descriptions, f"{style} descriptions")
    return descriptions, failures


def answer_validator(name: str, style: str, n: int | None = None, mention: str = "prepend"):
    """The check an answer about class ``name`` must pass (``ValueError`` if not): it holds a list with at least
    one usable item once cleaned. Passed to the LLM as ``validate``, so a wrong-shape answer is retried, not cached.
    """
    def validate(answer: Any) -> None:
        if not clean_answer(answer, name, style, n, mention):
            raise ValueError("the answer held no usable descriptions")

    return validate


def _collect(name: str, answers: list[Any], style: str, n: int | None, mention: str) -> list[str] | str:
    """All prompts' cleaned items for one class, or the reason there are none."""
    items: list[str] = []
    for answer in answers:
        try:
            cleaned = clean_answer(answer, name, style, n, mention)
        except ValueError as error:
            return f"unusable answer: {error}"
        items += [text for text in cleaned if text.casefold() not in {x.casefold() for x in items}]
    return items or "the answer held no usable descriptions"


def record_answers(path: str | Path, answers: Mapping[str, Any]) -> Path:
    """Merge ``{prompt: answer}`` into the replay file at ``path`` (atomically; new answers win)."""
    path = Path(path)
    existing: dict[str, Any] = {}
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DescriptionError(f"{path}: replay file to record into is not valid JSON ({error})") from None
        if not isinstance(existing, dict):
            raise DescriptionError(f"{path}: replay file to record into is not a JSON object")
    existing.update(answers)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(existing, indent=1, ensure_ascii=False) + "\n")
    return path
