"""Shared CLI pieces: the option groups every command takes (declared once), one-line errors, model loading."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console, ConsoleDimensions
from rich.text import Text

from ..errors import CliplabError

UNWRAPPED_WIDTH = 100_000  # "no limit" for rich: tables do not expand, so lines stay as long as their content


class _Console(Console):
    """rich's Console, except that output that is not a terminal (a pipe, a file, a log, a test runner) is never
    wrapped, folded or elided at the terminal width (80 or $COLUMNS there): a path or a summary line stays whole on
    one line, so it can be copied and grepped. On a terminal rich's own width applies. Decided at each print, since
    the stream (sys.stdout/sys.stderr) may be replaced after import."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return size if self.is_terminal else ConsoleDimensions(max(size.width, UNWRAPPED_WIDTH), size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


console = _Console()
err_console = _Console(stderr=True)
STATE = {"debug": False}
RECIPE_PREFIX = "recipe:"
DEFAULT_MODEL_SPEC = "ViT-B-32:laion2b_s34b_b79k"  # = cliplab.models.DEFAULT_MODEL_SPEC (a test keeps them equal)


@dataclass
class RunOptions:
    """Model, device, cache and batch options, shared by every command that runs a model."""

    model: str | None = None
    pretrained: str | None = None
    arch: str | None = None
    config: Path | None = None
    quick_gelu: bool | None = None
    device: str | None = None
    cache_dir: Path | None = None
    batch_size: int = 64
    workers: int | None = None
    seed: int = 0
    quiet: bool = False
    hash_content: bool = False
    precision: str | None = None
    runtime: str | None = None
    long_text: str | None = None
    long_text_positions: bool = False
    build_recipe: bool = False

    def model_name(self) -> str:
        """The ``load_model`` name of ``--model``: a ``recipe:NAME`` is its built folder. A recipe not built yet
        is an error saying how long a build takes and how to start one, unless ``--build-recipe`` was given."""
        name = self.model or DEFAULT_MODEL_SPEC
        if not name.startswith(RECIPE_PREFIX):
            return name
        from ..train.recipes import recipe_model

        def announce(line: str) -> None:
            err_console.print(Text.assemble(("note: ", "yellow"), line), soft_wrap=True)

        recipe = name[len(RECIPE_PREFIX):]
        with interrupted_build(recipe):
            return str(recipe_model(recipe, progress=not self.quiet, build=self.build_recipe, announce=announce))

    def load_backbone(self):
        """``load_model`` with these options; prints notes about random weights or a guessed activation.
        The backbone's ``display_name`` is ``--model`` as given (``recipe:NAME``, the path, the open_clip name)."""
        from ..models import load_model

        given = self.model or DEFAULT_MODEL_SPEC
        name = self.model_name()
        with console.status(f"loading {given}", spinner="dots"):
            backbone = load_model(name, self.pretrained, self.device, arch=self.arch, config=self.config,
                                  quick_gelu=self.quick_gelu, seed=self.seed, precision=self.precision,
                                  runtime=self.runtime, long_text=self.long_text,
                                  long_text_positions=self.long_text_positions)
        if given != name:
            backbone.display_name = given
        name = given
        if backbone.info.random_weights:
            err_console.print(Text.assemble(("note: ", "yellow"), f"{name} has random weights; "
                                            "predictions are meaningless"))
        if backbone.info.extra.get("warning"):
            err_console.print(Text.assemble(("warning: ", "yellow"), backbone.info.extra["warning"]))
        return backbone

    def embed(self, backbone, dataset):
        """``embed_images`` with these options."""
        from ..features import embed_images

        features = embed_images(backbone, dataset, self.cache_dir, batch_size=self.batch_size,
                                num_workers=self.workers, progress=not self.quiet)
        for line in features.repairs:
            err_console.print(Text.assemble(("warning: ", "yellow"), f"repaired the feature cache: {line}"))
        return features


@dataclass
class DataOptions:
    """Where named datasets live, which split to read, and the hold-out that splits a folder without splits."""

    data_root: Path | None = None
    split: str | None = None
    holdout: float | None = None

    def load(self, dataset: str, split: str | None = None, hash_content: bool = False,
             output_dir: Path | None = None):
        """``load_dataset(dataset, split or --split)``; with ``--holdout F`` a folder without splits is split into
        train/val/test once (seeded, stratified; the item ids saved under ``output_dir/splits``, reused after)."""
        from ..data import load_dataset

        split = split or self.split
        if self.holdout is None:
            return load_dataset(dataset, self.data_root, split, hash_content)
        parts = holdout_parts(dataset, self, hash_content, output_dir)
        if (split or "test") not in parts:
            raise CliplabError(f"--split {split}: --holdout makes the splits train, val and test")
        return parts[split or "test"]


