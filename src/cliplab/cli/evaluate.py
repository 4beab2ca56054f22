"""``cliplab zeroshot`` and ``cliplab evaluate``: benchmark numbers."""

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
    description_method,
    err_console,
    method_list,
    param_value,
    report_fit_problems,
    report_skipped,
)

DatasetOpt = typer.Option(..., "--dataset", "-d", help="cifar10, cifar100, mnist, fashion_mnist, imagenet, "
                          "imagenette, dtd, a class-folder path or a .csv/.jsonl/.json manifest.")
OutputDirOpt = typer.Option(Path("results"), "--output-dir", "-o", help="Where JSON and PNGs go.")
TemplatesOpt = typer.Option(None, "--templates", "-t", help="Template set or file (default: the method's own; "
                            "for the template classifier and the few-shot heads the dataset's CLIP_benchmark set, "
                            "else 'imagenet7').")


def _load(dataset: str, data: DataOptions, run: RunOptions, split: str | None = None, labelled: bool = False,
          output_dir: Path | None = None):
    """The dataset (``--holdout``: the part of its hold-out split); with ``labelled``, one without labels is refused
    before any model is loaded."""
    from ..data import has_labels

    value = data.load(dataset, split, run.hash_content, output_dir)
    report_skipped(value)
    if labelled and not has_labels(value):
        raise CliplabError(f"{dataset}: has no labels to evaluate against (an unlabelled folder?); use "
                           "cliplab classify --labels ... or cliplab embed for unlabelled images")
    return value


def _parse_params(params: list[str]) -> dict:
    """``key=value`` pairs (values: :func:`param_value`)."""
    out = {}
    for item in params or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliplabError(f"--param {item!r}: write it as NAME=VALUE")
        out[key] = param_value(value)
    return out


def _print_report(report, title: str) -> None:
    table = Table(title=title + (" · random weights" if "random" in report.record["cliplab"]["weights"] else ""))
    for column in ("top-1", "top-5", "mean per-class recall", "ECE"):
        table.add_column(column, justify="right")
    m = report.metrics
    table.add_row(*(f"{100 * m[k]:.2f}%" if m[k] == m[k] else "n/a (<5 classes)"
                    for k in ("acc1", "acc5", "mean_per_class_recall", "ece")))
    console.print(table)
    report_fit_problems(report.record["cliplab"].get("fit") or {}, report.record["cliplab"]["method"])
    failures = report.features.failures
    if failures:
        where = report.files.get("json", "the results JSON")
        err_console.print(f"[yellow]{len(failures)} image(s) skipped[/] (listed in {where})")
    for kind, path in report.files.items():
        console.print(f"{kind}: {path}")


