"""Counting (CLIP-EBC, issue 27 item 3): bins, prompts, the loss against hand computations, the counter, scenes, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cliplab.data.counting import CountingSpec, block_counts, load_counting_scenes, split_textures
from cliplab.errors import CliplabError, DatasetError, ModelMismatchError
from cliplab.models import BackboneInfo
from cliplab.models.openclip import OpenClipBackbone, transform_for
from cliplab.regions import ebc_loss as E
from cliplab.regions.counting import (
    CounterConfig,
    CountingUnsupportedError,
    EBCCounter,
    count_features,
    count_images,
    embed_blocks,
    fit_counter,
    load_counter,
    save_counter,
)
from cliplab.train.config import BUILTIN_CONFIGS
from cliplab.train.engine import TrainSettings

BINS = E.fine_bins(4)


def _resnet() -> OpenClipBackbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.model.CLIP(**BUILTIN_CONFIGS["cliplab-rn-32px"]).eval()
    open_clip.set_model_preprocess_cfg(model, {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    info = BackboneInfo(name="cliplab-rn-32px", pretrained=None, source="test", random_weights=True)
    return OpenClipBackbone(model, transform_for(model), open_clip.SimpleTokenizer(context_length=32), info,
                            "test:rn", "cpu")


def test_bins_anchors_classes_and_prompts():
    assert E.fine_bins(2) == [(0.0, 0.0), (1.0, 1.0), (2.0, math.inf)]
    counts = torch.tensor([0.0, 1.0, 2.0, 3.0, 7.0, 0.5])
    assert E.bin_index(counts, BINS).tolist() == [0, 1, 2, 3, 4, 0]  # 0.5 is in no bin: class 0, as theirs
    assert E.middle_anchors([(0, 0), (1, 3), (4, math.inf)]) == [0, 2, 4]
    # training block counts 0,0,1,5,7: bins {0}, {1}, {2}, {3}, [4, inf) -> 0, 1, (none: 2), (none: 3), 6
    assert E.average_anchors(BINS, [0, 0, 1, 5, 7]) == [0.0, 1.0, 2.0, 3.0, 6.0]
    prompts = [E.bin_prompt(lo, hi) for lo, hi in BINS]
    assert prompts == ["There is no object.", "There is one object.", "There are two objects.",
                       "There are three objects.", "There are more than four objects."]
    assert E.bin_prompt(2, 5, "cat", prompt_type="number") == "There are between 2 and 5 cats."
    assert [E.number_word(n) for n in (0, 13, 40, 21, 105, 1000)] == [
        "zero", "thirteen", "forty", "twenty-one", "one hundred five", "1000"]
    with pytest.raises(CliplabError, match="increasing"):
        E.check_bins([(0, 1), (1, 2)])


def test_one_hot_probabilities_give_the_anchor():
    anchors = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.7])
    chosen = torch.tensor([[4, 0], [2, 1]])
    logits = torch.full((1, 5, 2, 2), -1e4)
    for r in range(2):
        for c in range(2):
            logits[0, chosen[r, c], r, c] = 1e4
    probs, density = E.expected_count(logits, anchors)
    assert torch.equal(density[0, 0], anchors[chosen])
    assert torch.equal(probs.sum(1), torch.ones(1, 2, 2))


def test_counter_block_equal_to_a_prompt_counts_its_anchor(tiny):
    counter = EBCCounter(tiny, CounterConfig(block=32), anchors=[0.0, 1.0, 2.0, 3.0, 5.5])
    with torch.no_grad():
        counter.logit_scale.fill_(math.log(1e5))  # a block's feature equal to prompt k: p is one-hot at k
    feats = counter.text_features[[4, 1, 0, 2]].reshape(1, 2, 2, -1)
    _, density = counter.forward_features(feats)
    torch.testing.assert_close(density[0, 0], torch.tensor([[5.5, 1.0], [0.0, 2.0]]))


def test_density_map_sums_to_the_total_and_is_the_anchor_expectation(tiny):
    counter = EBCCounter(tiny, CounterConfig(block=32))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8))
    (result,) = count_images(counter, [image])
    assert result.density.shape == (2, 3)  # 70/32 -> 2 blocks, 100/32 -> 3 blocks
    assert result.size == (96, 64)
    assert result.total == pytest.approx(result.density.sum(), rel=1e-12)
    expected = np.tensordot(counter.anchors.numpy(), result.probabilities, axes=1)
    np.testing.assert_allclose(result.density, expected, rtol=1e-5)


def test_patch_blocks_pool_the_dense_tokens(tiny):
    from cliplab.models.dense import dense_tower

    counter = EBCCounter(tiny, CounterConfig(block=16, blocks="patches"))
    images = torch.randn(1, 3, 32, 48)
    tokens = dense_tower(tiny).tokens(images)  # (1, 4, 6, d) for 8-px patches
    expected = tokens.reshape(1, 2, 2, 3, 2, -1).mean(dim=(2, 4))
    torch.testing.assert_close(counter.block_features(images), expected, rtol=1e-5, atol=1e-6)


def _hand_case():
    """One image, two blocks of 32 px (centres (16, 16), (48, 16)), one point at (40, 10), bins {0}, [1, inf)."""
    logits = torch.tensor([[[[0.3, -0.2]], [[0.1, 0.9]]]], requires_grad=True)  # (1, K=2, 1, 2)
    anchors = torch.tensor([0.0, 1.3])
    target = torch.tensor([[[[0.0, 1.0]]]])
    points = [torch.tensor([[40.0, 10.0]])]
    return logits, anchors, target, points


def test_loss_against_a_hand_computed_case():
    logits, anchors, target, points = _hand_case()
    bins = E.fine_bins(1)
    _, density = E.expected_count(logits, anchors)
    loss, info = E.ebc_loss(logits, density, target, points, bins, 32)
    z = logits.detach().numpy()[0, :, 0, :]  # (K, blocks)
    p = np.exp(z) / np.exp(z).sum(0)
    d = 1.3 * p[1]
    ce = -np.log(p[0, 0]) - np.log(p[1, 1])
    count = abs(d.sum() - 1)
    tv = np.abs(d / d.sum() - np.array([0.0, 1.0])).sum() * 1
    # the OT term's value is sum(d * (beta/c - <d, beta>/c^2)) = 0; only its gradient acts
    assert float(info["ce_loss"]) == pytest.approx(ce, rel=1e-6)
    assert float(info["count_loss"]) == pytest.approx(count, rel=1e-5)
    assert float(info["tv_loss"]) == pytest.approx(tv, rel=1e-5)
    assert float(info["ot_loss"]) == pytest.approx(0.0, abs=1e-4)
    assert float(loss.detach()) == pytest.approx(ce + count + 0.01 * tv, rel=1e-5)
    mae, _ = E.ebc_loss(logits, density, target, points, bins, 32, count_loss="mae")
    assert float(mae.detach()) == pytest.approx(ce + np.abs(d - np.array([0.0, 1.0])).sum(), rel=1e-6)


def test_ot_gradient_is_the_closed_form_dual():
    # one point: Sinkhorn's dual is beta_j = reg log b_j + C_j (b the normalised density), after one scaling
    # (reg 100 keeps the kernel exp(-C/reg) far above the 1e-16 guard the divisions carry)
    density = torch.tensor([[[[0.4, 0.9]]]], requires_grad=True)
    E.ot_loss(density, [torch.tensor([[40.0, 10.0]])], block=32, reg=100.0).backward()
    d = np.array([0.4, 0.9])
    c = d.sum()
    cost = np.array([(40 - 16) ** 2 + (10 - 16) ** 2, (40 - 48) ** 2 + (10 - 16) ** 2])
    beta = 100.0 * np.log(d / c) + cost
    expected = beta / c - (d * beta).sum() / c ** 2
    np.testing.assert_allclose(density.grad.numpy().ravel(), expected, rtol=1e-4, atol=1e-4)


def test_sinkhorn_meets_both_marginals():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(5, generator=gen)
    b = torch.rand(9, generator=gen)
    a, b = a / a.sum(), b / b.sum()
    plan, _ = E.sinkhorn(a, b, torch.rand(5, 9, generator=gen) * 20, reg=10.0, max_iter=1000)
    torch.testing.assert_close(plan.sum(1), a, atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(0), b, atol=1e-5, rtol=0)


def test_block_counts_by_hand():
    points = np.array([[0.0, 0.0], [31.9, 5.0], [32.0, 5.0], [63.0, 63.0], [64.0, 10.0]])
    counts = block_counts(points, 64, 64, 32)
    assert counts.tolist() == [[2.0, 2.0], [0.0, 1.0]]  # x = 64 is on the far edge: kept in the last column


def test_scenes_are_seeded_in_range_and_from_disjoint_sources(data_root):
    spec = CountingSpec(count=4, size=64, max_count=6, object_min=8, object_max=10, seed=3)
    test = load_counting_scenes(data_root, "test", spec)
    again = load_counting_scenes(data_root, "test", spec)[2]
    first = test[2]
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert np.array_equal(first.points, again.points) and first.image.size == (64, 64)
    assert test.counts().tolist() == [test[i].count for i in range(4)]
    for i in range(4):
        scene = test[i]
        assert 0 <= scene.count <= 6 and len(scene.labels) == scene.count
        assert ((scene.points >= 4) & (scene.points <= 60)).all()  # centres of whole 8-10 px squares
    train = load_counting_scenes(data_root, "train", spec)
    assert test.objects.split == "test" and train.objects.split == "train"
    assert not {p for p, _ in test.textures} & {p for p, _ in train.textures}
    assert len(test.textures) + len(train.textures) == 100
    with pytest.raises(DatasetError, match="min_count"):
        CountingSpec(min_count=5, max_count=2)


def test_split_textures_alternate_within_each_class():
    rows = [("a0", "a"), ("a1", "a"), ("b0", "b"), ("a2", "a"), ("b1", "b")]
    assert split_textures(rows, "train") == [("a0", "a"), ("b0", "b"), ("a2", "a")]
    assert split_textures(rows, "test") == [("a1", "a"), ("b1", "b")]


def _loss_on(counter, scenes, bins):
    from cliplab.regions.counting import _prepare

    data = _prepare(counter.backbone, scenes, counter.config.block)
    with torch.no_grad():
        logits, density = counter(torch.stack(data.images))
        loss, _ = E.ebc_loss(logits, density, torch.stack(data.targets), data.points, bins, counter.config.block)
    return float(loss)


def test_fit_lowers_the_training_loss_and_a_saved_counter_counts_the_same(tiny, data_root, tmp_path):
    spec = CountingSpec(count=6, size=64, max_count=8, object_min=8, object_max=12)
    scenes = load_counting_scenes(data_root, "train", spec)
    config = CounterConfig(block=32)
    untrained = EBCCounter(tiny, config, anchors=None)
    settings = TrainSettings(epochs=6, lr=3e-3, seed=0, progress=False)
    counter, result = fit_counter(tiny, scenes, config, settings, batch_size=3)
    assert result.steps == 12
    assert counter.anchors.tolist()[:4] == [0.0, 1.0, 2.0, 3.0]
    untrained.anchors.copy_(counter.anchors)
    assert _loss_on(counter, scenes, config.bins) < _loss_on(untrained, scenes, config.bins)
    save_counter(counter, tmp_path / "ctr")
    loaded = load_counter(tmp_path / "ctr", tiny)
    images = [scenes[0].image, scenes[1].image]
    for a, b in zip(count_images(counter, images), count_images(loaded, images)):
        assert a.total == b.total and np.array_equal(a.density, b.density)
    with pytest.raises(ModelMismatchError, match="trained on tiny") as info:
        load_counter(tmp_path / "ctr", _resnet())
    assert "\n" not in str(info.value)


def test_block_embeddings_computed_once_give_the_same_counts_and_training(tiny, data_root):
    scenes = load_counting_scenes(data_root, "train", CountingSpec(count=3, size=64, max_count=6, object_min=8,
                                                                   object_max=10))
    config = CounterConfig(block=32)
    images = [scenes[i].image for i in range(3)]
    feats = embed_blocks(tiny, images, config)
    untrained = EBCCounter(tiny, config)
    for a, b in zip(count_features(untrained, feats), count_images(untrained, images)):
        assert a.total == pytest.approx(b.total, rel=1e-6) and a.size == b.size
    settings = TrainSettings(epochs=1, lr=1e-2, progress=False)
    given, _ = fit_counter(tiny, scenes, config, settings, features=feats)
    own, _ = fit_counter(tiny, scenes, config, settings)
    for key, value in own.state_dict().items():
        torch.testing.assert_close(given.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(CliplabError, match="2 precomputed block embeddings for 3 scenes"):
        fit_counter(tiny, scenes, config, settings, features=feats[:2])


def test_vpt_trains_prompt_tokens_through_the_tower(tiny, data_root):
    scenes = load_counting_scenes(data_root, "train", CountingSpec(count=2, size=32, max_count=3, object_min=8,
                                                                   object_max=8))
    config = CounterConfig(block=32, num_vpt=2, deep_vpt=False)
    counter = EBCCounter(tiny, config)
    before = counter.vpt[0].detach().clone()
    trained, _ = fit_counter(tiny, scenes, config, TrainSettings(epochs=1, lr=1e-2, progress=False), batch_size=2)
    assert len(trained.vpt) == 1 and not torch.equal(trained.vpt[0].detach(), before)
    assert len(EBCCounter(tiny, CounterConfig(num_vpt=3)).vpt) == 2  # deep: one set per block of tiny's 2


def test_unsupported_towers_are_one_line():
    rn = _resnet()
    with pytest.raises(CountingUnsupportedError, match="patches needs a ViT image tower.*use --blocks tiles") as a:
        EBCCounter(rn, CounterConfig(blocks="patches"))
    with pytest.raises(CountingUnsupportedError, match="--vpt needs a ViT image tower.*ModifiedResNet") as b:
        EBCCounter(rn, CounterConfig(num_vpt=4))
    assert "\n" not in str(a.value) and "\n" not in str(b.value)
    counter = EBCCounter(rn, CounterConfig(block=32))  # tiles work on any tower
    (result,) = count_images(counter, [Image.new("RGB", (64, 32), (90, 20, 30))])
    assert result.density.shape == (1, 2)


def test_cli_counts_writes_the_png_and_refuses_bad_input(tmp_path, monkeypatch):
    from cliplab.cli.app import app

    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save("a.png")
    runner = CliRunner()
    result = runner.invoke(app, ["count", "a.png", "--model", "tiny", "-q", "-o", "out"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "counts.json").read_text())["images"][0]
    assert record["count"] == pytest.approx(np.sum(record["density"]), abs=1e-3)
    assert f"a.png: {record['count']:.1f} objects (2x3 blocks of 32 px)" in result.output
    assert Image.open(tmp_path / "out" / "a_density.png").size == (96, 64)
    empty = runner.invoke(app, ["count", "--model", "tiny"])
    assert empty.exit_code != 0 and "error: no images to count" in empty.output
    assert len([line for line in empty.output.splitlines() if line.strip()]) == 1
    no_counter = runner.invoke(app, ["count", "a.png", "--model", "tiny", "--counter", "nowhere"])
    assert no_counter.exit_code != 0 and "nowhere: not a saved counter" in no_counter.output


@pytest.mark.parametrize(("args", "words"), [
    (["--blocks", "patches"], "--blocks patches needs a ViT image tower"),
    (["--vpt", "2", "--train", "never"], "--vpt needs a ViT image tower"),
])
def test_cli_counts_on_an_unsupported_tower_are_one_line(tmp_path, monkeypatch, args, words):
    from cliplab.cli.app import app
    from cliplab.cli.common import RunOptions

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 32), (90, 20, 30)).save("a.png")
    monkeypatch.setattr(RunOptions, "load_backbone", lambda self: _resnet())
    result = CliRunner().invoke(app, ["count", "a.png", "-q", *args])
    assert result.exit_code != 0 and not (tmp_path / "never").exists()
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and words in " ".join(result.output.split()), result.output