NO_TRAIN_SPLIT = ("{dataset}: has no splits (no train/ and test/ folders, no 'split' field) and {what} needs a "
                  "train split: add --holdout 0.2 to split it (seeded, stratified, saved), or give a folder with "
                  "train/ and test/")
_HOLDOUTS: dict = {}


def holdout_parts(dataset: str, data: DataOptions, hash_content: bool, output_dir: Path | None) -> dict:
    """train/val/test of ``dataset`` by ``--holdout`` (``data.splits.holdout_splits``), saved as a split file
    ``<output_dir>/splits/holdout_<name>_<fraction>_seed0.json`` and repeated from it when it exists."""
    import json

    from ..data import load_dataset
    from ..data.splits import HOLDOUT_SEED, apply_holdout_record, holdout_record, holdout_splits
    from ..fileio import atomic_write_text

    key = (dataset, str(data.data_root), data.holdout, hash_content, str(output_dir))
    if key in _HOLDOUTS:
        return _HOLDOUTS[key]
    whole = load_dataset(dataset, data.data_root, None, hash_content)
    parts = holdout_splits(whole, data.holdout, HOLDOUT_SEED)  # checks the fraction and that there are no splits
    folder = Path(output_dir or ".") / "splits"
    path = folder / f"holdout_{whole.name}_{data.holdout:g}_seed{HOLDOUT_SEED}.json".replace("/", "-")
    if path.is_file():
        parts = apply_holdout_record(whole, json.loads(path.read_text()))
    else:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(holdout_record(parts), indent=1))
    for part in parts.values():
        part.split_info = {**part.split_info, "holdout": {**part.split_info["holdout"], "file": str(path)}}
    _HOLDOUTS[key] = parts
    return parts


RUN_OPTIONS = {
    "model": typer.Option(None, "--model", "-m", help="Model: open_clip ARCH[:TAG], hf-hub:ORG/REPO, a weights file "
                          "or folder, recipe:NAME (a model cliplab trains here, see cliplab pretrain --recipe), or "
                          f"'tiny' (random weights, offline try-out). Default: {DEFAULT_MODEL_SPEC}."),
    "pretrained": typer.Option(None, "--pretrained", help="open_clip pretrained tag (or 'random')."),
    "arch": typer.Option(None, "--arch", help="open_clip architecture of a local weights file."),
    "config": typer.Option(None, "--config", help="open_clip model-config JSON of a local weights file."),
    "quick_gelu": typer.Option(None, "--quick-gelu/--no-quick-gelu", help="Force the activation (default: chosen "
                               "from the weights: QuickGELU for OpenAI-trained ones)."),
    "device": typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)."),
    "cache_dir": typer.Option(None, "--cache-dir", help="Feature cache folder (default: $CLIPLAB_CACHE/features, "
                              "else ~/.cache/cliplab/features)."),
    "batch_size": typer.Option(64, "--batch-size", "-b", min=1, help="Images per forward pass."),
    "workers": typer.Option(None, "--workers", "-j", min=0, help="Decoding worker processes (default: a quarter of "
                            "the cores on CPU, one per core up to 8 on GPU; 0 decodes in the main process)."),
    "seed": typer.Option(0, "--seed", help="Random seed (random-weight models, sampling)."),
    "quiet": typer.Option(False, "--quiet", "-q", help="No progress bars."),
    "hash_content": typer.Option(False, "--hash-content", help="Key the cache by file content (sha256) instead of "
                                 "path, size and modification time."),
    "precision": typer.Option(None, "--precision", help="Inference precision: fp32, bf16 (autocast, CPU or GPU) or "
                              "fp16 (CUDA only). Default: DEFAULT_PRECISION in cliplab.models.runtime (fp32 now)."),
    "runtime": typer.Option(None, "--runtime", help="Inference runtime: torch, onnx (onnxruntime on the CPU; needs "
                            "pip install 'cliplab[onnx]'; exported once per model) or int8 (dynamic quantisation, "
                            "CPU). Default: DEFAULT_RUNTIME in cliplab.models.runtime (torch now)."),
    "long_text": typer.Option(None, "--long-text", metavar="[truncate|chunk|error]",
                              help="Texts longer than the model's context: truncate (default; end-of-text token "
                              "kept, a warning counts them), chunk (embed context-sized pieces and average) or error."),
    "long_text_positions": typer.Option(False, "--long-positions", help="Stretch the text positional embedding as "
                                        "Long-CLIP does (77 -> 248 tokens, zero-shot; model id gets +longpos20x4)."),
    "build_recipe": typer.Option(False, "--build-recipe", help="With --model recipe:NAME not built yet: train it "
                                 "now (minutes; cliplab pretrain --recipe NAME does the same). Without it such a "
                                 "--model is an error saying how long a build takes."),
}
DATA_OPTIONS = {
    "data_root": typer.Option(None, "--data-root", help="Folder holding named datasets (default: $CLIPLAB_DATA or "
                              "../shared/datasets)."),
    "split": typer.Option(None, "--split", help="train, val or test (default: test for named datasets; a folder "
                          "or manifest without splits is read whole). cliplab datasets lists each one's splits."),
}
_GROUPS = {"run": (RunOptions, RUN_OPTIONS), "data": (DataOptions, DATA_OPTIONS)}
# --holdout: only the commands that read train and test parts (zeroshot, evaluate, fewshot) take it
HOLDOUT_OPTION = typer.Option(None, "--holdout", metavar="FRACTION", min=0.0, max=1.0, help="Split a folder of class "
                              "sub-folders without train/ test/ into test (this fraction of each class), val (10% of "
                              "the rest) and train, seeded and stratified; the item ids are saved under "
                              "OUTPUT_DIR/splits and reused, and recorded in every results JSON.")


