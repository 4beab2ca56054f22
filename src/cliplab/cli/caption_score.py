"""``cliplab caption-score``: CLIP-S, RefCLIP-S and the CLIP-S reward per caption (paper 47), JSONL or CSV out."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import CliplabError
from .common import DataOptions, RunOptions, command, console, err_console, report_failures

COLUMNS = ("image", "caption", "clip_s", "refclip_s", "reward", "grammar", "error")


def _grammar_corpus(source: str, data: DataOptions) -> list[str]:
    """Captions to train the grammar head on: ``coco`` (its train split's captions) or a captions file
    (rows' captions and references; a .txt file: one caption a line)."""
    if source in ("coco", "coco_mini"):
        value = data.load("coco", "train")
        return [c for caps in value.captions or [] for c in caps if isinstance(c, str) and c.strip()]
    path = Path(source)
    if path.suffix.lower() == ".txt":
        try:
            return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise CliplabError(f"{path}: cannot read ({exc})") from None
    from ..eval.captions import read_caption_rows

    rows = read_caption_rows(path)
    return [r.caption for r in rows] + [ref for r in rows for ref in (r.references or [])]


def _write(rows: list[dict], path: Path) -> None:
    import csv
    import io
    import json

    from ..fileio import atomic_write_text

    if path.suffix.lower() == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_text(path, text)


@command
def caption_score(
    captions: Path = typer.Option(..., "--captions", "-c", help="Captions to score: JSONL (or a JSON list, or CSV) "
                                  "rows with image (a path, relative to the file), caption, and optionally "
                                  "references (a list; CSV: '|'-separated) and baseline (a greedy caption: gives "
                                  "the reward CLIP-S(caption) - CLIP-S(baseline))."),
    references: Path = typer.Option(None, "--references", "-r", help="A JSON object mapping images (as written in "
                                    "the rows, or their file stems) to reference captions: adds RefCLIP-S."),
    output: Path = typer.Option(None, "--output", "-o", help="Write per-caption scores here (.jsonl or .csv)."),
    prompt: str = typer.Option("A photo depicts", "--prompt", help="Prefix of every caption and reference, as "
                               "CLIPScore's code ('' for none)."),
    weight: float = typer.Option(2.5, "--w", help="CLIP-S weight w in w * max(cos, 0)."),
    grammar_train: str = typer.Option(None, "--grammar-train", help="Train CLIP-Caption-Reward's grammar head on "
                                      "these captions and their corruptions (coco, a captions file, or a .txt of "
                                      "lines) and add each caption's P(well-formed)."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Score captions of images with CLIP-S (Hessel et al.), RefCLIP-S and the self-critical CLIP-S reward."""
    from ..eval.captions import read_caption_rows

    if output is not None and output.suffix.lower() not in (".jsonl", ".csv"):
        raise CliplabError(f"--output {output}: give a .jsonl or .csv file")
    rows = read_caption_rows(captions, references)
    corpus = _grammar_corpus(grammar_train, data) if grammar_train else None
    backbone = run.load_backbone()
    from ..eval.captions import score_rows

    grammar = None
    if corpus is not None:
        from ..eval.caption_grammar import train_grammar

        fit = train_grammar(backbone, corpus, run.cache_dir, seed=run.seed, prompt=prompt,
                            progress=not run.quiet, device=run.device or "cpu")
        held = "n/a" if fit.held_out_accuracy is None else f"{100 * fit.held_out_accuracy:.1f}%"
        err_console.print(f"grammar head: {len(corpus)} captions, train accuracy {100 * fit.train_accuracy:.1f}%, "
                          f"held-out {held}", soft_wrap=True)
        grammar = fit.head
    result = score_rows(backbone, rows, run.cache_dir, w=weight, prompt=prompt, batch_size=run.batch_size,
                        workers=run.workers, progress=not run.quiet, grammar=grammar)
    report_failures(result.failures)
    shown = [c for c in COLUMNS[2:-1] if any(c in r for r in result.rows)]
    table = Table(title=f"caption scores · {len(result.rows)} captions · {backbone.display_name}")
    table.add_column("image")
    table.add_column("caption")
    for name in shown:
        table.add_column(name, justify="right")
    for r in result.rows:
        table.add_row(Path(r["image"]).name, r["caption"],
                      *(f"{r[c]:.4f}" if c in r else r.get("error", "")[:30] for c in shown))
    console.print(table)
    for name in shown:
        values = [r[name] for r in result.rows if name in r]
        console.print(f"mean {name}: {sum(values) / len(values):.4f} ({len(values)} captions)")
    console.print(f"{result.seconds / len(result.rows):.4f} s per caption")
    if output is not None:
        _write(result.rows, output)
        console.print(f"scores: {output}")
