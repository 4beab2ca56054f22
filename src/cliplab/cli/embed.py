"""``cliplab embed``: embed a dataset into the feature cache (and optionally export it), or with Ray into
parquet shards (``--engine ray``) that ``cliplab index build`` reads."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import CliplabError
from .common import DataOptions, RunOptions, command, console, report_failures
from .evaluate import _load

ENGINES = ("local", "ray")


def model_spec(run: RunOptions) -> dict:
    """``load_model`` keyword arguments from the run options (``recipe:NAME`` resolved to its folder), for
    processes that load the model themselves (Ray actors)."""
    name = run.model_name()
    import dataclasses
    import inspect

    from ..models import load_model

    # every run option load_model takes, as load_backbone passes them (--cache-dir is the feature cache, not
    # load_model's weights cache)
    accepted = set(inspect.signature(load_model).parameters) - {"name", "cache_dir"}
    spec = {f.name: getattr(run, f.name) for f in dataclasses.fields(run) if f.name in accepted}
    if spec.get("config") is not None:
        spec["config"] = str(spec["config"])
    return {"name": name, **spec}


def shards_from_features(backbone, dataset, features, folder: Path) -> dict:
    """Write the local engine's features as a parquet shards folder (the ``--engine ray`` format)."""
    from ..features.distributed import item_record
    from ..features.shards import write_shards

    records = [item_record(dataset, int(i)) for i in features.indices]
    index_of = {dataset.item_id(i): i for i in range(len(dataset))}
    failures = [(item_record(dataset, index_of[item])[0] if item in index_of else item, reason)
                for item, reason in features.failures]
    identities = [dataset.identity(int(i)) for i in features.indices]
    return write_shards(folder, model_id=backbone.model_id, dim=backbone.embed_dim,
                        preprocess_id=backbone.preprocess_id, encoding_id=backbone.encoding_id,
                        paths=[r[0] for r in records], sizes=[r[1] for r in records],
                        mtimes=[r[2] for r in records], identities=identities, captions=[r[3] for r in records],
                        embeddings=features.features, failures=failures)


@command
def embed(
    dataset: str = typer.Argument(..., help="Named dataset, class-folder path or manifest."),
    output: Path = typer.Option(None, "--output", "-o", help="Also export to this .npz (features, labels, ids)."),
    engine: str = typer.Option("local", "--engine", help="local: this process, through the feature cache; ray: a "
                               "Ray Data pipeline (model actors, one GPU each when the cluster has GPUs) writing "
                               "parquet shards to --shards (needs pip install 'cliplab[ray]')."),
    shards: Path = typer.Option(None, "--shards", help="Parquet shards folder to write (required by --engine ray; "
                                "with --engine local the cached features are written there too). Resumable: a "
                                "rerun embeds only the items no complete shard holds."),
    ray_address: str = typer.Option(None, "--ray-address", help="Ray cluster to run on (ray://HOST:10001, HOST:6379 "
                                    "or auto); default: $RAY_ADDRESS, else a new local Ray instance."),
    actors: int = typer.Option(None, "--actors", min=1, help="Model actors of the Ray pipeline (default: the "
                               "cluster's GPUs, else half its CPUs)."),
    run: RunOptions = None,
    data: DataOptions = None,
):
    """Embed a dataset into the feature cache, or with --engine ray into parquet shards (resumable).

    Rerun the same command after an interruption: finished work is reused. --shards writes parquet shards that
    cliplab index build reads; --engine ray runs the embedding as a Ray Data pipeline (local or --ray-address).
    """
    if engine not in ENGINES:
        raise CliplabError(f"--engine {engine}: not one of {', '.join(ENGINES)}")
    if engine == "ray":
        if shards is None:
            raise CliplabError("--engine ray writes parquet shards: give --shards DIR")
        if output is not None:
            raise CliplabError("--output (.npz) works with --engine local; --engine ray writes --shards")
    elif ray_address is not None or actors is not None:
        raise CliplabError("--ray-address and --actors need --engine ray")
    dataset_value = _load(dataset, data, run)
    if engine == "ray":
        _embed_ray(dataset_value, shards, ray_address, actors, run)
        return
    import numpy as np

    backbone = run.load_backbone()
    features = run.embed(backbone, dataset_value)
    console.print(f"{len(features)} features of dimension {features.dim} "
                  f"({features.computed} computed now, {len(features) - features.computed} from cache); "
                  f"cache key {features.cache_key}")
    report_failures(features.failures)
    if shards is not None:
        meta = shards_from_features(backbone, dataset_value, features, shards)
        console.print(f"wrote {meta['count']} embeddings in {len(meta['shards'])} shard(s) to {shards}")
    if output is not None:
        output = output if output.suffix == ".npz" else output.with_name(output.name + ".npz")
        np.savez(output, features=np.asarray(features.features), labels=features.labels,
                 item_ids=np.asarray(features.item_ids), class_names=np.asarray(features.class_names))
        console.print(f"wrote {output}")


def _embed_ray(dataset, shards: Path, address: str | None, actors: int | None, run: RunOptions) -> None:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise CliplabError(f"--engine ray needs Ray Data ({exc}); pip install 'cliplab[ray]'") from exc
    from ..features.distributed import embed_with_ray

    meta = embed_with_ray(model_spec(run), dataset, shards, batch_size=run.batch_size, actors=actors,
                          address=address, progress=not run.quiet)
    console.print(f"{meta['count']} embeddings of dimension {meta['dim']} in {len(meta['shards'])} shard(s) at "
                  f"{shards} ({meta['embedded']} embedded now, {meta['reused_shards']} shard(s) reused)")
    report_failures(meta["failures"])