def shared_options(command):
    """Give ``command`` the option groups named by its ``run: RunOptions`` / ``data: DataOptions`` parameters.

    The options are declared once (``RUN_OPTIONS``, ``DATA_OPTIONS``); typer sees them as the command's
    own keyword parameters, and the command receives them packed into the dataclass.
    """
    signature = inspect.signature(command)
    groups = [name for name in _GROUPS if name in signature.parameters]
    own = [p for name, p in signature.parameters.items() if name not in groups]
    added, annotations = [], {k: v for k, v in command.__annotations__.items() if k not in groups}
    for group in groups:
        cls, options = _GROUPS[group]
        types = typing.get_type_hints(cls)
        for name, option in options.items():
            annotation = types[name]
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
            annotations[name] = annotation

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        for group in groups:
            cls, options = _GROUPS[group]
            kwargs[group] = cls(**{name: kwargs.pop(name) for name in options})
        return command(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + added)
    wrapper.__annotations__ = annotations
    return wrapper


def param_value(text: str):
    """A --param value: JSON where it parses (numbers, booleans, lists), else the string itself."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def default_templates(templates: str | None, dataset_name: str) -> str:
    """--templates as given, else the dataset's CLIP_benchmark template set, else 'imagenet7' (the template
    classifier's declared default: ``cliplab.eval.inputs.dataset_templates``)."""
    from ..eval.inputs import dataset_templates

    return templates or dataset_templates(dataset_name)


def method_list(family: str | None = None, *, need: str | None = None, gives: str | None = None,
                trained: bool | None = None) -> str:
    """Registered method names for a help text, comma-separated (read from the registrations, not typed here);
    ``trained=False`` keeps those that need no training data."""
    from ..heads.registry import method_names

    return ", ".join(method_names(family, need=need, gives=gives, trained=trained))


def description_kind(descriptions: dict[str, list[str]]) -> tuple[str, float]:
    """``("sentences", share)`` for CuPL-style text (whole sentences: ending in a full stop, question or exclamation
    mark), else ``("descriptors", share)`` for DCLIP-style phrases ("has antennae"); ``share`` is the fraction of
    sentences. The released sets are far apart: every CuPL sentence ends so, no DCLIP descriptor does."""
    texts = [text.strip() for values in descriptions.values() for text in values if text.strip()]
    share = sum(text.endswith((".", "!", "?")) for text in texts) / max(len(texts), 1)
    return ("sentences" if share >= 0.5 else "descriptors"), share


def description_method(method: str | None, descriptions: Path | None) -> str:
    """The head for ``--descriptions``: ``--method`` if it takes descriptions; without one (or zeroshot), CuPL for a
    file of sentences and DCLIP for descriptor phrases (:func:`description_kind`). Says which runs, and warns when
    sentences go to DCLIP (which phrases each as "a photo of a {c}, which {descriptor}")."""
    if descriptions is None:
        return method or "zeroshot"
    from ..data.descriptions import read_descriptions

    kind, share = description_kind(read_descriptions(descriptions))
    seen = (f"{descriptions.name} reads as {'CuPL sentences' if kind == 'sentences' else 'DCLIP descriptor phrases'} "
            f"({100 * share:.0f}% of its texts are whole sentences)")
    chosen = method not in (None, "zeroshot")
    if not chosen:
        method = "cupl" if kind == "sentences" else "dclip"
    from ..heads import head_entry
    from ..heads.registry import method_names

    if "descriptions" not in head_entry(method).needs:
        raise CliplabError(f"--method {method} takes no --descriptions (description methods: "
                           f"{', '.join(method_names(need='descriptions'))})")
    if chosen and method == "dclip" and kind == "sentences":
        err_console.print(Text.assemble(("warning: ", "yellow"), f"{seen}, but --method dclip phrases each text as a "
                                        "descriptor ('a photo of a {c}, which ...'); --method cupl scores sentences "
                                        "as they are"), soft_wrap=True, highlight=False)
    else:
        err_console.print(Text.assemble(("note: ", "yellow"), f"{seen}: scored with --method {method}"
                                        + ("" if chosen else " (pass --method to choose another)")),
                          soft_wrap=True, highlight=False)
    return method


