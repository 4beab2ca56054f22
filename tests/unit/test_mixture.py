"""Weighted mixtures of pretraining sources (train/mixture.py, ``cliplab pretrain --source NAME:WEIGHT``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.train.config import PretrainOptionError
from cliplab.train.mixture import MixtureStream, is_mixture, mixture_draws, mixture_source, parse_weighted, read_mixture


def _pairs(root, name: str, count: int, rgb: tuple[int, int, int]):
    """A caption manifest of ``count`` noisy single-colour 16 px images."""
    from cliplab.data import load_dataset
    from cliplab.train.pairs import PairStream

    folder = root / name
    folder.mkdir()
    rng = np.random.default_rng(count)
    rows = []
    for i in range(count):
        pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"image": str(folder / f"{i}.png"), "caption": f"{name} {i}"})
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return PairStream(load_dataset(str(folder / "pairs.jsonl")), 16, progress=False, workers=1)


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return _pairs(root, "red", 12, (220, 30, 30)), _pairs(root, "blue", 8, (30, 40, 220))


@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, 2.0, 1.0), (0.5, 0.0, 0.5)])
def test_draw_shares_match_the_weights_within_a_binomial_bound(weights):
    n = 20_000
    draws = np.concatenate([mixture_draws(weights, seed=5, epoch=e, count=n // 4) for e in range(4)])
    p = np.asarray(weights) / sum(weights)
    counts = np.bincount(draws, minlength=len(p))
    for k in range(len(p)):
        if p[k] == 0:
            assert counts[k] == 0  # a weight of 0 never draws
        else:  # 5 standard deviations of Binomial(n, p): a wrong share (e.g. unnormalised or swapped) fails
            assert abs(counts[k] - n * p[k]) <= 5 * math.sqrt(n * p[k] * (1 - p[k]))
    assert not np.array_equal(mixture_draws(weights, 5, 0, 500), mixture_draws(weights, 6, 0, 500))
    assert np.array_equal(mixture_draws(weights, 5, 1, 500), mixture_draws(weights, 5, 1, 500))


def test_parsing_and_the_recorded_source():
    assert parse_weighted(["cifar10:0.7", "coco_mini:0.3"]) == [("cifar10", 0.7), ("coco_mini", 0.3)]
    assert parse_weighted(["cifar10"]) == [("cifar10", 1.0)]
    assert mixture_source(["cifar10"]) == mixture_source(["cifar10:0.5"]) == "cifar10"  # one source: as today
    mixed = mixture_source(["cifar10:0.7", "coco_mini:0.3"])
    assert is_mixture(mixed) and read_mixture(mixed) == [("cifar10", 0.7), ("coco_mini", 0.3)]
    for bad in (["a:x"], ["a:-1"], ["a:0"], ["a:1", "a:2"], [":1"], ["a:nan"]):
        with pytest.raises(PretrainOptionError):
            parse_weighted(bad)


def _same(a: dict, b: dict) -> bool:
    return (torch.equal(a["images"], b["images"]) and torch.equal(a["items"], b["items"])
            and a["tokens"] == b["tokens"] and torch.equal(a["text_index"], b["text_index"]))


def test_one_source_mixture_is_that_source_bit_for_bit(streams):
    red = streams[0]
    mix = MixtureStream([red], [1.0], ["red"])
    options = {"seed": 2, "batch_size": 4, "tokenize": list}
    assert mix.per_epoch(4) == red.per_epoch(4) == 3
    for epoch in (0, 1):
        plain, mixed = list(red.batches(epoch, **options)), list(mix.batches(epoch, **options))
        assert len(plain) == len(mixed) == 3 and all(_same(a, b) for a, b in zip(plain, mixed))
    assert all(_same(a, b) for a, b in zip(red.batches(1, 1, **options), mix.batches(1, 1, **options)))


def test_mixture_batches_follow_the_draws_and_resume(streams):
    red, blue = streams
    mix = MixtureStream([red, blue], [0.6, 0.4], ["red", "blue"])
    options = {"seed": 1, "batch_size": 4, "tokenize": list}
    assert mix.per_epoch(4) == 3 + 2
    epochs = [list(mix.batches(e, **options)) for e in range(3)]
    seen = {0: [], 1: []}
    for epoch, batches in enumerate(epochs):
        draws = mixture_draws([0.6, 0.4], 1, epoch, 5)
        for k, batch in zip(draws.tolist(), batches, strict=True):
            # one source per batch: red items are 0..11, blue items offset by red's 12 pairs
            assert all((i < 12) == (k == 0) for i in batch["items"].tolist())
            assert all(t.startswith(("red", "blue")[k]) for t in batch["tokens"])
            seen[k].append(batch)
    for k, stream in enumerate(streams):  # source k's j-th drawn batch is its own batch j (its own seed)
        own = [b for e in range(8) for b in stream.batches(e, seed=1 + 7919 * k, batch_size=4, tokenize=list)]
        for j, batch in enumerate(seen[k]):
            shifted = dict(batch, items=batch["items"] - (12 if k else 0))
            assert _same(own[j], shifted)
    assert all(_same(a, b) for a, b in zip(epochs[2][2:], mix.batches(2, 2, **options), strict=True))


def test_weight_zero_source_never_yields(streams):
    mix = MixtureStream(list(streams), [1.0, 0.0], ["red", "blue"])
    for epoch in range(4):
        for batch in mix.batches(epoch, seed=0, batch_size=4, tokenize=list):
            assert batch["items"].max() < 12


def test_cli_records_the_mixture_in_the_config(streams, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cliplab.cli.app import app
    from cliplab.train import loop

    seen = {}

    def fake(config, folder, progress=True):
        seen["config"] = config
        raise PretrainOptionError("stop here")

    monkeypatch.setattr(loop, "pretrain", fake)
    monkeypatch.setattr("cliplab.train.pretrain", fake)
    red, blue = (str(s.dataset.paths[0].parent / "pairs.jsonl") for s in streams)
    out = CliRunner().invoke(app, ["pretrain", "--source", f"{red}:3", "--source", f"{blue}:1", "-o",
                                   str(tmp_path / "m"), "--quiet"])
    assert "stop here" in out.output
    assert read_mixture(seen["config"].source) == [(red, 3.0), (blue, 1.0)]
    assert seen["config"].to_dict()["source"] == seen["config"].source
    out = CliRunner().invoke(app, ["pretrain", red, "--source", f"{blue}:1", "-o", str(tmp_path / "m")])
    assert out.exit_code != 0 and "one of them" in out.output


def test_a_mixture_trains_and_its_card_records_it(streams, tmp_path):
    from cliplab.train import PretrainConfig, pretrain

    model = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1,
                                             "head_width": 8},
             "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "micro.json").write_text(json.dumps(model))
    red, blue = (str(s.dataset.paths[0].parent / "pairs.jsonl") for s in streams)
    source = mixture_source([f"{red}:0.5", f"{blue}:0.5"])
    config = PretrainConfig(source=source, model=str(tmp_path / "micro.json"), steps=3, batch_size=4, warmup=1,
                            checkpoint_every=10)
    result = pretrain(config, tmp_path / "out", progress=False)
    assert result.steps_done == 3 and any("mixture" in note for note in result.notes)
    card = json.loads(next((tmp_path / "out").glob("*card*.json")).read_text())
    assert read_mixture(card["data"]["source"]) == [(red, 0.5), (blue, 0.5)] and card["data"]["pairs"] == 20
