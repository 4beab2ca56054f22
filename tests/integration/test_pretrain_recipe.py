"""The CI recipe: a one-minute CLIP trained on real CIFAR-10 train images beats chance on the test split,
scored through cliplab's own pipeline (the written open_clip folder, load_model, the zero-shot head)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cliplab.data import Subset, load_dataset
from cliplab.eval.zeroshot import evaluate_zeroshot
from cliplab.models import load_model
from cliplab.train.recipes import is_finished, recipe_config, recipe_folder, recipe_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ci_recipe_beats_chance_on_cifar10_test(data_root, tmp_path):
    folder = recipe_model("cifar10-ci", data_root, models_dir=tmp_path, progress=False)
    assert folder == recipe_folder(recipe_config("cifar10-ci", data_root), "cifar10-ci", tmp_path)
    assert is_finished(folder)
    card = json.loads((folder / "model_card.json").read_text())
    assert card["data"]["pairs"] == 9000  # the 1,000 val images are held out of training
    test = load_dataset("cifar10", root=data_root, split="test")
    picked = np.random.default_rng(0).choice(len(test), 2000, replace=False)
    report = evaluate_zeroshot(load_model(str(folder)), Subset(test, np.sort(picked)), "cifar10",
                               output_dir=tmp_path / "eval", progress=False)
    assert report.metrics["acc1"] > 0.18  # chance is 0.10; the 1-minute recipe reaches about 0.25-0.3
    # a second call finds the finished model and does not train again
    assert recipe_model("cifar10-ci", data_root, models_dir=tmp_path, progress=False) == folder
