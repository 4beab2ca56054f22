"""``cliplab index build|update``: a FAISS + SQLite search index of a folder's image embeddings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.text import Text

from .common import DataOptions, RunOptions, command, console, err_console, report_failures

index_app = typer.Typer(
    name="index",
    help="Build or update a search index of image embeddings.\n\nThe index folder is what cliplab search and cliplab "
    "serve read.",
    short_help="Build or update a search index of image embeddings.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

INDEX_DIR = typer.Option(..., "--index-dir", "-i", help="The index folder (written atomically: a killed build "
                         "leaves the previous index, or none, never a half-written one).")


def with_index_model(run: RunOptions, index_dir: Path) -> RunOptions:
    """``run`` with the model the index was built with (every ``load_model`` keyword the build used), when
    --model was not given. A missing index is left to the command; a damaged manifest is reported as such."""
    if run.model is not None:
        return run
    from ..search.index import index_manifest

    manifest = index_manifest(index_dir)  # recovers an interrupted publish first
    if manifest is None:
        return run  # SearchIndex.open says what is missing
    spec = manifest.get("model_kwargs") or manifest.get("model_spec")
    if isinstance(spec, str) and spec:
        return dataclasses.replace(run, model=spec)
    if not isinstance(spec, dict) or not spec.get("name"):
        return run
    fields = {f.name: f for f in dataclasses.fields(run)}
    changes: dict = {"model": spec["name"]}
    for key, value in spec.items():
        field = fields.get(key)
        if key in ("name", "device") or field is None or getattr(run, key) != field.default:
            continue  # the user's own flags win; the device is this machine's choice
        changes[key] = Path(value) if key == "config" and value is not None else value
    return dataclasses.replace(run, **changes)


def _print(report, verb: str) -> None:
    console.print(f"{verb} {report.index_dir}: {report.count} images, index {report.index_type} "
                  f"({report.added} added, {report.changed} changed, {report.removed} removed, {report.unchanged} "
                  f"unchanged; {report.computed} embedded now; {report.captions} captions) in {report.seconds:.1f} s",
                  soft_wrap=True, highlight=False, markup=False)
    calibration = report.calibration
    if calibration:
        breadth = ", ".join(f"{k}={v}" for k, v in calibration["chosen"].items())
        recall = ", ".join(f"{name} {value:.3f}" for name, value in calibration["recall"].items())
        line = (f"search breadth {breadth}: estimated recall@10 against exact search {recall} "
                f"(target {calibration['target']:g}; text queries: {calibration.get('text_queries_from', '-')})")
        if calibration["met"]:
            console.print(line, soft_wrap=True, highlight=False, markup=False)
        else:
            err_console.print(Text.assemble(("warning: ", "yellow"), line + " - below the target: pass --nprobe / "
                                            "--ef-search to cliplab search, or build with --index-type flat"),
                              soft_wrap=True)
    report_failures(report.failures, limit=20)
    if report.skipped:
        err_console.print(f"[yellow]note:[/] {len(report.skipped)} path(s) left out of the scan")


@index_app.command("build", short_help="Embed a folder or dataset and write a search index.")
@command
def build(
    source: str = typer.Argument(..., help="Folder of images (scanned recursively), manifest (.csv/.jsonl/.json, "
                                 "captions are indexed too), named dataset, or a parquet-shards folder from "
                                 "cliplab embed --engine ray."),
    index_dir: Path = INDEX_DIR,
    index_type: str = typer.Option("auto", "--index-type", help="auto (exact below 50,000 images, IVF above), flat, "
                                   "ivf, ivfpq, hnsw, or a FAISS factory string such as IVF1024,Flat."),
    serve_outside: bool = typer.Option(False, "--serve-outside", help="Let cliplab serve show indexed files that "
                                       "lie outside the indexed folder (symlinks leading out of it, manifest rows "
                                       "with ../ paths); off: such files are refused."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Embed a folder or dataset and write a search index (replaces an existing or damaged one)."""
    from ..search import build_index
    from ..search.index import check_target
    from .embed import model_spec

    check_target(index_dir)  # before the model loads
    if data.data_root is not None or data.split is not None:  # a named dataset elsewhere, or one split of a source
        from ..data import load_dataset

        source = load_dataset(source, data.data_root, data.split, run.hash_content)
    backbone = run.load_backbone()
    spec = {key: value for key, value in model_spec(run).items() if key != "device"}  # reloads exactly this model
    report = build_index(backbone, source, index_dir, cache_dir=run.cache_dir, index_type=index_type,
                         batch_size=run.batch_size, workers=run.workers, progress=not run.quiet,
                         hash_content=run.hash_content, model_spec=spec, serve_outside=serve_outside)
    _print(report, "built")


@index_app.command("update", short_help="Embed only new and changed images, drop deleted ones.")
@command
def update(
    index_dir: Path = INDEX_DIR,
    source: str = typer.Argument(None, help="Where the images are now (default: the source the index was built "
                                 "from)."),
    index_type: str = typer.Option(None, "--index-type", help="Change the index type (default: keep it)."),
    run: RunOptions = None,
):
    """Embed only new and changed images, drop deleted ones (model: the index's, unless --model is given)."""
    from ..search import update_index

    run = with_index_model(run, index_dir)
    backbone = run.load_backbone()
    report = update_index(backbone, index_dir, source, cache_dir=run.cache_dir, index_type=index_type,
                          batch_size=run.batch_size, workers=run.workers, progress=not run.quiet,
                          hash_content=run.hash_content or None)
    _print(report, "updated")
