"""``cliplab zeroshot`` and ``cliplab evaluate``: benchmark numbers."""

from __future__ import annotations

import inspect
from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from .common import (
    DataOptions,
    RunOptions,
    command,
    console,
    default_templates,
    description_method,
    err_console,
    param_value,
    report_fit_problems,
    report_skipped,
)

DatasetOpt = typer.Option(..., "--dataset", "-d", help="cifar10, cifar100, mnist, fashion_mnist, imagenet, "
                          "imagenette, dtd, a class-folder path or a .csv/.jsonl/.json manifest.")
OutputDirOpt = typer.Option(Path("results"), "--output-dir", "-o", help="Where JSON and PNGs go.")
TemplatesOpt = typer.Option(None, "--templates", "-t", help="Template set or file (default: the dataset's "
                            "CLIP_benchmark set, else 'imagenet7').")


def _load(dataset: str, data: DataOptions, run: RunOptions, split: str | None = None, labelled: bool = False):
    """The dataset; with ``labelled``, one without labels is refused before any model is loaded."""
    from ..data import has_labels, load_dataset

    value = load_dataset(dataset, data.data_root, split or data.split, run.hash_content)
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
    report_fit_problems(report.record["cliplab"].get("fit") or {})
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
    method: str = typer.Option(None, "--method", help="A zero-shot method (see: cliplab methods): zeroshot (default), "
                               "dclip, cupl, waffle, fudd, perceptionclip, real, ..."),
    descriptions: Path = typer.Option(None, "--descriptions", help="A description set ({class: [descriptors or "
                                      "sentences]}, DCLIP or CuPL format) for a description method (default dclip)."),
    llm: str = typer.Option(None, "--llm", help="Language model for methods that ask one (fudd, real, ...): "
                            "replay:FILE, http://HOST:PORT/v1 (OpenAI-compatible; key from CLIPLAB_LLM_API_KEY), "
                            "openai:MODEL or hf:PATH."),
    params: list[str] = typer.Option(None, "--param", help="Method parameter NAME=VALUE (repeatable)."),
    output_dir: Path = OutputDirOpt,
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Zero-shot top-1/top-5/mean per-class recall/ECE; CLIP_benchmark-style JSON + confusion and reliability PNGs."""
    from ..eval import evaluate_zeroshot
    from ..heads import head_entry

    method = description_method(method, descriptions)
    if head_entry(method).needs_train:
        raise CliplabError(f"--method {method} needs training data: use cliplab evaluate --method {method}")
    kwargs = _parse_params(params)
    if descriptions is not None:
        kwargs["descriptions"] = descriptions
    if llm is not None:
        kwargs["llm"] = llm
    test = _load(dataset, data, run, labelled=True)
    backbone = run.load_backbone()
    # without --templates only the template classifier takes the dataset's set; every other method keeps its own
    # default (DCLIP "{c}", CuPL its sentences, WaffleCLIP/FuDD/PerceptionCLIP their authors' single template)
    chosen = default_templates(templates, test.name) if templates is not None or method == "zeroshot" else None
    report = evaluate_zeroshot(backbone, test, chosen, output_dir, run.cache_dir,
                               run.batch_size, run.workers, progress=not run.quiet, seed=run.seed, method=method,
                               **kwargs)
    _print_report(report, f"{method} · {test.name} ({test.split}, {len(report.features)} images) · "
                          f"{backbone.model_id}")


@command
def evaluate(
    method: str = typer.Option(..., "--method", help="Any registered method (see: cliplab methods)."),
    dataset: str = DatasetOpt,
    shots: int = typer.Option(None, "--shots", min=1, help="Few-shot: this many training images per class "
                              "(drawn with --seed from the train split); default: the whole train split."),
    split_file: Path = typer.Option(None, "--split-file", help="Repeat a saved few-shot split (JSON of item ids)."),
    templates: str = TemplatesOpt,
    params: list[str] = typer.Option(None, "--param", help="Method parameter NAME=VALUE (repeatable)."),
    output_dir: Path = OutputDirOpt,
    save_head: Path = typer.Option(None, "--save-head", help="Save the fitted head to this folder (safetensors + "
                                   "JSON) for cliplab classify --head."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Evaluate any method: fit on the train split (or a few-shot draw of it) when it needs data, test on --split."""
    from ..eval import evaluate as run_evaluation
    from ..heads import create_head, head_entry

    entry = head_entry(method)
    test_data = _load(dataset, data, run, labelled=True)
    if test_data.split == "train":
        raise CliplabError("--split train: the test split must not be the training split")
    train_data = _load(dataset, data, run, split="train", labelled=True) if entry.needs_train else None
    if train_data is not None and shots is not None:  # before the model loads and anything is embedded
        from ..features.values import check_shot_counts

        check_shot_counts(train_data.labels, train_data.class_names, shots, where=f"{train_data.name} (train)")
    backbone = run.load_backbone()
    kwargs = _parse_params(params)
    takes_templates = "templates" in inspect.signature(entry.cls.__init__).parameters
    if method == "zeroshot" or (templates is not None and takes_templates):  # else the method's own default
        kwargs.setdefault("templates", default_templates(templates, test_data.name))
    if entry.needs_backbone:
        kwargs.setdefault("cache_dir", run.cache_dir)
    head = create_head(method, backbone=backbone, class_names=test_data.class_names, **kwargs)
    train = val = split_path = None
    fit_params: dict = {}
    if entry.needs_train:
        train = run.embed(backbone, train_data).labelled()
        drawn = None
        if split_file is not None:
            drawn, split_path = train.apply_split(split_file), split_file
        elif shots is not None:
            drawn = train.few_shot(shots, seed=run.seed)
            split_path = Path(output_dir) / f"split_{test_data.name}_{shots}shot_seed{run.seed}.json"
            drawn.save(split_path)
        if drawn is not None:  # the protocol's validation part tunes the head; views and captions where it uses them
            from ..eval.fewshot import caption_features, shot_views
            from ..features.views import DEFAULT_VIEWS

            train, val = drawn.train, drawn.val
            accepted = inspect.signature(head.fit).parameters
            if "views" in accepted:
                fit_params["views"] = shot_views(backbone, train_data, drawn, DEFAULT_VIEWS, run.cache_dir,
                                                 run.batch_size, run.workers, not run.quiet)
            if "caption_features" in accepted:
                fit_params["caption_features"] = caption_features(backbone, train_data, drawn, run.cache_dir)
    test = run.embed(backbone, test_data)
    report = run_evaluation(head, test, train, val=val, fit_params=fit_params, output_dir=output_dir, seed=run.seed,
                            shots=shots, split_file=split_path)
    _print_report(report, f"{method} · {test.dataset} ({test.split}, {len(test)} images)"
                          + (f" · {shots} shots, seed {run.seed}" if shots else "") + f" · {backbone.model_id}")
    if split_path is not None:
        console.print(f"split: {split_path}")
    if save_head is not None:
        from ..heads.saving import save_head as write_head

        write_head(head, save_head, model_id=backbone.model_id, class_names=list(test.class_names))
        console.print(f"head: {save_head}")
