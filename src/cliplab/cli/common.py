"""Shared CLI pieces: options, error handling, model loading with one-line errors."""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from ..errors import CliplabError

console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}

ModelOpt = typer.Option(None, "--model", "-m", help="Model: open_clip ARCH[:TAG], hf-hub:ORG/REPO, a weights "
                        "file or folder, or 'tiny' (random weights, offline try-out).")
PretrainedOpt = typer.Option(None, "--pretrained", help="open_clip pretrained tag (or 'random').")
ArchOpt = typer.Option(None, "--arch", help="open_clip architecture of a local weights file.")
ConfigOpt = typer.Option(None, "--config", help="open_clip model-config JSON of a local weights file.")
QuickGeluOpt = typer.Option(None, "--quick-gelu/--no-quick-gelu", help="Force the activation (default: chosen "
                            "from the weights: QuickGELU for OpenAI-trained ones).")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available).")
CacheOpt = typer.Option(None, "--cache-dir", help="Feature cache folder (default: $CLIPLAB_CACHE or ~/.cache/cliplab).")
BatchOpt = typer.Option(64, "--batch-size", "-b", min=1, help="Images per forward pass.")
WorkersOpt = typer.Option(None, "--workers", "-j", min=0, help="Decoding worker processes (default: a quarter "
                          "of the cores on CPU, one per core up to 8 on GPU; 0 decodes in the main process).")
SeedOpt = typer.Option(0, "--seed", help="Random seed (random-weight models, sampling).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
HashOpt = typer.Option(False, "--hash-content", help="Key the cache by file content (sha256) instead of path, "
                       "size and modification time.")


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


def load_backbone(model, pretrained, arch, config, quick_gelu, device, seed, default: str):
    """``load_model`` with CLI defaults; prints notes about random weights or a guessed activation."""
    from ..models import load_model

    name = model or default
    with console.status(f"loading {name}", spinner="dots"):
        backbone = load_model(name, pretrained, device, arch=arch, config=Path(config) if config else None,
                              quick_gelu=quick_gelu, seed=seed)
    if backbone.info.random_weights:
        note = f"{name} has random weights; predictions are meaningless"
        err_console.print(Text.assemble(("note: ", "yellow"), note))
    if backbone.info.extra.get("warning"):
        err_console.print(Text.assemble(("warning: ", "yellow"), backbone.info.extra["warning"]))
    return backbone


def report_ignored(dataset) -> None:
    """Say which files a folder scan left out because they have no image extension."""
    ignored = getattr(dataset, "ignored", [])
    if ignored:
        shown = ", ".join(p.name for p in ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        err_console.print(Text.assemble(("note: ", "yellow"),
                                        f"{len(ignored)} file(s) without an image extension left out: {shown}"))
