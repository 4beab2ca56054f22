"""Prompt templates and class names: built-in JSON sets and user files."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from ..errors import LabelError, TemplateError
from .base import printable

PLACEHOLDER = "{c}"
# ImageNet-1k index -> (CLIP_benchmark's name, distinct name): the first WordNet lemma of the class's synset,
# for the one class of each same-named pair whose lemma differs (n04008634 "projectile, missile";
# n04355933 "sunglass"; their partners n03773504 "missile" and n04356056 "sunglasses" keep their names).
IMAGENET_DUPLICATES: dict[int, tuple[str, str]] = {744: ("missile", "projectile"), 836: ("sunglasses", "sunglass")}


def _builtin(kind: str) -> dict[str, resources.abc.Traversable]:
    folder = resources.files("cliplab.data") / kind
    return {entry.name.removesuffix(".json"): entry for entry in folder.iterdir() if entry.name.endswith(".json")}


def template_sets() -> list[str]:
    """Names of the built-in template sets (CLIP_benchmark's per-dataset sets, imagenet80/7, generic)."""
    return sorted(_builtin("templates"))


def load_templates(templates: str | Path | Sequence[str]) -> list[str]:
    """Templates with a ``{c}`` placeholder: a built-in set name, a user file, or a list of strings.

    User files: a JSON list, a JSON object with ``templates``, or text with one template a line.
    OpenAI-style ``{}`` placeholders are accepted and rewritten to ``{c}``.
    """
    if not isinstance(templates, (str, Path)):
        return check_templates(list(templates), "templates")
    builtin = _builtin("templates")
    if str(templates) in builtin:
        return check_templates(json.loads(builtin[str(templates)].read_text())["templates"], str(templates))
    path = Path(templates)
    if not path.is_file():
        raise TemplateError(
            f"unknown template set {str(templates)!r}: not a file, and not one of {', '.join(sorted(builtin))}"
        )
    return check_templates(_read_list(path, "templates", TemplateError), str(path))


def check_templates(templates: list[str], source: str) -> list[str]:
    """Rewrite ``{}`` to ``{c}``; reject an empty list and templates without exactly one placeholder."""
    templates = [str(t).replace("{}", PLACEHOLDER) for t in templates]
    if not templates:
        raise TemplateError(f"{source}: no templates")
    for template in templates:
        if template.count(PLACEHOLDER) != 1:
            raise TemplateError(f"{source}: template {template!r} needs exactly one {PLACEHOLDER} placeholder")
    return templates


def fill_template(template: str, class_name: str) -> str:
    """``template`` with its placeholder replaced by ``class_name``."""
    return template.replace(PLACEHOLDER, class_name)


def builtin_class_names(dataset: str) -> list[str] | None:
    """CLIP_benchmark's curated class names for a known dataset, or None."""
    entry = _builtin("classnames").get(dataset)
    return json.loads(entry.read_text())["classnames"] if entry else None


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a file: one per line (blank lines and ``#`` comments skipped) or JSON.

    JSON may be a list, ``{"classnames": [...]}`` or ``{"0": "cat", "1": "dog"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: class-name file not found")
    return check_class_names(_read_list(path, "classnames", LabelError), str(path))


def parse_labels(text: str) -> list[str]:
    """Comma-separated labels from the command line (checked and made valid text by :func:`check_class_names`)."""
    return check_class_names([part.strip() for part in text.split(",")], "--labels")


def check_class_names(names: list[str], source: str) -> list[str]:
    """Names stripped and made valid text; reject an empty list, empty names and duplicates (case-insensitive).

    A name that is not valid UTF-8 (surrogate escapes from the OS, as a command-line argument in another
    encoding gives) gets ``\\xNN`` for each such byte: ``"caf\\udce9"`` becomes ``"caf\\\\xe9"``, the
    name shown and embedded, so the text encoder never meets an unencodable string.
    """
    names = [printable(str(n).strip()) for n in names]
    if not names or not any(names):
        raise LabelError(f"{source}: no class names given")
    if "" in names:
        raise LabelError(f"{source}: empty class name at position {names.index('') + 1}")
    seen: dict[str, str] = {}
    for name in names:
        key = name.casefold()
        if key in seen:
            raise LabelError(f"{source}: duplicate class name {name!r} (also given as {seen[key]!r})")
        seen[key] = name
    return names


def _read_list(path: Path, key: str, error: type[Exception]) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: unreadable ({exc})") from exc
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise error(f"{path}: malformed JSON ({exc})") from exc
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, dict) and all(k.isdigit() for k in data):
            data = [data[k] for k in sorted(data, key=int)]
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise error(f"{path}: expected a JSON list of strings or an object with '{key}'")
        return data
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def class_prompts(class_names: Sequence[str], prompts: str | Path | Sequence[str] | Mapping[str, Sequence[str]]
                  ) -> list[list[str]]:
    """The prompts of each class, in class order: templates x classes, or a class -> prompts mapping.

    ``prompts`` is a template set (name, file or list, see :func:`load_templates`), each template
    filled with every class name; or a mapping such as CuPL's ``{class: [sentences]}``, which must
    give at least one prompt for every class. Mapping keys match exactly, else ignoring case and
    underscores (CuPL writes "aquarium fish" where CLIP_benchmark's CIFAR-100 names say "aquarium_fish").
    """
    names = check_class_names(list(class_names), "class names")
    if isinstance(prompts, Mapping):
        loose = {_loose(key): value for key, value in prompts.items()}
        found = {name: prompts.get(name) or loose.get(_loose(name)) for name in names}
        missing = [name for name in names if not found[name]]
        if missing:
            raise LabelError(f"prompt mapping gives no prompts for class {missing[0]!r}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return [[str(p) for p in found[name]] for name in names]
    templates = load_templates(prompts)
    return [[fill_template(t, name) for t in templates] for name in names]


def _loose(name: str) -> str:
    """A class name compared loosely, ignoring case, underscores and repeated spaces ("aquarium_fish")."""
    return " ".join(str(name).replace("_", " ").split()).casefold()


def distinct_class_names(names: Sequence[str]) -> list[str]:
    """A built-in class-name list with duplicates made distinct, for the zero-shot head.

    CLIP_benchmark's ImageNet list (OpenAI's curated names) names two pairs of classes alike; one of
    each pair gets its WordNet synset's own first lemma (see ``IMAGENET_DUPLICATES``). Any other
    duplicate gets `` (2)``, `` (3)``... appended. User-given duplicate labels stay an error
    (:func:`check_class_names`).
    """
    out = list(names)
    for index, replacement in IMAGENET_DUPLICATES.items():
        if len(out) == 1000 and index < len(out) and out[index] == replacement[0]:
            out[index] = replacement[1]
    seen: dict[str, int] = {}
    for i, name in enumerate(out):
        key = name.casefold()
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            out[i] = f"{name} ({seen[key]})"
    return out


# First word -> how the descriptor joins the class name (the authors' ``make_descriptor_sentence``).
_WHICH_IS = ("a", "an", "used")
_WHICH = ("has", "often", "typically", "may", "can")
_FIRST_WORD = re.compile(r"[^\W\d_]+")


def descriptor_clause(descriptor: str) -> str:
    """The relative clause for one descriptor, after the authors' ``make_descriptor_sentence``.

    "a"/"an"/"used ..." -> "which is ...", "has/often/typically/may/can ..." -> "which ...", else
    "which has ...". Departure from their code: the rules match the descriptor's whole first word, not
    a prefix of the string. Their ``startswith('a')`` turns "antennae" into "which is antennae" (and
    "aircraft", "almond-shaped eyes" alike), ``startswith('can')``/``('may')`` turn "candles",
    "mayonnaise" into "which candles", "which mayonnaise"; here those get "which has ...".
    The empty descriptor gives no clause (see :func:`descriptor_sentence`).
    """
    if not descriptor:
        return ""
    match = _FIRST_WORD.match(descriptor)
    first = match.group(0) if match else ""
    if first in _WHICH_IS:
        return f"which is {descriptor}"
    if first in _WHICH:
        return f"which {descriptor}"
    return f"which has {descriptor}"


def descriptor_sentence(template: str, class_name: str, descriptor: str, phrase: bool = True,
                        suffix: str = "") -> str:
    """"{template filled with the class name}, {clause}{suffix}" (their ``prepend`` mode, ``between_text=', '``).

    A filled template that ends in "." takes the clause before its full stop: "A photo of a {c}." gives
    "A photo of a cat, which has antennae." (DCLIP's and WaffleCLIP's ``label_before_text`` + class name +
    clause + ``label_after_text='.'``), not "a photo of a cat., which has antennae". ``suffix`` is appended
    after everything. ``phrase=False`` uses the descriptor as it stands (their
    ``apply_descriptor_modification=False``). Departure: an empty descriptor gives the filled template
    unchanged (plus ``suffix``), so a set of one "" per class is exactly the template classifier; their code
    would embed "cat, which has ".
    """
    head = fill_template(template, class_name)
    clause = descriptor_clause(descriptor) if phrase else descriptor
    if not clause:
        return f"{head}{suffix}"
    if head.endswith("."):
        return f"{head[:-1]}, {clause}.{suffix}"
    return f"{head}, {clause}{suffix}"
