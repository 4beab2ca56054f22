"""Synthetic anomaly images (data/anomaly.py): exact masks, seeded, auxiliary split kept apart from the test split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.data.anomaly import AUX_DEFECTS, TEST_DEFECTS, anomaly_set, write_anomaly_set
from cliplab.errors import DatasetError

DATA = "/work/shared/datasets"


@pytest.fixture(scope="module")
def sets():
    pytest.importorskip("PIL")
    from pathlib import Path

    if not (Path(DATA) / "dtd_sample" / "labels.json").is_file():
        pytest.skip("dtd_sample not available")
    return {split: anomaly_set(split, root=DATA, size=64, per_source=3, anomaly_ratio=0.7, limit=10)
            for split in ("test", "aux")}


def test_aux_defects_and_sources_kept_apart_from_test(sets):
    test, aux = sets["test"], sets["aux"]
    assert test.defects == set(TEST_DEFECTS) and aux.defects == set(AUX_DEFECTS)
    assert not test.defects & aux.defects
    assert not test.sources & aux.sources
    assert not {s.texture for s in test.samples} & {s.texture for s in aux.samples}


def test_masks_are_exact(sets):
    for data in sets.values():
        assert 0 < data.labels.sum() < len(data)
        for sample in data.samples:
            changed = np.any(sample.image != sample.clean, axis=-1)
            assert not changed[~sample.mask].any(), "a pixel outside the mask differs from the clean crop"
            assert sample.label == int(sample.mask.any()) == int(bool(sample.defect))
            if sample.label:
                assert changed[sample.mask].mean() > 0.5  # the defect really changes the masked pixels


def test_seeded_and_reproducible(sets):
    again = anomaly_set("test", root=DATA, size=64, per_source=3, anomaly_ratio=0.7, limit=10)
    for a, b in zip(sets["test"].samples, again.samples):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    other = anomaly_set("test", root=DATA, size=64, per_source=3, anomaly_ratio=0.7, limit=10, seed=1)
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(sets["test"].samples, other.samples))


def test_written_set_round_trips(sets, tmp_path):
    manifest = write_anomaly_set(sets["test"], tmp_path)
    rows = json.loads(manifest.read_text())["images"]
    assert len(rows) == len(sets["test"])
    for row, sample in zip(rows, sets["test"].samples):
        assert np.array_equal(np.asarray(Image.open(tmp_path / row["image"])), sample.image)
        assert np.array_equal(np.asarray(Image.open(tmp_path / row["mask"])) > 127, sample.mask)


def test_bad_split_is_one_line():
    with pytest.raises(DatasetError) as info:
        anomaly_set("train", root=DATA)
    assert "\n" not in str(info.value) and "test, aux" in str(info.value)
