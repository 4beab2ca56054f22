"""Built-in class names equal CLIP_benchmark's, name for name and in order.

The expected lists live in ``tests/data/clip_benchmark_classnames.json``, copied from
LAION-AI/CLIP_benchmark (its ``_source`` key gives repo, commit and path; for datasets that
CLIP_benchmark names through torchvision, how the list was checked against the dataset's own files).
"""

import json
from pathlib import Path

import pytest

import cliplab.data
from cliplab.data import builtin_class_names

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "clip_benchmark_classnames.json"
EXPECTED = {name: names for name, names in json.loads(FIXTURE.read_text()).items() if not name.startswith("_")}


@pytest.mark.parametrize("dataset", sorted(EXPECTED))
def test_builtin_class_names_equal_clip_benchmark(dataset):
    # imagenet: CLIP_benchmark's raw list, duplicates ("missile", "sunglasses") included; making them
    # distinct for the zero-shot head is done in code, not in the built-in list.
    assert builtin_class_names(dataset) == EXPECTED[dataset]


def test_every_builtin_list_is_covered():
    shipped = {p.stem for p in (Path(cliplab.data.__file__).parent / "classnames").glob("*.json")}
    assert shipped <= set(EXPECTED), f"no CLIP_benchmark reference for {sorted(shipped - set(EXPECTED))}"
