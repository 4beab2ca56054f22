"""``cliplab describe``: write a class-description set (DCLIP descriptors or CuPL sentences) with a language model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from ..errors import CliplabError, LLMError
from .common import DataOptions, command, console, err_console


def _class_names(labels: str | None, labels_file: Path | None, dataset: str | None, data: DataOptions) -> list[str]:
    """Class names from exactly one of --labels, --labels-file, --dataset (named: the curated list, no data needed)."""
    from ..data import builtin_class_names, distinct_class_names, parse_labels, read_class_names

    given = [x for x in (labels, labels_file, dataset) if x is not None]
    if len(given) != 1:
        raise CliplabError("give the classes with exactly one of --labels, --labels-file or --dataset")
    if labels is not None:
        return parse_labels(labels)
    if labels_file is not None:
        return read_class_names(labels_file)
    curated = builtin_class_names(dataset.lower().replace("-", "_"))
    if curated:
        return distinct_class_names(curated)
    from ..data import load_dataset

    names = list(load_dataset(dataset, data.data_root, data.split).class_names)
    if not names:
        raise CliplabError(f"{dataset}: has no class names to describe (an unlabelled folder?)")
    return names


@command
def describe(
    labels: str = typer.Option(None, "--labels", "-l", help='Comma-separated class names, e.g. "cat,dog,car".'),
    labels_file: Path = typer.Option(None, "--labels-file", help="Class names, one per line (or JSON list)."),
    dataset: str = typer.Option(None, "--dataset", "-d", help="Describe a dataset's classes: a name (cifar10, ...) "
                                "or a folder/manifest."),
    style: str = typer.Option("dclip", "--style", help="dclip: short visual attribute phrases (paper 7); cupl: full "
                              "sentences answering several questions per class (CuPL)."),
    llm: str = typer.Option(..., "--llm", help="Language model: replay:FILE, http://HOST:PORT/v1, openai:MODEL or "
                            "hf:PATH (HTTP key from CLIPLAB_LLM_API_KEY or OPENAI_API_KEY)."),
    llm_model: str = typer.Option(None, "--llm-model", help="Model name for an http:// endpoint (default: "
                                  "$CLIPLAB_LLM_MODEL)."),
    output: Path = typer.Option(None, "--output", "-o", help="Description set to write (.json, or .json.gz)."),
    domain: str = typer.Option(None, "--domain", help='Hint added to every prompt, e.g. "a type of texture".'),
    n_per_prompt: int = typer.Option(None, "--n", min=1, help="Items asked per prompt (default: 8 DCLIP phrases, "
                                     "5 sentences for each CuPL question)."),
    mention: str = typer.Option("prepend", "--mention", help="CuPL sentences that do not name their class: prepend "
                                "the class name, drop them, or keep them as they are."),
    record: Path = typer.Option(None, "--record", help="Also merge every answer into this replay file "
                                "({prompt: answer}; reuse it with --llm replay:FILE, offline)."),
    show_prompts: bool = typer.Option(False, "--show-prompts", help="Print the prompts (one JSON object "
                                      "{class: [prompts]}) and ask nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    data: DataOptions = None,
):
    """Write class descriptions with a language model (DCLIP phrases or CuPL sentences) to a JSON file.

    Answers are cached on disk, so a rerun asks only what failed. Exit code 1 when some classes are missing from
    the file (listed with their reasons), 2 when none could be described (e.g. the endpoint is down)."""
    import json

    from ..data.describe import build_prompts, generate_descriptions
    from ..data.descriptions import save_descriptions
    from ..llm import load_llm

    names = _class_names(labels, labels_file, dataset, data)
    if show_prompts:
        prompts = build_prompts(names, style, n_per_prompt=n_per_prompt, domain=domain)
        typer.echo(json.dumps(prompts, indent=1, ensure_ascii=False))
        return
    if output is None:
        raise CliplabError("give the file to write with --output/-o (a .json or .json.gz)")
    if not (output.name.endswith(".json") or output.name.endswith(".json.gz")):
        raise CliplabError(f"--output {output}: use a .json or .json.gz file name")
    endpoint = llm.startswith(("http://", "https://"))
    if endpoint and not (llm_model or os.environ.get("CLIPLAB_LLM_MODEL")):  # the backend would say "model="
        raise LLMError(f"--llm {llm}: no model name for this endpoint: pass --llm-model NAME or set "
                       "CLIPLAB_LLM_MODEL")
    kwargs = {"model": llm_model} if llm_model and endpoint else {}
    model = load_llm(llm, **kwargs)
    descriptions, failures = generate_descriptions(model, names, style, n_per_prompt=n_per_prompt, domain=domain,
                                                   mention=mention, record=record, progress=not quiet)
    if not descriptions:
        first = next(iter(failures.values()), "no answer")
        raise LLMError(f"no class could be described ({len(failures)} asked): {first}")
    save_descriptions(descriptions, output)

    table = Table(title=f"{style} descriptions from {model.backend_id} ({model.model})")
    table.add_column("class")
    table.add_column("count", justify="right")
    table.add_column("first description", overflow="fold")
    for name in names:
        if name in descriptions:
            table.add_row(name, str(len(descriptions[name])), descriptions[name][0])
        else:
            table.add_row(name, "0", Text("missing", style="red"))
    console.print(table)
    if failures:
        err_console.print(Text.assemble(("warning: ", "yellow"), f"{len(failures)} of {len(names)} classes have no "
                                        f"descriptions (missing from {output}):"), highlight=False)
        for name, reason in failures.items():
            err_console.print(f"  {name}: {reason}", markup=False, highlight=False, soft_wrap=True)
        err_console.print("  rerun the same command to ask only these (answers already received are cached)",
                          markup=False, highlight=False)
    llm_calls = f"{model.requests} LLM request(s), {model.cache_hits} answer(s) from the cache"
    console.print(f"wrote {output}: {len(descriptions)} classes; {llm_calls}", markup=False, highlight=False)
    if record is not None:
        console.print(f"recorded answers in {record}", markup=False, highlight=False)
    if failures:
        sys.exit(1)
