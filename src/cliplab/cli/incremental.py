"""``cliplab incremental``: class-incremental few-shot sessions with any session learner (a head with ``learn_session``,
e.g. CPE-CLIP) or any other encoder-family method refit per session (the naive baseline)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from ..heads.registry import describe_heads
from .common import NO_TRAIN_SPLIT, DataOptions, RunOptions, command, console, param_value, report_skipped

#: Read from the heads' source (nothing imported): the encoder family, less methods needing what the protocol cannot
#: give (eval/incremental.py's UNSUPPORTED_NEEDS: a second model, an LLM, an artefact, unlabelled rows, captions).
_UNSUPPORTED = {"aux_features", "caption_features", "llm", "artefact", "unlabelled"}
METHOD_CHOICES = ", ".join(h.name for h in describe_heads()
                           if h.family == "encoder" and not set(h.needs) & _UNSUPPORTED)


def _params(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliplabError(f"--param {item!r}: write it as NAME=VALUE")
        out[key] = param_value(value)
    return out


@command
def incremental(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Named dataset, folder with train/ and test/, or a "
                                "manifest with a split field."),
    sessions: int = typer.Option(5, "--sessions", min=1, help="Sessions: the classes in index order cut into this "
                                 "many consecutive groups."),
    session_classes: str = typer.Option(None, "--session-classes", help="Explicit sessions as class indices, "
                                        "sessions separated by ';' (e.g. 0,1;2,3); overlapping sessions are "
                                        "refused."),
    shots: int = typer.Option(5, "--shots", min=1, help="Training images per class of each session."),
    method: str = typer.Option("cpe-clip", "--method", help=f"One of {METHOD_CHOICES}. A session learner (a "
                               "learn_session method) is given each session's shots in turn; any other is refit per "
                               "session on that session's shots over every class seen so far (the naive baseline)."),
    params: list[str] = typer.Option(None, "--param", help="Method parameter NAME=VALUE (repeatable), e.g. "
                                     "epochs=5 or vision_prompts=false."),
    test_per_class: int = typer.Option(None, "--test-per-class", min=1, help="Score this many test images per "
                                       "class (seeded; default all)."),
    output: Path = typer.Option(None, "--output", "-o", help="Folder for incremental.json, the plot and each "
                                "session's head; rerun the same command to resume after the last finished session."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Learn new classes session by session: accuracy on all classes seen so far and forgetting after each.

    Sessions of the same class are refused in one line; -o DIR keeps each session's head and resumes."""
    from ..eval.incremental import check_method, parse_sessions, split_sessions

    try:
        method = check_method(method).name
    except CliplabError as exc:
        raise CliplabError(f"--method: {exc}") from None
    kwargs = _params(params)
    test_data = data.load(dataset, None, run.hash_content, output)
    if test_data.split == "all" and data.split is None:
        raise CliplabError(NO_TRAIN_SPLIT.format(dataset=dataset, what="cliplab incremental"))
    if test_data.split == "train":
        raise CliplabError("--split train: the test split must not be the training split")
    train_data = data.load(dataset, "train", run.hash_content, output)
    report_skipped(train_data)
    n_classes = len(train_data.class_names)
    plan = (parse_sessions(session_classes, n_classes) if session_classes
            else split_sessions(n_classes, sessions))
    from ..eval.incremental import plot_incremental, run_incremental

    backbone = run.load_backbone()

    def report(t: int, result) -> None:
        names = ", ".join(result.class_names[c] for c in result.sessions[t])
        console.print(f"session {t + 1}/{len(result.sessions)} ({names}): seen-class accuracy "
                      f"{100 * result.accuracy[t]:.2f}%, forgetting {100 * result.forgetting[t]:.2f}%",
                      markup=False, highlight=False)

    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    result = run_incremental(backbone, train_data, test_data, plan, shots, method=method, params=kwargs,
                             seed=run.seed, test_per_class=test_per_class, output_dir=output,
                             progress=not run.quiet, report=report)
    table = Table(title=f"{method} · {train_data.name} · {shots} shots · {backbone.display_name}")
    for column in ("session", "classes", "seen", "accuracy (seen)", "forgetting"):
        table.add_column(column)
    for t, classes in enumerate(result.sessions[:len(result.accuracy)]):
        seen = sum(len(s) for s in result.sessions[:t + 1])
        table.add_row(str(t + 1), ",".join(map(str, classes)), str(seen), f"{100 * result.accuracy[t]:.2f}",
                      f"{100 * result.forgetting[t]:.2f}")
    console.print(table)
    if output is not None:
        from ..fileio import atomic_write_text

        atomic_write_text(output / "incremental.json", json.dumps(result.to_json(), indent=1))
        plot = plot_incremental([result], output / "incremental.png",
                                f"{method} on {train_data.name}, {shots} shots ({backbone.display_name})")
        console.print(f"results: {output / 'incremental.json'}  plot: {plot}", markup=False, highlight=False)
