"""cliplab pretrain: the loss falls and held-out zero-shot beats chance, resume repeats a run exactly,
the folder round-trips through load_model, bad captions and images are skipped and counted."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.errors import CliplabError, DatasetError
from cliplab.models import load_model
from cliplab.train import PretrainConfig, PretrainOptionError, pretrain
from cliplab.train.augment import random_resized_crop
from cliplab.train.loop import STATE_DIR, WEIGHTS, batch_indices, learning_rate, read_checkpoint, training_lock

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
MODEL = {"embed_dim": 32,
         "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "head_width": 16},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    """train/ and val/ folders of noisy single-colour images, one class folder per colour."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 10)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def model_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "micro.json"
    path.write_text(json.dumps(MODEL))
    return str(path)


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "one.json"
    path.write_text(json.dumps(["a photo of a {c}."]))
    return str(path)


@pytest.fixture
def cfg(colour_data, model_json, template_file):
    """A PretrainConfig factory: micro model, colour folders, one template; keyword options override."""

    def make(source=None, **overrides) -> PretrainConfig:
        options = {"source": str(source or colour_data), "model": model_json, "templates": template_file,
                   "steps": 6, "batch_size": 16, "lr": 2e-3, "warmup": 2, "eval_every": 3, "checkpoint_every": 2}
        return PretrainConfig(**{**options, **overrides})

    return make


