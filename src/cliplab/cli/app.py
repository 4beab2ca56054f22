"""The ``cliplab`` command: typer app wiring the command modules together.

Help is plain text (click's formatter, not rich panels): flags show as flags, long words wrap instead of
being cut with an ellipsis, and the width follows the terminal up to ``HELP_WIDTH`` columns (80 when the
output is not a terminal and ``COLUMNS`` is unset).
"""

from __future__ import annotations

import inspect
import re

import typer

from .. import __version__
from .analyse import analyse_app
from .anomaly import anomaly
from .cache import cache
from .caption_score import caption_score
from .classify import classify
from .common import configure_logging
from .count import count
from .curate import curate
from .describe import describe
from .dinoiser_train import dinoiser_train
from .embed import embed
from .evaluate import evaluate, zeroshot
from .explain import explain
from .fewshot import fewshot
from .incremental import incremental
from .index import index_app
from .link import link
from .listing import datasets, methods, models, templates
from .match import match
from .moe_upcycle import moe_upcycle
from .ood import ood
from .pretrain import pretrain
from .rank import rank, rank_train
from .regions import regions
from .retrieval import retrieval_eval
from .retrieval_tune import retrieval_tune
from .robustness import robustness
from .robustness_fit import robustness_fit
from .search import search
from .segment import segment, segment_eval
from .segment_train import segment_train
from .serve import serve
from .train import train
from .train_clipn import train_clipn

HELP_WIDTH = 100
_LITERAL = re.compile(r"``?([^`]+)``?")

app = typer.Typer(
    name="cliplab",
    help="CLIP models: classify images with your labels, benchmark zero-shot and other methods, cache features.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": HELP_WIDTH},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cliplab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and library logs."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    configure_logging(debug)


def plain(text: str | None) -> str | None:
    """Help text as the terminal shows it: reStructuredText/markdown literals (``x``, `x`) lose their backticks."""
    return _LITERAL.sub(r"\1", text) if text else text


def _register(command) -> None:
    """Add ``command`` with plain-text help: its docstring, and the help of every option and argument it takes.

    The short help in the command list is the docstring's whole first line (click would cut it at the width).
    """
    for parameter in inspect.signature(command).parameters.values():
        info = parameter.default
        if isinstance(info, typer.models.ParameterInfo):
            info.help = plain(info.help)
    doc = plain(inspect.getdoc(command))
    app.command(help=doc, short_help=doc.splitlines()[0] if doc else None)(command)


for _command in (classify, zeroshot, explain, evaluate, fewshot, embed, pretrain, curate, describe, ood, models,
                 methods, templates, datasets, cache, robustness, serve, search, retrieval_eval, train_clipn,
                 segment, segment_eval, caption_score, match, train, incremental, regions, count):
    _register(_command)
_register(robustness_fit)
_register(link)
_register(anomaly)
_register(retrieval_tune)
_register(rank)
_register(rank_train)
_register(segment_train)
_register(dinoiser_train)
_register(moe_upcycle)
app.add_typer(index_app, name="index")
app.add_typer(analyse_app, name="analyse")


def main() -> None:
    """Console-script entry point."""
    app()
