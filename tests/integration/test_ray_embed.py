"""``cliplab embed --engine ray`` on a local Ray instance: same vectors as the local path, failures listed,
resumable shards. One Ray session for the module (startup is slow)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.data")
pytestmark = pytest.mark.slow

N_GOOD = 6


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 2**20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        size = (24 + 7 * i, 40 - 3 * i)  # different sizes: preprocessing resizes and crops
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing useful")
    return root


def _by_identity(table, vectors):
    from cliplab.features.shards import table_embeddings

    vectors = table_embeddings(table) if vectors is None else vectors
    return dict(zip(table.column("identity").to_pylist(), vectors, strict=True))


def test_ray_equals_local_lists_failures_and_resumes(ray_local, images, tiny, tmp_path):
    from cliplab.data import load_dataset
    from cliplab.features import embed_images
    from cliplab.features.distributed import embed_with_ray
    from cliplab.features.shards import read_shards

    dataset = load_dataset(str(images))
    out = tmp_path / "shards"
    result = embed_with_ray({"name": "tiny", "device": "cpu"}, dataset, out, batch_size=2, actors=1,
                            progress=False, shard_rows=4)
    meta, table = read_shards(out)
    assert {k: v for k, v in result.items() if k not in ("embedded", "reused_shards")} == meta
    assert result["embedded"] == N_GOOD and result["reused_shards"] == 0
    assert meta["model_id"] == tiny.model_id and meta["dim"] == tiny.embed_dim
    assert meta["encoding_id"] == tiny.encoding_id and meta["preprocess_id"] == tiny.preprocess_id
    assert meta["count"] == N_GOOD == table.num_rows and len(meta["shards"]) == 2

    corrupt = str(images / "corrupt.png")
    assert [path for path, _ in meta["failures"]] == [corrupt]
    assert "corrupt" in meta["failures"][0][1] or "not an image" in meta["failures"][0][1]

    local = embed_images(tiny, dataset, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    expected = {dataset.identity(int(i)): v for i, v in zip(local.indices, np.asarray(local.features), strict=True)}
    got = _by_identity(table, None)
    assert set(got) == set(expected) and len(got) == N_GOOD
    for identity, vector in expected.items():
        np.testing.assert_allclose(got[identity], vector, atol=1e-5)
        assert abs(np.linalg.norm(got[identity]) - 1) < 1e-5
    rows = table.to_pylist()
    for row in rows:
        stat = os.stat(row["path"])
        assert row["size"] == stat.st_size and row["mtime"] == stat.st_mtime and row["caption"] is None

    # a rerun reuses the complete shards; one new image is the only item embedded
    stamps = {name: (out / name).stat().st_mtime_ns for name in meta["shards"]}
    Image.new("RGB", (30, 30), (200, 10, 10)).save(images / "new.png")
    dataset = load_dataset(str(images))
    again = embed_with_ray({"name": "tiny", "device": "cpu"}, dataset, out, batch_size=2, actors=1,
                           progress=False, shard_rows=4)
    assert again["embedded"] == 1 and again["reused_shards"] == 2 and again["count"] == N_GOOD + 1
    assert {name: (out / name).stat().st_mtime_ns for name in meta["shards"]} == stamps
    assert [path for path, _ in again["failures"]] == [corrupt]
    _, table = read_shards(out)
    local = embed_images(tiny, dataset, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    got = _by_identity(table, None)
    new_identity = dataset.identity(dataset.paths.index(images / "new.png"))
    np.testing.assert_allclose(got[new_identity], np.asarray(local.features)[list(local.indices).index(
        dataset.paths.index(images / "new.png"))], atol=1e-5)
    (images / "new.png").unlink()


def test_cli_engines_write_the_same_shards(ray_local, images, tmp_path):
    from typer.testing import CliRunner

    from cliplab.cli.app import app
    from cliplab.features.shards import read_shards

    common = [str(images), "--model", "tiny", "--device", "cpu", "--quiet", "--batch-size", "4"]
    ray_run = CliRunner().invoke(app, ["embed", *common, "--engine", "ray", "--actors", "1",
                                       "--shards", str(tmp_path / "ray")], terminal_width=200)
    assert ray_run.exit_code == 0, ray_run.output
    assert f"{N_GOOD} embeddings of dimension" in ray_run.output and "corrupt.png" in ray_run.output
    local_run = CliRunner().invoke(app, ["embed", *common, "--shards", str(tmp_path / "local"),
                                         "--cache-dir", str(tmp_path / "cache")], terminal_width=200)
    assert local_run.exit_code == 0, local_run.output
    ray_meta, ray_table = read_shards(tmp_path / "ray")
    local_meta, local_table = read_shards(tmp_path / "local")
    assert {k: v for k, v in ray_meta.items() if k != "shards"} == {k: v for k, v in local_meta.items()
                                                                     if k != "shards"}
    ray_rows = _by_identity(ray_table, None)
    local_rows = _by_identity(local_table, None)
    assert set(ray_rows) == set(local_rows) and len(ray_rows) == N_GOOD
    for identity, vector in local_rows.items():
        np.testing.assert_allclose(ray_rows[identity], vector, atol=1e-5)
    columns = ["path", "size", "mtime", "identity", "caption"]
    assert sorted(ray_table.select(columns).to_pylist(), key=str) == sorted(local_table.select(columns).to_pylist(),
                                                                            key=str)

    no_shards = CliRunner().invoke(app, ["embed", *common, "--engine", "ray"])
    assert no_shards.exit_code == 2 and "--shards" in no_shards.output
