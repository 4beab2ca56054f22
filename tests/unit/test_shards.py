"""Parquet embedding shards: round trip, atomicity, resume, checks with clear errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cliplab.errors import ShardsError
from cliplab.features.shards import (
    SHARDS_FILE,
    ShardWriter,
    is_shards_folder,
    read_shards,
    table_embeddings,
    write_shards,
)

META = {"model_id": "tiny:abc", "dim": 4, "preprocess_id": "{}", "encoding_id": "fp32-torch"}


def _rows(n: int, start: int = 0, dim: int = 4):
    rng = np.random.default_rng(start)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return {
        "paths": [f"/img/{i}.png" for i in range(start, start + n)],
        "sizes": list(range(start, start + n)),
        "mtimes": [float(i) + 0.5 for i in range(start, start + n)],
        "identities": [f"id{i}" for i in range(start, start + n)],
        "captions": [f"cap {i}" if i % 2 else None for i in range(start, start + n)],
        "embeddings": vectors,
    }


def _write(folder, n=10, shard_rows=4, failures=(), **meta):
    return write_shards(folder, **{**META, **meta}, **_rows(n), failures=failures, shard_rows=shard_rows)


def test_round_trip(tmp_path):
    rows = _rows(10)
    meta = write_shards(tmp_path, **META, **rows, failures=[("/img/bad.png", "not an image")], shard_rows=4)
    assert meta["shards"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert is_shards_folder(tmp_path)
    read_meta, table = read_shards(tmp_path)
    assert read_meta == meta
    assert json.loads((tmp_path / SHARDS_FILE).read_text()) == meta
    assert {k: meta[k] for k in META} == META and meta["count"] == 10
    assert meta["failures"] == [["/img/bad.png", "not an image"]]
    assert table.column_names == ["path", "size", "mtime", "identity", "caption", "embedding", "captions"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert table.schema.field("size").type == pa.int64() and table.schema.field("mtime").type == pa.float64()
    assert table.column("path").to_pylist() == rows["paths"]
    assert table.column("size").to_pylist() == rows["sizes"]
    assert table.column("mtime").to_pylist() == rows["mtimes"]
    assert table.column("caption").to_pylist() == rows["captions"]
    assert table.column("captions").to_pylist() == [[c] if c else [] for c in rows["captions"]]
    np.testing.assert_array_equal(table_embeddings(table), rows["embeddings"])
    assert not list(tmp_path.glob(".*"))  # no temporaries left


def test_missing_shards_json_is_incomplete(tmp_path):
    _write(tmp_path)
    (tmp_path / SHARDS_FILE).unlink()
    assert not is_shards_folder(tmp_path)
    with pytest.raises(ShardsError, match="shards.json: missing.*incomplete"):
        read_shards(tmp_path)


def test_leftover_temporary_is_incomplete(tmp_path):
    _write(tmp_path)
    (tmp_path / ".part-00003.parquet.123.abcd.tmp").write_bytes(b"half")
    with pytest.raises(ShardsError, match=r"part-00003\.parquet\.123\.abcd\.tmp: a half-written file"):
        read_shards(tmp_path)


def test_bad_shard_names_the_file(tmp_path):
    _write(tmp_path)
    (tmp_path / "part-00001.parquet").write_bytes(b"garbage, not parquet")
    with pytest.raises(ShardsError, match=r"part-00001\.parquet: not a readable parquet shard"):
        read_shards(tmp_path)


def test_missing_listed_shard_names_the_file(tmp_path):
    _write(tmp_path)
    (tmp_path / "part-00002.parquet").unlink()
    with pytest.raises(ShardsError, match=r"part-00002\.parquet: listed in shards.json but missing"):
        read_shards(tmp_path)


def test_wrong_embedding_dtype_or_dim(tmp_path):
    _write(tmp_path)
    meta = json.loads((tmp_path / SHARDS_FILE).read_text())
    meta["dim"] = 8
    (tmp_path / SHARDS_FILE).write_text(json.dumps(meta))
    with pytest.raises(ShardsError, match=r"part-00000\.parquet: written for another model or dimension"):
        read_shards(tmp_path)
    # a part whose metadata claims dim 4 but whose embeddings are float64
    _write(tmp_path / "b")
    path = tmp_path / "b" / "part-00000.parquet"
    table = pq.read_table(path)
    index = table.column_names.index("embedding")
    bad = pa.array([[0.5] * 4] * table.num_rows, pa.list_(pa.float64(), 4))
    pq.write_table(table.set_column(index, "embedding", bad).replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(ShardsError, match=r"part-00000\.parquet: column embedding is fixed_size_list<.*double>"):
        read_shards(tmp_path / "b")


def test_count_and_field_checks(tmp_path):
    _write(tmp_path)
    meta = json.loads((tmp_path / SHARDS_FILE).read_text())
    (tmp_path / SHARDS_FILE).write_text(json.dumps({**meta, "count": 11}))
    with pytest.raises(ShardsError, match="count 11 but the parts hold 10 rows"):
        read_shards(tmp_path)
    del meta["encoding_id"]
    (tmp_path / SHARDS_FILE).write_text(json.dumps(meta))
    with pytest.raises(ShardsError, match="missing field.*encoding_id"):
        read_shards(tmp_path)


def test_write_checks_shapes_and_values(tmp_path):
    rows = _rows(3)
    with pytest.raises(ShardsError, match="shape"):
        write_shards(tmp_path, **META, **{**rows, "embeddings": rows["embeddings"][:2]})
    bad = rows["embeddings"].copy()
    bad[1, 2] = np.nan
    with pytest.raises(ShardsError, match="NaN"):
        write_shards(tmp_path / "nan", **META, **{**rows, "embeddings": bad})


def test_resume_reuses_complete_parts(tmp_path):
    first = _write(tmp_path, n=8, shard_rows=4)
    stamp = (tmp_path / "part-00000.parquet").stat().st_mtime_ns
    (tmp_path / ".part-00002.parquet.1.x.tmp").write_bytes(b"interrupted")  # removed on resume
    rows = _rows(12)
    keys = list(zip(rows["paths"], rows["identities"]))
    writer = ShardWriter(tmp_path, META, wanted=keys, shard_rows=4)
    assert writer.reused == 2 and writer.done == set(keys[:8])
    writer.add(**{k: rows[k] for k in ("paths", "sizes", "mtimes", "identities", "captions", "embeddings")})
    meta = writer.close()
    assert writer.written == 4
    assert meta["shards"] == first["shards"] + ["part-00002.parquet"] and meta["count"] == 12
    assert (tmp_path / "part-00000.parquet").stat().st_mtime_ns == stamp
    _, table = read_shards(tmp_path)
    assert table.column("identity").to_pylist() == rows["identities"]
    np.testing.assert_array_equal(table_embeddings(table), rows["embeddings"])


def test_resume_drops_parts_with_unwanted_items(tmp_path):
    _write(tmp_path, n=8, shard_rows=4)
    rows = _rows(6, start=2)  # part 0 holds id0, id1 which are gone: it is dropped, id2, id3 embedded again
    writer = ShardWriter(tmp_path, META, wanted=list(zip(rows["paths"], rows["identities"])), shard_rows=4)
    assert writer.done == {(f"/img/{i}.png", f"id{i}") for i in (4, 5, 6, 7)}
    assert not (tmp_path / "part-00000.parquet").exists()


def test_resume_refuses_another_model(tmp_path):
    _write(tmp_path)
    with pytest.raises(ShardsError, match="holds embeddings of tiny:abc.*not of other"):
        ShardWriter(tmp_path, {**META, "model_id": "other"})


def test_identical_files_at_two_paths_keep_a_row_each(tmp_path):
    """--hash-content gives identical files one identity: every path still gets its row (the same vector)."""
    rows = _rows(3)
    rows["paths"].append("/other/copy-of-1.png")
    rows["sizes"].append(1)
    rows["mtimes"].append(9.5)
    rows["identities"].append("id1")
    rows["captions"].append(None)
    rows["embeddings"] = np.vstack([rows["embeddings"], rows["embeddings"][1:2]])
    meta = write_shards(tmp_path, **META, **rows)
    _, table = read_shards(tmp_path)
    assert meta["count"] == 4 and table.column("path").to_pylist() == rows["paths"]
    assert table.column("identity").to_pylist() == ["id0", "id1", "id2", "id1"]
    vectors = table_embeddings(table)
    np.testing.assert_array_equal(vectors[3], vectors[1])
    # a rerun keeps both rows; the same (path, identity) given twice is stored once
    again = write_shards(tmp_path, **META, **{k: (v + v[:1] if isinstance(v, list) else np.vstack([v, v[:1]]))
                                             for k, v in rows.items()})
    assert again["count"] == 4
    keys = list(zip(rows["paths"], rows["identities"]))
    assert ShardWriter(tmp_path, META, wanted=keys).done == set(keys)


def test_every_caption_is_stored(tmp_path):
    rows = _rows(3)
    rows["captions"] = [["a dog", "a brown dog on grass"], [], "one caption"]
    write_shards(tmp_path, **META, **rows)
    _, table = read_shards(tmp_path)
    assert table.column("caption").to_pylist() == ["a dog", None, "one caption"]
    assert table.column("captions").to_pylist() == [["a dog", "a brown dog on grass"], [], ["one caption"]]
    writer = ShardWriter(tmp_path / "w", META)  # the writer takes caption lists too
    writer.add(rows["paths"], rows["sizes"], rows["mtimes"], rows["identities"], rows["captions"], rows["embeddings"])
    writer.close()
    assert read_shards(tmp_path / "w")[1].column("captions").to_pylist() == table.column("captions").to_pylist()


def test_parts_without_the_captions_column_still_read(tmp_path):
    """Shards written before the captions column: read with captions = [caption] (or [])."""
    _write(tmp_path, n=4, shard_rows=4)
    path = tmp_path / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["captions"]).replace_schema_metadata(table.schema.metadata), path)
    _, read = read_shards(tmp_path)
    assert read.column("captions").to_pylist() == [[c] if c else [] for c in _rows(4)["captions"]]
    assert ShardWriter(tmp_path, META).reused == 1
