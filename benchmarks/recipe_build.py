"""Record a finished recipe build from its model card: held-out zero-shot and seconds per step over the run.

A recipe build is itself the measurement (``cliplab pretrain --recipe NAME`` writes each evaluation's step, elapsed
seconds, loss and held-out zero-shot into the model card); this script reads that card and writes
``results/recipe_build_<name>.{json,md}`` with the seconds per step of every interval, so build times stated in the
code (``train.recipes.DURATIONS``) are backed by a results file. It never trains.

    python benchmarks/recipe_build.py cifar10-vit-signal [--note "what else ran on the machine"]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys

from _common import header, md_table, write_results


def _history(card: dict) -> list[dict]:
    history = card.get("history", [])
    return ast.literal_eval(history) if isinstance(history, str) else list(history)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--note", default="", help="what else ran on the machine during the build")
    args = parser.parse_args(argv)

    from cliplab.train.export import CARD_JSON
    from cliplab.train.recipes import is_finished, recipe_config, recipe_folder

    folder = recipe_folder(recipe_config(args.recipe), args.recipe)
    if not is_finished(folder):
        print(f"recipe:{args.recipe} is not built ({folder}); this script only reads finished builds", file=sys.stderr)
        return 2
    card = json.loads((folder / CARD_JSON).read_text())
    history = _history(card)
    rows, previous = [], {"step": 0, "seconds": 0.0}
    for entry in history:
        steps = entry["step"] - previous["step"]
        seconds = entry["seconds"] - previous["seconds"]
        rows.append([f"{previous['step']}-{entry['step']}", round(seconds, 1), round(seconds / steps, 2),
                     round(entry["loss"], 3), entry.get("zeroshot_top1")])
        previous = entry
    record = header(f"recipe_build_{args.recipe}", "a recipe build's own timing and held-out accuracy, from its card",
                    quick=False)
    record.update(recipe=args.recipe, folder=str(folder), model=card.get("model"), steps=card.get("steps"),
                  training_seconds=card.get("training_seconds"), held_out=card.get("held_out"), history=history,
                  note=args.note)
    body = "\n".join([
        f"# Recipe build: recipe:{args.recipe} ({card.get('model')}, trained here from random weights)",
        "",
        f"Data: {card['data']['source']} {card['data']['split']} ({card['data']['pairs']:,} pairs, captions from "
        f"{card['data']['caption_source']}). {card.get('steps'):,} steps in {card['training_seconds'] / 60:.1f} min; "
        f"held-out {card['held_out']['split']} zero-shot top-1 {card['held_out']['zeroshot_top1']:.3f}.",
        "",
        args.note,
        "",
        md_table(["steps", "seconds", "s / step", "loss", f"held-out {card['held_out']['split']} zero-shot"], rows),
    ])
    write_results(f"recipe_build_{args.recipe}", record, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
