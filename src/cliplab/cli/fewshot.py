"""``cliplab fewshot``: every few-shot method on one protocol, several shot counts and seeds."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from .common import (
    HOLDOUT_OPTION,
    NO_TRAIN_SPLIT,
    DataOptions,
    RunOptions,
    command,
    console,
    method_list,
    param_value,
    report_skipped,
)

DEFAULT_METHODS = "zeroshot,ncm,linear-probe,tip-adapter,tip-adapter-f,gda,caps-adapter"
# real parameters (a test checks each against the method's own): AMU's auxiliary model, Tip-Adapter's search grid
PARAM_EXAMPLES = "amu.aux_model=ViT-S-32:openai or tip-adapter.search_step=[20,5]"


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliplabError(f"{option} {text!r}: give comma-separated whole numbers, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise CliplabError(f"{option} {text!r}: give positive whole numbers")
    return values


def _method_params(items: list[str] | None, methods: list[str]) -> dict[str, dict]:
    """``METHOD.NAME=VALUE`` pairs by method (values: :func:`param_value`)."""
    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        method, dot, name = key.rpartition(".")
        if not sep or not dot or not name:
            raise CliplabError(f"--param {item!r}: write it as METHOD.NAME=VALUE")
        if method not in methods:
            raise CliplabError(f"--param {item!r}: {method!r} is not among --methods")
        out.setdefault(method, {})[name] = param_value(value)
    return out


@command
def fewshot(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Named dataset, folder with train/ and test/, or a "
                                "manifest with a split field."),
    methods: str = typer.Option(DEFAULT_METHODS, "--methods", help="Comma-separated registered methods: "
                                + method_list() + "."),
    shots: str = typer.Option("1,2,4,8,16", "--shots", help="Shots per class, comma-separated."),
    seeds: str = typer.Option("1,2,3", "--seeds", help="Seeds of the shot draws, comma-separated."),
    views: int = typer.Option(10, "--views", min=1, help="Augmented views per training image for the methods "
                              "that use them (cached)."),
    templates: str = typer.Option(None, "--templates", "-t", help="Template set or file for every method that "
                                  "takes templates (default: each method's own, as cliplab evaluate; the few-shot "
                                  "heads': the dataset's CLIP_benchmark set, else 'imagenet7')."),
    params: list[str] = typer.Option(None, "--param", help="A method's parameter, METHOD.NAME=VALUE (repeatable), "
                                     "e.g. " + PARAM_EXAMPLES + "."),
    output_dir: Path = typer.Option(Path("results/fewshot"), "--output-dir", "-o", help="Where JSON, splits and "
                                    "the curve go."),
    base_to_new: bool = typer.Option(False, "--base-to-new", help="CoCoOp's base-to-new protocol: train on the "
                                     "first half of the classes (ceil(C/2), the dataset's order), report base "
                                     "accuracy, new-class accuracy (through what the method learned; n/a for a "
                                     "method that cannot score other classes) and their harmonic mean."),
    holdout: float = HOLDOUT_OPTION,
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Few-shot adaptation: mean ± std top-1 per method and shot count over seeds, a curve, a JSON per run."""
    data.holdout = holdout
    from ..data import has_labels
    from ..features.values import check_shot_counts
    from ..heads.registry import method_names

    names = [m.strip() for m in methods.split(",") if m.strip()]
    known = set(method_names())  # read from the registrations without importing the heads
    for name in names:
        if name not in known:
            from ..heads import head_entry

            head_entry(name)  # the registry's own error for an unknown method (with suggestions)
    shot_list, seed_list = _ints(shots, "--shots"), _ints(seeds, "--seeds")
    method_params = _method_params(params, names)
    # the data first: a typo in --dataset/--split is answered before torch loads
    test = data.load(dataset, None, run.hash_content, output_dir)
    if test.split == "all" and data.split is None:  # a folder without splits, read whole
        raise CliplabError(NO_TRAIN_SPLIT.format(dataset=dataset, what="few-shot"))
    train = data.load(dataset, "train", run.hash_content, output_dir)
    for part in (train, test):
        report_skipped(part)
        if not has_labels(part):
            raise CliplabError(f"{dataset} ({part.split}): has no labels")
    check_shot_counts(train.labels, train.class_names, max(shot_list), where=f"{train.name} (train)")
    from ..eval.fewshot import run_fewshot
    from ..heads import head_entry

    for name in names:
        head_entry(name)  # unknown methods fail before any model loads or image is embedded
    backbone = run.load_backbone()

    def progress(record: dict) -> None:
        if run.quiet:
            return
        if base_to_new:
            new = "n/a" if record["new_acc1"] is None else f"{100 * record['new_acc1']:.2f}%"
            harmonic = "n/a" if record["harmonic_mean"] is None else f"{100 * record['harmonic_mean']:.2f}%"
            console.print(f"{record['method']:>14} {record['shots']:>3} shots seed {record['seed']}: "
                          f"base {100 * record['base_acc1']:.2f}%  new {new}  H {harmonic}", markup=False)
            return
        console.print(f"{record['method']:>14} {record['shots']:>3} shots seed {record['seed']}: "
                      f"top-1 {100 * record['acc1']:.2f}%  {record['chosen'] or ''}", markup=False)

    result = run_fewshot(backbone, train, test, names, shot_list, seed_list, templates=templates, views=views,
                         params=method_params,
                         output_dir=output_dir, cache_dir=run.cache_dir, batch_size=run.batch_size,
                         workers=run.workers, progress=not run.quiet, on_run=progress, base_to_new=base_to_new)
    weights = " · random weights" if backbone.info.random_weights else ""
    if base_to_new:
        from ..eval.fewshot import base_new_cell

        table = Table(title=f"base-to-new top-1: base / new / H (mean ± std over seeds {seeds}) · {test.name} · "
                            f"{backbone.display_name}{weights}")
        table.add_column("method")
        for k in shot_list:
            table.add_column(f"{k} shot{'s' if k > 1 else ''}", justify="right")
        for name in names:
            table.add_row(name, *(base_new_cell(result.base_to_new[name][k]) for k in shot_list))
        console.print(table)
        for kind, path in result.files.items():
            console.print(f"{kind}: {path}")
        return
    table = Table(title=f"few-shot top-1 (mean ± std over seeds {seeds}) · {test.name} · "
                        f"{backbone.display_name}{weights}")
    table.add_column("method")
    for k in shot_list:
        table.add_column(f"{k} shot{'s' if k > 1 else ''}", justify="right")
    for name in names:
        table.add_row(name, *(f"{100 * result.table[name][k][0]:.2f} ± {100 * result.table[name][k][1]:.2f}"
                              for k in shot_list))
    console.print(table)
    for kind, path in result.files.items():
        console.print(f"{kind}: {path}")
