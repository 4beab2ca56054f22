"""The ``cliplab`` command: typer app wiring the command modules together."""

from __future__ import annotations

import typer

from .. import __version__
from .cache import cache
from .classify import classify
from .common import configure_logging
from .evaluate import embed, evaluate, zeroshot
from .listing import datasets, methods, models, templates

app = typer.Typer(
    name="cliplab",
    help="CLIP models: classify images with your labels, benchmark zero-shot and other methods, cache features.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


for _command in (classify, zeroshot, evaluate, embed, models, methods, templates, datasets, cache):
    app.command()(_command)


def main() -> None:
    """Console-script entry point."""
    app()
