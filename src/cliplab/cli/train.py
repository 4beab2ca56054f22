"""``cliplab train``: train one method on a few-shot split and save it (resumable, loadable with --head DIR)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

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

RUN_FILE = "train.json"  # what the folder's run is: a rerun with other settings is refused
CHECKPOINTS = "checkpoints"  # the training loop's checkpoints (heads taking checkpoint_dir)
RUN_KEYS = ("method", "dataset", "split", "shots", "seed", "model", "model_id", "templates", "params", "views")


def _params(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliplabError(f"--param {item!r}: write it as NAME=VALUE")
        out[key] = param_value(value)
    return out


def _check_folder(output: Path, record: dict) -> bool:
    """Whether ``output`` already holds this finished run; refuses a folder of another run (one line)."""
    path = output / RUN_FILE
    if not path.is_file():
        if (output / "head.json").exists() or (output / CHECKPOINTS).exists():
            raise CliplabError(f"{output}: holds a head or checkpoints of another run (no {RUN_FILE}); give another "
                               "-o folder")
        return False
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CliplabError(f"{path}: unreadable ({exc}); give another -o folder") from None
    differ = [k for k in RUN_KEYS if saved.get(k) != record.get(k)]
    if differ:
        key = differ[0]
        raise CliplabError(f"{output}: holds a run with {key} {saved.get(key)!r}, not {record.get(key)!r}; use the "
                           "same options to resume it, or another -o folder")
    return (output / "head.json").is_file()


@command
def train(
    method: str = typer.Option(..., "--method", help="A method that trains: " + method_list(trained=True) + "."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Named dataset, folder with train/ and test/, or a "
                                "manifest with a split field."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the trained head (safetensors + JSON), "
                                "its split and its training checkpoints; rerun the same command to resume."),
    shots: int = typer.Option(None, "--shots", min=1, help="Training images per class, drawn with --seed from the "
                              "train split (default: the whole split)."),
    templates: str = typer.Option(None, "--templates", "-t", help="Template set or file (default: the method's own)."),
    params: list[str] = typer.Option(None, "--param", help="Method parameter NAME=VALUE (repeatable), e.g. "
                                     "max_epoch=10."),
    views: int = typer.Option(10, "--views", min=1, help="Augmented views per training image for the methods "
                              "that use them (cached)."),
    evaluate: bool = typer.Option(False, "--eval", help="Print the trained head's top-1 on --split (default test)."),
    holdout: float = HOLDOUT_OPTION,
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Train one method on a (few-shot) train split and save it to -o DIR; a killed run resumes from DIR."""
    data.holdout = holdout
    from ..heads.registry import method_names

    known = method_names()
    if method not in known:
        raise CliplabError(f"unknown method {method!r}; known: {', '.join(known)}")
    kwargs = _params(params)
    for reserved in ("checkpoint_dir", "progress", "cache_dir"):
        if reserved in kwargs:
            raise CliplabError(f"--param {reserved}: set by cliplab train itself")
    from ..data import has_labels

    test_data = data.load(dataset, None, run.hash_content, output)  # typos answered before torch loads
    if test_data.split == "all" and data.split is None:  # a folder without splits, read whole
        raise CliplabError(NO_TRAIN_SPLIT.format(dataset=dataset, what="cliplab train"))
    if test_data.split == "train":
        raise CliplabError("--split train: the test split must not be the training split")
    train_data = data.load(dataset, "train", run.hash_content, output)
    report_skipped(train_data)
    if not has_labels(train_data):
        raise CliplabError(f"{dataset} (train): has no labels")
    if shots is not None:
        from ..features.values import check_shot_counts

        check_shot_counts(train_data.labels, train_data.class_names, shots, where=f"{train_data.name} (train)")
    from ..eval.inputs import build_head, fit_method, prepare_fit, resolve_templates
    from ..heads import head_entry

    entry = head_entry(method)
    if not entry.needs_train:
        raise CliplabError(f"--method {method} does not train; use cliplab zeroshot or classify --method {method}")
    backbone = run.load_backbone()
    record = {"method": method, "dataset": dataset, "split": train_data.split, "shots": shots, "seed": run.seed,
              "model": backbone.display_name, "model_id": backbone.model_id,
              "templates": resolve_templates(method, templates, train_data.name), "params": kwargs, "views": views}
    record = json.loads(json.dumps(record, default=str))
    done = _check_folder(output, record)
    names = list(train_data.class_names)
    options = {"cache_dir": run.cache_dir, "batch_size": run.batch_size, "workers": run.workers,
               "progress": not run.quiet, "embed": run.embed}
    from ..heads.saving import load_head, save_head

    if done:
        head = load_head(output, backbone=backbone, method=method)
        inputs = None
        console.print(f"already trained: {output} (loaded)")
    else:
        from ..fileio import atomic_write_text

        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / RUN_FILE, json.dumps(record, indent=1))
        head = build_head(method, backbone, names, dataset_name=train_data.name, templates=templates, params=kwargs,
                          cache_dir=run.cache_dir)
        accepted = head.get_params(deep=False)
        head.set_params(**{k: v for k, v in (("checkpoint_dir", str(output / CHECKPOINTS)),
                                            ("progress", not run.quiet)) if k in accepted})
        split_file = output / "split.json" if shots is not None else None
        inputs = prepare_fit(head, backbone, train_data, shots=shots, seed=run.seed, save_split_as=split_file,
                             views=views, **options)
        fit_method(head, inputs)
        save_head(head, output, model_id=backbone.model_id, class_names=names, model=backbone.display_name)
        console.print(f"head: {output}")
    if evaluate:
        from ..eval.evaluate import evaluate as score
        from ..eval.inputs import test_features

        test = test_features(head, backbone, test_data, inputs, **options)
        report = score(head, test, fitted=True)
        console.print(f"{method} · {test.dataset} ({test.split}, {len(report.features)} images) · "
                      f"top-1 {100 * report.metrics['acc1']:.2f}%", markup=False)