@command
def zeroshot(
    dataset: str = DatasetOpt,
    templates: str = TemplatesOpt,
    method: str = typer.Option(None, "--method", help="A zero-shot method (default zeroshot): "
                               + method_list(family="zeroshot", trained=False) + "."),
    descriptions: Path = typer.Option(None, "--descriptions", help="A description set ({class: [descriptors or "
                                      "sentences]}, DCLIP or CuPL format) for a description method (default: cupl for "
                                      "sentences, dclip for descriptor phrases, detected and named; "
                                      "those taking one: " + method_list(need="descriptions") + ")."),
    llm: str = typer.Option(None, "--llm", help="Language model for the methods that ask one ("
                            + method_list(need="llm") + "): replay:FILE, http://HOST:PORT/v1 (OpenAI-compatible; key "
                            "from CLIPLAB_LLM_API_KEY), openai:MODEL or hf:PATH."),
    params: list[str] = typer.Option(None, "--param", help="Method parameter NAME=VALUE (repeatable)."),
    output_dir: Path = OutputDirOpt,
    holdout: float = HOLDOUT_OPTION,
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Zero-shot top-1/top-5/mean per-class recall/ECE; CLIP_benchmark-style JSON + confusion and reliability PNGs."""
    data.holdout = holdout
    kwargs = _parse_params(params)
    test = _load(dataset, data, run, labelled=True, output_dir=output_dir)  # typos answered before torch loads
    from ..eval import evaluate_zeroshot
    from ..heads import head_entry

    method = description_method(method, descriptions)
    if head_entry(method).needs_train:
        raise CliplabError(f"--method {method} needs training data: use cliplab evaluate --method {method}")
    if descriptions is not None:
        kwargs["descriptions"] = descriptions
    if llm is not None:
        kwargs["llm"] = llm
    backbone = run.load_backbone()
    # templates=None: the method's declared default (the template classifier: the dataset's set, else imagenet7)
    report = evaluate_zeroshot(backbone, test, templates, output_dir, run.cache_dir,
                               run.batch_size, run.workers, progress=not run.quiet, seed=run.seed, method=method,
                               embed=run.embed, **kwargs)
    _print_report(report, f"{method} · {test.name} ({test.split}, {len(report.features)} images) · "
                          f"{backbone.display_name}")


@command
def evaluate(
    method: str = typer.Option(None, "--method", help="Any registered method: " + method_list() + "."),
    dataset: str = DatasetOpt,
    head_dir: Path = typer.Option(None, "--head", help="Instead of --method: a head saved by cliplab train or "
                                  "--save-head, scored on --split as it is (not fitted again)."),
    shots: int = typer.Option(None, "--shots", min=1, help="Few-shot: this many training images per class "
                              "(drawn with --seed from the train split); default: the whole train split."),
    split_file: Path = typer.Option(None, "--split-file", help="Repeat a saved few-shot split (JSON of item ids)."),
    templates: str = TemplatesOpt,
    params: list[str] = typer.Option(None, "--param", help="Method parameter NAME=VALUE (repeatable)."),
    output_dir: Path = OutputDirOpt,
    save_head: Path = typer.Option(None, "--save-head", help="Save the fitted head to this folder (safetensors + "
                                   "JSON) for cliplab classify --head."),
    holdout: float = HOLDOUT_OPTION,
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Evaluate any method: fit on the train split (or a few-shot draw of it) when it needs data, test on --split."""
    data.holdout = holdout
    if shots is not None and split_file is not None:
        raise CliplabError("give --shots (a seeded draw) or --split-file (a saved one), not both")
    if (method is None) == (head_dir is None):
        raise CliplabError("give --method M (fit and evaluate) or --head DIR (a saved head), one of them")
    if head_dir is not None:
        return _evaluate_saved(head_dir, dataset, output_dir, run, data)
    from ..heads.registry import method_names

    known = method_names()  # read from the registrations, heads not imported: a misspelled method is answered first
    if method not in known:
        raise CliplabError(f"unknown method {method!r}; known: {', '.join(known)}")
    test_data = _load(dataset, data, run, labelled=True, output_dir=output_dir)  # typos answered before torch loads
    if test_data.split == "train":
        raise CliplabError("--split train: the test split must not be the training split")
    from ..eval.inputs import run_method
    from ..heads import head_entry

    entry = head_entry(method)
    if entry.needs_train and test_data.split == "all" and data.split is None:
        raise CliplabError(NO_TRAIN_SPLIT.format(dataset=dataset, what=f"--method {method}"))
    train_data = (_load(dataset, data, run, split="train", labelled=True, output_dir=output_dir)
                  if entry.needs_train else None)
    if train_data is not None and shots is not None:  # before the model loads and anything is embedded
        from ..features.values import check_shot_counts

        check_shot_counts(train_data.labels, train_data.class_names, shots, where=f"{train_data.name} (train)")
    backbone = run.load_backbone()
    done = run_method(method, backbone, test_data, train_data, templates=templates, params=_parse_params(params),
                      shots=shots if entry.needs_train else None, split_file=split_file if entry.needs_train else None,
                      seed=run.seed, output_dir=output_dir, cache_dir=run.cache_dir, batch_size=run.batch_size,
                      workers=run.workers, progress=not run.quiet, embed=run.embed, report_shots=shots)
    test, split_path = done.test, done.inputs.split_file
    _print_report(done.report, f"{method} · {test.dataset} ({test.split}, {len(test)} images)"
                               + (f" · {shots} shots, seed {run.seed}" if shots else "")
                               + f" · {backbone.display_name}")
    if split_path is not None:
        console.print(f"split: {split_path}")
    if save_head is not None:
        from ..heads.saving import save_head as write_head

        write_head(done.head, save_head, model_id=backbone.model_id, class_names=list(test.class_names),
                   model=backbone.display_name)
        console.print(f"head: {save_head}")


def _evaluate_saved(head_dir: Path, dataset: str, output_dir: Path, run: RunOptions, data: DataOptions) -> None:
    """``evaluate --head DIR``: a saved head scored on the test split (through its own model where it has one)."""
    from ..heads.saving import saved_class_names

    names = saved_class_names(head_dir)
    test_data = _load(dataset, data, run, labelled=True, output_dir=output_dir)
    if test_data.split == "train":
        raise CliplabError("--split train: the test split must not be the training split")
    if list(test_data.class_names) != names:
        raise CliplabError(f"{head_dir}: the head predicts {len(names)} classes ({', '.join(names[:3])}"
                           f"{', ...' if len(names) > 3 else ''}), not the {len(test_data.class_names)} of {dataset}")
    from ..eval.evaluate import evaluate as score
    from ..eval.inputs import test_features
    from ..heads.saving import load_head

    backbone = run.load_backbone()
    head = load_head(head_dir, backbone=backbone)
    test = test_features(head, backbone, test_data, cache_dir=run.cache_dir, batch_size=run.batch_size,
                         workers=run.workers, progress=not run.quiet, embed=run.embed)
    report = score(head, test, fitted=True, output_dir=output_dir, seed=run.seed)
    _print_report(report, f"{head_dir} · {test.dataset} ({test.split}, {len(test)} images) · {backbone.display_name}")
