"""Output file names of a run: what ran, on what, with which model, and a short hash of its settings.

``ood``, ``robustness`` and ``retrieval-eval`` write into one output folder (``results/`` by default); a name that
carries the method, dataset, split, model and a hash of every setting means a second run with other settings
never overwrites the first, while the same run repeated replaces its own files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..fileio import digest

OUTCOMES = ("cells", "failures", "failed_images", "elapsed_seconds")  # results, not settings: kept out of the hash


def run_stem(task: str, record: Mapping, *, method: str | None = None, dataset: str | None = None,
             split: str | None = None, keys: Iterable[str] = ()) -> str:
    """``<task>_<method>_<dataset>_<split>_<model>_<hash>`` (empty parts left out, ``/``, ``:`` and spaces made
    ``-``). The hash covers the model id, the record's ``cliplab`` settings (not its outcomes) and ``keys`` (e.g.
    feature cache keys)."""
    block = record.get("cliplab", {})
    settings = json.dumps({k: v for k, v in block.items() if k not in OUTCOMES}, sort_keys=True, default=str)
    tag = digest(str(block.get("model_id", "")), settings, *map(str, keys))[:8]
    model = Path(str(record.get("model") or block.get("model_id") or "model")).name
    parts = [task, method, dataset, split, model, tag]
    return "_".join(str(p) for p in parts if p).replace("/", "-").replace(":", "-").replace(" ", "-")