def test_learning_rate_is_open_clip_warmup_then_cosine():
    cfg = PretrainConfig(source="x", steps=100, warmup=10, lr=1.0)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(55, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert learning_rate(99, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_batches_are_seeded_permutations_per_epoch():
    n, batch = 10, 3  # 3 full batches an epoch, the last item of each epoch's order unused
    epoch = np.concatenate([batch_indices(s, n, batch, seed=4) for s in range(3)])
    assert len(set(epoch.tolist())) == 9
    again = np.concatenate([batch_indices(s, n, batch, seed=4) for s in range(3)])
    assert np.array_equal(epoch, again)
    assert not np.array_equal(epoch, np.concatenate([batch_indices(s, n, batch, seed=5) for s in range(3)]))
    with pytest.raises(PretrainOptionError, match="larger than"):
        batch_indices(0, 2, 3, 0)


def test_full_crop_without_flip_is_the_identity():
    images = torch.rand(4, 3, 8, 8)
    out = random_resized_crop(images, torch.Generator().manual_seed(0), scale=1.0, ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(out, images, atol=1e-5)
    a = random_resized_crop(images, torch.Generator().manual_seed(1), scale=0.3)
    b = random_resized_crop(images, torch.Generator().manual_seed(1), scale=0.3)
    assert torch.equal(a, b) and not torch.allclose(a, images)


def test_training_lowers_the_loss_and_beats_chance_on_held_out(cfg, colour_data, tmp_path):
    config = cfg(steps=30, warmup=3, eval_every=10, checkpoint_every=30)
    losses = []
    result = pretrain(config, tmp_path / "m", progress=False, callback=lambda step, loss: losses.append(loss))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    assert result.final_metric["zeroshot_top1"] >= 0.6  # 4 classes: chance is 0.25
    card = json.loads((tmp_path / "m" / "model_card.json").read_text())
    assert card["data"]["pairs"] == 96 and card["held_out"]["zeroshot_top1"] == result.final_metric["zeroshot_top1"]
    assert card["steps"] == 30 and card["seed"] == 0 and len(card["history"]) == 3


def test_a_second_process_training_into_the_same_folder_is_refused(cfg, colour_data, tmp_path):
    """Two trainers of one folder would write the same checkpoint: the second is refused in one line, and the
    folder can be trained again once the first is done."""
    config = cfg(steps=2, warmup=1, eval_every=0, checkpoint_every=2)
    seen = []

    def second(step, loss):
        if not seen:
            with pytest.raises(PretrainOptionError, match="being trained by another process") as info:
                pretrain(config, tmp_path / "m", progress=False)
            seen.append(str(info.value))

    pretrain(config, tmp_path / "m", progress=False, callback=second)
    assert len(seen) == 1 and "\n" not in seen[0]
    with training_lock(tmp_path / "m"):  # released after the run
        pass


def test_folder_round_trips_through_load_model(cfg, colour_data, tmp_path):
    from cliplab.train.loop import build_model

    pretrain(cfg(steps=2, eval_split=None), tmp_path / "m", progress=False)
    backbone = load_model(str(tmp_path / "m"))
    state = read_checkpoint(tmp_path / "m" / STATE_DIR / "checkpoint.pt")
    model = build_model(MODEL, 0, "clip")
    model.load_state_dict(state["model"])
    model.eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    assert torch.allclose(backbone.encode_images(x), expected, atol=1e-5)
    assert backbone.embed_dim == 32 and backbone.context_length == 16


def test_resume_after_a_kill_gives_the_same_weights(cfg, colour_data, tmp_path):
    config = cfg()
    pretrain(config, tmp_path / "whole", progress=False)

    def kill(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(config, tmp_path / "killed", progress=False, callback=kill)
    assert read_checkpoint(tmp_path / "killed" / STATE_DIR / "checkpoint.pt")["step"] == 2
    result = pretrain(config, tmp_path / "killed", progress=False)
    assert result.resumed_from == 2
    whole = read_checkpoint(tmp_path / "whole" / STATE_DIR / "checkpoint.pt")
    resumed = read_checkpoint(tmp_path / "killed" / STATE_DIR / "checkpoint.pt")
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert (tmp_path / "killed" / WEIGHTS).read_bytes() == (tmp_path / "whole" / WEIGHTS).read_bytes()


def test_resume_with_other_options_is_refused_naming_them(cfg, colour_data, tmp_path):
    pretrain(cfg(steps=2), tmp_path / "m", progress=False)
    with pytest.raises(PretrainOptionError, match=r"--lr 0\.002 -> 0\.001"):
        pretrain(cfg(steps=2, lr=1e-3), tmp_path / "m", progress=False)
    # options that do not change the weights may differ
    pretrain(cfg(steps=2, eval_every=1), tmp_path / "m", progress=False)


def test_caption_manifest_skips_empty_captions_and_broken_images(cfg, colour_data, tmp_path):
    rows = []
    for name in COLOURS:
        for i in range(6):
            rows.append({"image": str(colour_data / "train" / name / f"{i}.png"), "caption": f"a {name} square"})
    rows.append({"image": str(colour_data / "train" / "red" / "7.png"), "caption": "   "})
    rows.append({"image": str(colour_data / "train" / "red" / "8.png"), "captions": [3, ""]})
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows.append({"image": str(broken), "caption": "a broken file"})
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    config = cfg(tmp_path / "pairs.jsonl", steps=4, eval_split=None, batch_size=8)
    result = pretrain(config, tmp_path / "m", progress=False)
    card = json.loads((tmp_path / "m" / "model_card.json").read_text())
    # 3 bad captions (blank, a number, empty), the 2 items they leave without a caption, 1 undecodable image
    assert card["data"]["pairs"] == 24 and result.skipped == 6
    reasons = " ".join(r for _, r in card["data"]["skipped_examples"])
    assert "empty" in reasons and "not text" in reasons and "broken" in " ".join(i for i, _ in
                                                                              card["data"]["skipped_examples"])


def test_caption_sources_are_checked_by_image_to_text_recall(cfg, colour_data, tmp_path):
    rows = [{"image": str(p), "caption": f"a {p.parent.name} square", "split": split}
            for split in ("train", "val") for p in sorted((colour_data / split).rglob("*.png"))]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = pretrain(cfg(tmp_path / "pairs.jsonl", steps=3, eval_every=3), tmp_path / "m",
                      progress=False)
    assert set(result.final_metric) == {"i2t_recall@1"}


def test_siglip_loss_trains(cfg, colour_data, tmp_path):
    result = pretrain(cfg(steps=3, loss="siglip", eval_split=None), tmp_path / "m",
                      progress=False)
    assert result.steps_done == 3 and "logit_bias" in load_model(str(tmp_path / "m")).model.state_dict()


def test_bad_options_and_sources_are_one_line_errors(cfg, colour_data, tmp_path):
    with pytest.raises(PretrainOptionError, match="--loss"):
        cfg(loss="triplet")
    with pytest.raises(PretrainOptionError, match="not a built-in config"):
        pretrain(cfg(model="no-such-arch"), tmp_path / "a", progress=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (16, 16)).save(flat / "a.png")
    with pytest.raises(DatasetError, match="neither captions nor class labels"):
        pretrain(cfg(flat, eval_split=None), tmp_path / "b", progress=False)
    (tmp_path / "c" / STATE_DIR).mkdir(parents=True)
    (tmp_path / "c" / STATE_DIR / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CliplabError, match="unreadable training checkpoint"):
        pretrain(cfg(), tmp_path / "c", progress=False)


def test_cli_pretrain_writes_a_model_other_commands_read(model_json, colour_data, tmp_path):
    runner = CliRunner()
    templates = tmp_path / "t.json"
    templates.write_text(json.dumps(["a photo of a {c}."]))
    out = tmp_path / "m"
    result = runner.invoke(app, ["pretrain", str(colour_data), "--model", model_json, "--output", str(out),
                                 "--steps", "4", "--batch-size", "16", "--warmup", "1", "--templates", str(templates),
                                 "--eval-every", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "held-out zeroshot_top1" in result.output
    classify = runner.invoke(app, ["classify", str(colour_data / "val" / "red"), "--model", str(out), "--labels",
                                   "red,green,blue,yellow", "--quiet"])
    assert classify.exit_code == 0, classify.output
    bad = runner.invoke(app, ["pretrain", str(colour_data), "--model", model_json, "--output", str(out),
                              "--steps", "4", "--batch-size", "16", "--lr", "0.5", "--templates", str(templates)])
    assert bad.exit_code != 0 and "cannot resume with different options" in bad.output


def _caption_manifest(colour_data, tmp_path, extra=()):
    """24 train images, each with its own caption ``item K``, plus ``extra`` rows."""
    paths = sorted((colour_data / "train").rglob("*.png"))[:24]
    rows = [{"image": str(p), "caption": f"item {k}"} for k, p in enumerate(paths)] + list(extra)
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path / "pairs.jsonl"


def test_stream_yields_every_pair_once_per_epoch_in_a_seeded_order(colour_data, tmp_path):
    from cliplab.data import load_dataset
    from cliplab.train.pairs import PairStream

    stream = PairStream(load_dataset(str(_caption_manifest(colour_data, tmp_path))), 16, progress=False)
    assert len(stream) == 24 and stream.caption_count == 24

    def epoch_batches(epoch, seed=3, start=0):
        return list(stream.batches(epoch, start, seed=seed, batch_size=6, tokenize=list))

    orders = []
    for epoch in (0, 1):
        batches = epoch_batches(epoch)
        items = torch.cat([b["items"] for b in batches]).tolist()
        assert sorted(items) == list(range(24))  # every pair exactly once
        assert items == stream.usable[np.random.default_rng([3, epoch]).permutation(24)].tolist()
        for b in batches:  # each image comes with its own caption
            assert [b["tokens"][i] for i in b["text_index"]] == [f"item {k}" for k in b["items"].tolist()]
            assert b["images"].shape == (6, 3, 16, 16)
        orders.append(items)
        tail = epoch_batches(epoch, start=2)  # a resumed epoch reads the same batches, augmentation included
        for whole, resumed in zip(batches[2:], tail, strict=True):
            assert torch.equal(whole["images"], resumed["images"]) and torch.equal(whole["items"], resumed["items"])
    assert orders[0] != orders[1]
    assert torch.cat([b["items"] for b in epoch_batches(0, seed=4)]).tolist() != orders[0]


def test_stream_replaces_an_image_damaged_past_its_header(colour_data, tmp_path):
    from cliplab.data import load_dataset
    from cliplab.train.pairs import PairStream

    good = (colour_data / "train" / "red" / "0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[:60])  # the PNG header parses; the pixels are gone
    path = _caption_manifest(colour_data, tmp_path, [{"image": str(tmp_path / "cut.png"), "caption": "item cut"}])
    stream = PairStream(load_dataset(str(path)), 16, progress=False)
    assert len(stream) == 25 and not stream.skipped  # the header probe lets it through
    batches = list(stream.batches(0, seed=0, batch_size=5, tokenize=list))
    assert sum(len(b["items"]) for b in batches) == 25
    assert len(stream.skipped) == 1 and "cut.png" in stream.skipped[0][0] and "replaced" in stream.skipped[0][1]


def test_held_out_check_is_the_zero_shot_head_accuracy(colour_data, tmp_path):
    from cliplab.train.loop import held_out_metric
    from cliplab.train.pairs import open_stream

    tiny = load_model("tiny")
    stream = open_stream(str(colour_data), "val", 32, "generic", None, progress=False, need_captions=False)
    got = held_out_metric(tiny, stream, ["a {c} square"], tmp_path / "cache")
    weights = torch.stack([tiny.encode_texts([f"a {c} square"])[0] for c in stream.class_names])
    images = torch.cat([x for _, x in stream.eval_batches()])
    predicted = (tiny.encode_images(images) @ weights.T).argmax(1).numpy()
    assert got["zeroshot_top1"] == pytest.approx(float((predicted == stream.labels()).mean()))


def test_fine_tune_trains_a_derived_copy_and_never_the_parent(cfg, colour_data, tmp_path):
    tiny = load_model("tiny")
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    config = cfg(steps=3, eval_every=3, init_model="tiny", lr=1e-3)
    assert config.recipe_hash({}) != cfg(steps=3, eval_every=3, lr=1e-3).recipe_hash({})
    result = pretrain(config, tmp_path / "ft", progress=False, init=tiny)
    assert tiny.model_id == "tiny-seed0" and not any(p.requires_grad for p in tiny.model.parameters())
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    tuned = load_model(str(tmp_path / "ft"))
    assert tuned.embed_dim == tiny.embed_dim and "zeroshot_top1" in result.final_metric
    # started from tiny's weights: 3 AdamW steps at lr 1e-3 move each weight by a few 1e-3 at most
    moved = [float((tuned.model.state_dict()[k] - v).abs().max()) for k, v in before.items() if v.is_floating_point()]
    assert 0 < max(moved) < 3 * 1e-3 * 2
    card = json.loads((tmp_path / "ft" / "model_card.json").read_text())
    assert card["init_model"]["model_id"] == "tiny-seed0" and card["weights_note"].startswith("fine-tuned")
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(tuned.encode_images(x), tiny.encode_images(x))


def test_cli_pretrain_fine_tunes_an_init_model(colour_data, tmp_path):
    runner = CliRunner()
    templates = tmp_path / "t.json"
    templates.write_text(json.dumps(["a photo of a {c}."]))
    result = runner.invoke(app, ["pretrain", str(colour_data), "--init-model", "tiny", "--output", str(tmp_path / "m"),
                                 "--steps", "2", "--batch-size", "16", "--warmup", "1", "--templates", str(templates),
                                 "--eval-split", "none", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "fine-tuned tiny" in result.output
    assert json.loads((tmp_path / "m" / "model_card.json").read_text())["init_model"]["spec"] == "tiny"


def test_new_options_leave_recipe_hashes_unchanged():
    from cliplab.fileio import digest
    from cliplab.train.config import resolve_model_config
    from cliplab.train.recipes import recipe_config, recipe_folder

    config = recipe_config("cifar10-signal", checkpoint_seconds=60)
    _, model_cfg = resolve_model_config(config.model)
    earlier = ("eval_every", "checkpoint_every", "device", "data_root")  # the options hashed before the engine
    options = {k: v for k, v in config.to_dict().items() if k not in earlier + ("checkpoint_seconds", "init_model")}
    assert config.recipe_hash(model_cfg) == digest(json.dumps(options, sort_keys=True),
                                                   json.dumps(model_cfg, sort_keys=True))
    assert recipe_folder(config, "cifar10-signal").name == "cifar10-signal-bb35648a65a4d494"  # cached models stay
