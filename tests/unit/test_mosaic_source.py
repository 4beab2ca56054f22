"""The box-yielding mosaic pretraining source (train/mosaic_source.py): boxes aligned with the tiles of the images,
captions naming the tiles, seeded batches, resume bit-identical with a region objective, and --loss cloc|grain
refused in one line on a source without boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cliplab.errors import CliplabError
from cliplab.train import PretrainConfig, PretrainOptionError, pretrain
from cliplab.train.loop import STATE_DIR, WEIGHTS, read_checkpoint
from cliplab.train.mosaic_source import MosaicSource, MosaicStream, names_caption, open_source, parse_mosaic_source

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
MODEL = {"embed_dim": 32,
         "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
         "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """train/ and val/ folders of slightly noisy single-colour 16 px images, one class folder per colour."""
    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 3)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 8, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "micro.json").write_text(json.dumps(MODEL))
    (root / "one.json").write_text(json.dumps(["a photo of a {c}.", "a picture of a {c}."]))
    (root / "desc.json").write_text(json.dumps({name: [f"{name} {j}, a colour" for j in range(3)]
                                                for name in COLOURS}))
    return root


def _tokenize(texts):
    return torch.tensor([[hash(t) % 1000] for t in texts])


def test_spec_parsing_and_bad_specs():
    assert parse_mosaic_source("cifar10") is None and parse_mosaic_source("mosaics") is None
    assert parse_mosaic_source("mosaic") == MosaicSource("cifar10", 2, None)
    assert parse_mosaic_source("mosaic:k=3,tiles=/d/x,descriptions=f.json") == MosaicSource("/d/x", 3, "f.json")
    for bad in ("mosaic:k=0", "mosaic:k=two", "mosaic:size=3", "mosaic:k"):
        with pytest.raises(CliplabError, match="mosaic"):
            parse_mosaic_source(bad)
    assert names_caption(["cat"]) == "cat" and names_caption(["cat", "dog", "ship"]) == "cat, dog and ship"


def test_a_batch_carries_boxes_aligned_with_its_tiles(colours):
    stream = open_source(f"mosaic:tiles={colours}", "train", 32, str(colours / "one.json"), None, False,
                         mean=(0, 0, 0), std=(1, 1, 1))
    assert isinstance(stream, MosaicStream) and len(stream) == 48 // 4 and stream.per_epoch(4) == 3
    names = stream.class_names
    centres = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32) / 255
    for batch in stream.batches(0, seed=3, batch_size=4, tokenize=_tokenize):
        images, boxes, labels = batch["images"], batch["boxes"], batch["region_labels"]
        assert boxes.shape == (16, 5) and labels.shape == (16,)
        for (b, x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist(), strict=True):
            assert x2 - x1 == 16 and y2 - y1 == 16
            inside = images[int(b), :, int(y1) + 2:int(y2) - 2, int(x1) + 2:int(x2) - 2].mean((1, 2))
            assert int(torch.cdist(inside[None], centres).argmin()) == label  # the box holds its label's colour
        # the labels are the tiles' own, in the (possibly mirrored) layout; the caption names them in reading order
        tile_labels = torch.as_tensor(np.asarray(stream.tiles.labels))[batch["items"]]
        assert torch.equal(tile_labels.reshape(-1), labels)
        caption = _tokenize([f"a photo of a {names_caption([names[j] for j in labels[4 * i:4 * i + 4]])}."
                             for i in range(4)])
        other = _tokenize([f"a picture of a {names_caption([names[j] for j in labels[4 * i:4 * i + 4]])}."
                           for i in range(4)])
        got = batch["tokens"][batch["text_index"]]
        assert all(torch.equal(g, a) or torch.equal(g, o) for g, a, o in zip(got, caption, other, strict=True))
        # one region text per class in the batch; a region's row is its class's
        rows = batch["region_text_index"]
        assert len(batch["region_tokens"]) == len(set(labels.tolist()))
        assert all(len(set(rows[labels == c].tolist())) == 1 for c in set(labels.tolist()))
        assert len(set(rows.tolist())) == len(set(labels.tolist()))
    again = list(stream.batches(0, 1, seed=3, batch_size=4, tokenize=_tokenize))
    whole = list(stream.batches(0, seed=3, batch_size=4, tokenize=_tokenize))[1:]
    for a, b in zip(again, whole, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_flips_mirror_the_tile_layout(colours):
    stream = open_source(f"mosaic:tiles={colours}", "train", 32, "generic", None, False)
    plain = next(iter(stream.batches(0, seed=1, batch_size=12, tokenize=_tokenize, flip=False)))
    flip = next(iter(stream.batches(0, seed=1, batch_size=12, tokenize=_tokenize, flip=True)))
    assert not torch.equal(plain["images"], flip["images"])
    for i in range(12):
        same = torch.equal(plain["images"][i], flip["images"][i])
        if not same:  # a mirrored image: its tiles in mirrored column order, the image mirrored
            assert torch.allclose(plain["images"][i].flip(-1), flip["images"][i])
            assert torch.equal(plain["items"][i].flip(-1), flip["items"][i])
        else:
            assert torch.equal(plain["items"][i], flip["items"][i])


def test_descriptions_are_the_region_texts(colours):
    stream = open_source(f"mosaic:tiles={colours},descriptions={colours / 'desc.json'}", "train", 32, "generic",
                         None, False)
    seen = []
    batch = next(iter(stream.batches(0, seed=0, batch_size=6, tokenize=lambda texts: seen.append(texts) or
                                     _tokenize(texts))))
    region_texts = seen[-1]
    names = stream.class_names
    present = list(dict.fromkeys(batch["region_labels"].tolist()))
    assert len(region_texts) == len(present)
    for text, label in zip(region_texts, present, strict=True):
        assert text in {f"{names[label]} {j}, a colour" for j in range(3)}


def test_resume_with_a_region_objective_is_bit_identical(colours, tmp_path):
    config = PretrainConfig(source=f"mosaic:tiles={colours}", model=str(colours / "micro.json"), loss="grain",
                            templates=str(colours / "one.json"), steps=5, batch_size=4, warmup=1, eval_every=100,
                            checkpoint_every=1)
    result = pretrain(config, tmp_path / "whole", progress=False)
    assert result.steps_done == 5

    def kill(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(config, tmp_path / "killed", progress=False, callback=kill)
    resumed = pretrain(config, tmp_path / "killed", progress=False)
    assert resumed.resumed_from == 3
    whole = read_checkpoint(tmp_path / "whole" / STATE_DIR / "checkpoint.pt")
    again = read_checkpoint(tmp_path / "killed" / STATE_DIR / "checkpoint.pt")
    for key, value in whole["model"].items():
        assert torch.equal(value, again["model"][key]), key
    assert (tmp_path / "killed" / WEIGHTS).read_bytes() == (tmp_path / "whole" / WEIGHTS).read_bytes()
    assert "zeroshot_top1" in result.final_metric  # the held-out check: the tile dataset's val split


def test_region_losses_refuse_a_source_without_boxes_in_one_line(colours, tmp_path):
    from cliplab.cli.app import app

    for loss in ("cloc", "grain"):
        config = PretrainConfig(source=str(colours), model=str(colours / "micro.json"), loss=loss, steps=1,
                                batch_size=4)
        with pytest.raises(PretrainOptionError, match=f"--loss {loss} trains on region boxes"):
            pretrain(config, tmp_path / loss, progress=False)
    out = CliRunner().invoke(app, ["pretrain", str(colours), "--loss", "cloc", "--model", str(colours / "micro.json"),
                                   "-o", str(tmp_path / "cli"), "--quiet", "--steps", "1", "--batch-size", "4"])
    assert out.exit_code != 0 and "source with boxes" in out.output and "Traceback" not in out.output
    out = CliRunner().invoke(app, ["pretrain", f"mosaic:tiles={colours}", "--loss", "cloc", "--model",
                                   str(colours / "micro.json"), "-o", str(tmp_path / "ok"), "--quiet", "--steps", "2",
                                   "--batch-size", "4", "--templates", str(colours / "one.json")])
    assert out.exit_code == 0, out.output
    card = json.loads(next((tmp_path / "ok").glob("*card*.json")).read_text())
    assert card["data"]["source"] == f"mosaic:tiles={colours}" and card["data"]["pairs"] == 12
