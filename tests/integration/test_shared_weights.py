"""Real pretrained weights, when ../shared/models holds any: load them and check CIFAR-10 zero-shot.

Published CIFAR-10 zero-shot top-1 for CLIP-class models is 85-98%; random weights give ~10%. The test
asserts far above chance, so it fails if loading, preprocessing or the activation choice is wrong.
"""

from pathlib import Path

import pytest

from cliplab.data import Subset, load_dataset
from cliplab.eval import evaluate_zeroshot
from cliplab.models import load_model
from cliplab.models.hf import is_hf_clip_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"


def _candidates() -> list[Path]:
    if not MODELS.is_dir():
        return []
    found = [p for p in MODELS.rglob("*") if p.is_file() and p.suffix in (".pt", ".bin", ".safetensors")
             and not is_hf_clip_dir(p.parent)]
    found += [p for p in MODELS.rglob("*") if p.is_dir() and is_hf_clip_dir(p)]
    return sorted(found)


@pytest.mark.parametrize("weights", _candidates() or [None], ids=lambda p: p.name if p else "none")
def test_real_weights_zero_shot_cifar10_far_above_chance(weights, data_root, tmp_path):
    if weights is None:
        pytest.skip(f"no pretrained weights in {MODELS} (see its README)")
    backbone = load_model(str(weights), device="cpu")
    data = load_dataset("cifar10", root=data_root)
    subset = Subset(data, range(0, len(data), 10))  # 1,000 images, 100 per class
    report = evaluate_zeroshot(backbone, subset, "cifar10", cache_dir=tmp_path, progress=False)
    assert report.metrics["acc1"] > 0.6
