"""Dense features through the cache: cold ``embed_dense`` (empty cache) vs a warm rerun (memory-mapped read).

ViT-B-32 (random weights) on imagenette val images (224x224), one row per extraction (final layer, MaskCLIP's
value path, sliding 224 px windows over the image resized to 320 px: four windows, a 10x10 grid). Each warm
rerun is checked to extract nothing and to return the cold run's tokens; the table gives wall seconds, items
per second, the speed-up and the bytes the cache holds. Before this cache GL-MCM recomputed the patch tokens
on every run (the cold column).

    python benchmarks/dense_cache.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from _common import IMAGENETTE_VAL, CpuAccount, header, load_average, log, md_table, model_info, write_results
from cliplab.data import Subset, image_folder
from cliplab.features.dense import embed_dense
from cliplab.models.dense import DenseSpec
from cliplab.models.loader import load_model

NAME = "dense_cache"
SPECS = {"final": DenseSpec(), "value": DenseSpec(path="value"),
         "sliding value 320 px": DenseSpec(path="value", input="sliding", resolution=320)}


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 images instead of 256")
    args = parser.parse_args()
    n = 64 if args.quick else 256
    record = header(NAME, "cold embed_dense vs warm memory-mapped read", args.quick)
    record["load_average_start"] = load_average()
    backbone = load_model("ViT-B-32", "random", device="cpu")
    data = image_folder(IMAGENETTE_VAL)
    data = Subset(data, np.linspace(0, len(data) - 1, n).round().astype(int))
    record["model"], record["items"] = model_info(backbone), n
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, spec in SPECS.items():
            cache = Path(tmp) / label.replace(" ", "-")
            log(f"{label}: cold")
            with CpuAccount() as cold:
                first = embed_dense(backbone, data, cache, spec=spec, batch_size=32, progress=False)
                tokens = np.array(first.tokens)
            log(f"{label}: warm")
            with CpuAccount() as warm:
                again = embed_dense(backbone, data, cache, spec=spec, batch_size=32, progress=False)
                same = np.array(again.tokens)
            assert again.computed == 0 and np.array_equal(tokens, same), "warm rerun recomputed or differs"
            result = {"spec": label, "grid": list(first.grid_shape), "cold": cold.result, "warm": warm.result,
                      "cache_bytes": _bytes(cache), "extracted": first.computed}
            results.append(result)
            rows.append([label, f"{first.grid_shape[0]}x{first.grid_shape[1]}", cold.result["wall_s"],
                         n / cold.result["wall_s"], warm.result["wall_s"],
                         cold.result["wall_s"] / warm.result["wall_s"], _bytes(cache) / 2**20,
                         cold.result["foreign_load"]])
    record["results"] = results
    body = (f"# Dense features: cold extraction vs warm cached read\n\nViT-B-32 (random weights), {n} imagenette "
            "val images, CPU. Warm reruns extract nothing and return identical tokens.\n\n"
            + md_table(["extraction", "grid", "cold s", "cold img/s", "warm s", "speed-up", "cache MiB",
                        "foreign load (cold)"], rows))
    write_results(NAME, record, body)


if __name__ == "__main__":
    main()