@contextlib.contextmanager
def interrupted_build(recipe: str | None = None, folder: Path | None = None):
    """Ctrl-C during a training run: say what was kept (the last checkpoint) or that nothing was, and exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        from ..train.loop import CHECKPOINT, STATE_DIR

        if folder is None and recipe is not None:
            from ..train.recipes import recipe_config, recipe_folder

            folder = recipe_folder(recipe_config(recipe), recipe)
        checkpoint = None if folder is None else Path(folder) / STATE_DIR / CHECKPOINT
        again = f"cliplab pretrain --recipe {recipe}" if recipe else "the same command"
        if checkpoint is not None and checkpoint.is_file():
            err_console.print(f"interrupted: the last checkpoint is kept in {checkpoint.parent}; run {again} "
                              "to resume from it", highlight=False, soft_wrap=True)
        else:
            err_console.print("interrupted before the first checkpoint: nothing was kept; a new run starts from the "
                              "beginning", highlight=False, soft_wrap=True)
        sys.exit(130)


def configure_logging(debug: bool) -> None:
    """Third-party chatter (open_clip's root logger, warnings) only with --debug."""
    STATE["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.CRITICAL, force=True)
    if not debug:
        warnings.filterwarnings("ignore")


def friendly_errors(command):
    """Turn CliplabError (and missing files) into one red line and exit code 2; --debug shows tracebacks."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (CliplabError, OSError) as exc:
            if STATE["debug"]:
                raise
            err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            err_console.print("interrupted: finished work is cached; run the same command again to resume")
            sys.exit(130)

    return wrapper


def command(function):
    """A CLI command: shared option groups plus one-line errors."""
    return friendly_errors(shared_options(function))


def report_failures(failures, limit: int | None = None) -> None:
    """List images that could not be read, with their reasons."""
    if not failures:
        return
    err_console.print(f"[yellow]skipped {len(failures)} file(s) that could not be read:[/]")
    for item, reason in failures[:limit]:
        err_console.print(f"  {item}: {reason}", markup=False, highlight=False, soft_wrap=True)
    if limit is not None and len(failures) > limit:
        err_console.print(f"  ... and {len(failures) - limit} more")


def report_fit_problems(summary: dict, method, limit: int = 3) -> None:
    """What a head's fit could not do (LLM failures per class set, synonyms not found, corpus rows skipped...):
    every non-empty entry of its fit summary that the method declares a problem list (``fit_problems`` at its
    registration; ``method``: its name or the head), counted, with examples."""
    from ..heads import head_entry

    declared = head_entry(method).fit_problems
    for key, value in summary.items():
        if key not in declared or not value:
            continue
        if isinstance(value, dict):
            items = [f"{k}: {v}" for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            items = [str(v) for v in value]
        else:
            items = []
        count = len(items) if items else value
        err_console.print(Text.assemble(("warning: ", "yellow"), f"{key.replace('_', ' ')}: {count} (see the results "
                                        "JSON, cliplab.fit)"), soft_wrap=True)
        for line in items[:limit]:
            err_console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        if len(items) > limit:
            err_console.print(f"  ... and {len(items) - limit} more")


def report_skipped(dataset, limit: int = 10) -> None:
    """List what a folder scan left out (no image extension, dangling links, loops, unreadable folders...)."""
    from ..data import printable

    skipped = list(getattr(dataset, "skipped", ()))
    if not skipped:
        return
    err_console.print(Text.assemble(("note: ", "yellow"), f"{len(skipped)} path(s) left out of the scan:"))
    root = getattr(dataset, "root", None)
    for path, reason in skipped[:limit]:
        shown = path
        if root is not None:
            with contextlib.suppress(ValueError):
                shown = Path(path).relative_to(root)
        err_console.print(f"  {printable(str(shown))}: {reason}", markup=False, highlight=False, soft_wrap=True)
    if len(skipped) > limit:
        err_console.print(f"  ... and {len(skipped) - limit} more")
