"""Ranking-aware adapter (paper 15): difference tokens, losses, metrics, the ordinal set, a short fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from cliplab.data.base import ArrayImageDataset
from cliplab.data.corruptions import corrupt, item_seed
from cliplab.data.ordinal import OrdinalDataset, numeric_levels, ordinal_set
from cliplab.errors import CliplabError
from cliplab.eval.ranking import kendall_tau, pair_counts, pairwise_accuracy, ranking_metrics
from cliplab.train.rank_adapter import (
    AdapterConfig,
    RankAdapter,
    RankAdapterError,
    RankTrainSettings,
    all_pairs,
    fit_rank_adapter,
    group_batches,
    load_ranker,
    pair_loss,
    regression_loss,
    text_tokens,
)


@pytest.fixture()
def adapter():
    torch.manual_seed(0)
    return RankAdapter(AdapterConfig(dim=16, width=24, heads=3, queries=5)).eval()


@pytest.fixture()
def fused(adapter):
    g = torch.Generator().manual_seed(1)
    return adapter.fuse(torch.randn(4, 7, 16, generator=g), torch.randn(3, 16, generator=g)).detach()


def test_pair_with_itself_has_zero_difference_tokens(adapter, fused):
    pairs = torch.tensor([[k, k] for k in range(4)])
    tokens = adapter.rank_attention.difference_tokens(fused, pairs)
    assert tokens.shape == (4, 5, 24)
    assert torch.equal(tokens, torch.zeros_like(tokens))
    assert torch.equal(adapter.pair_logits(fused, pairs), torch.zeros(4))


def test_swapping_a_pair_negates_its_difference_tokens_and_logit(adapter, fused):
    pairs = all_pairs(4)
    tokens = adapter.rank_attention.difference_tokens(fused, pairs)
    swapped = adapter.rank_attention.difference_tokens(fused, pairs.flip(1))
    assert tokens.abs().max() > 1e-4  # different images give a real difference
    torch.testing.assert_close(swapped, -tokens, atol=1e-6, rtol=0)
    logits = adapter.pair_logits(fused, pairs)
    torch.testing.assert_close(adapter.pair_logits(fused, pairs.flip(1)), -logits, atol=1e-6, rtol=0)


def test_difference_tokens_match_the_written_out_attention(adapter, fused):
    att = adapter.rank_attention
    i, j = 2, 0
    h, dh = att.heads, att.head_dim
    q = att.ln_q(att.q_proj(att.queries))  # (Q, W)
    kv = att.ln_kv(att.kv_proj(fused))  # (B, P, W)
    p = fused.shape[1]
    heads = []
    for head in range(h):
        cols = slice(head * dh, (head + 1) * dh)
        keys = torch.cat([kv[i, :, cols], kv[j, :, cols]])  # (2P, dh): one softmax over both images
        weights = torch.softmax(q[:, cols] @ keys.T / math.sqrt(dh), dim=-1)
        heads.append(weights[:, :p] @ kv[i, :, cols] - weights[:, p:] @ kv[j, :, cols])
    expected = torch.cat(heads, dim=1) @ att.out_proj.weight.T
    got = att.difference_tokens(fused, torch.tensor([[i, j]]))[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pair_losses_match_their_formulas():
    logits = torch.tensor([0.3, -1.2, 2.0, 0.7, -0.1, 0.5])
    pairs = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 0], [1, 2], [2, 1]])
    targets = torch.tensor([2.0, 1.0, 2.0])  # items 0 and 2 tie: pairs 2 and 3 are left out
    keep = [0, 1, 4, 5]
    above = torch.tensor([1.0, 0.0, 0.0, 1.0])  # y_i > y_j for the kept pairs
    z = logits[keep]
    bce = -(above * torch.log(torch.sigmoid(z)) + (1 - above) * torch.log(1 - torch.sigmoid(z))).mean()
    torch.testing.assert_close(pair_loss(logits, pairs, targets, "logistic"), bce)
    sign = 2 * above - 1
    hinge = torch.clamp(0.5 - sign * z, min=0).mean()
    torch.testing.assert_close(pair_loss(logits, pairs, targets, "margin", margin=0.5), hinge)
    assert float(pair_loss(logits, pairs, torch.ones(3))) == 0.0
    s, t = torch.tensor([0.2, 0.9, 3.0]), torch.tensor([0.0, 1.0, 0.5])
    d = (s - t).abs()
    smooth = torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()
    torch.testing.assert_close(regression_loss(s, t), torch.log(1 + smooth))


def test_kendall_tau_and_pair_counts_against_scipy_and_brute_force():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 4, 60).astype(float)
    scores = np.round(truth + rng.normal(0, 1.5, 60), 1)  # ties in both
    scores[:5] = scores[5]
    c = pair_counts(truth, scores)
    brute = dict.fromkeys(c, 0)
    for a in range(60):
        for b in range(a + 1, 60):
            dt, ds = np.sign(truth[a] - truth[b]), np.sign(scores[a] - scores[b])
            key = ("both_ties" if dt == ds == 0 else "truth_ties" if dt == 0 else "score_ties" if ds == 0
                   else "concordant" if dt == ds else "discordant")
            brute[key] += 1
    assert c == brute
    n0 = c["concordant"] + c["discordant"]
    tau_b = (c["concordant"] - c["discordant"]) / math.sqrt((n0 + c["score_ties"]) * (n0 + c["truth_ties"]))
    assert kendall_tau(truth, scores) == pytest.approx(kendalltau(truth, scores).statistic, abs=1e-12)
    assert kendall_tau(truth, scores) == pytest.approx(tau_b, abs=1e-12)
    accuracy = (c["concordant"] + 0.5 * c["score_ties"]) / (n0 + c["score_ties"])
    assert pairwise_accuracy(truth, scores) == pytest.approx(accuracy)
    assert pairwise_accuracy([0, 1, 2], [5, 6, 7]) == 1.0 and pairwise_accuracy([0, 1, 2], [7, 6, 5]) == 0.0
    within = ranking_metrics([0, 1, 0, 1], [1, 2, 5, 3], groups=[0, 0, 1, 1])
    assert within["within_pairwise"] == 0.5 and within["within_tau"] == 0.0


def _synthetic(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n).astype(float)
    direction = np.random.default_rng(99).normal(size=16)
    return (rng.normal(size=(n, 6, 16)) + 0.5 * y[:, None, None] * direction).astype(np.float32), y


def test_a_short_fit_orders_an_easy_synthetic_set_and_round_trips(tmp_path):
    train_x, train_y = _synthetic(96, 1)
    test_x, test_y = _synthetic(80, 2)  # never seen by the fit
    text = np.random.default_rng(5).normal(size=(3, 16)).astype(np.float32)
    ranker = fit_rank_adapter(train_x, train_y, text, text="more", model_id="m",
                              settings=RankTrainSettings(epochs=3, batch_size=16, lr=3e-3),
                              config=AdapterConfig(dim=16, heads=2))
    scores = ranker.scores(test_x, text)
    assert kendall_tau(test_y, scores) > 0.5  # chance is 0
    assert pairwise_accuracy(test_y, scores) > 0.75  # chance is 0.5
    ranker.save(tmp_path / "ad")
    again = load_ranker(tmp_path / "ad")
    assert again.text == "more" and again.model_id == "m" and (again.low, again.high) == (0.0, 4.0)
    np.testing.assert_array_equal(again.scores(test_x, text), scores)
    flat = torch.as_tensor(train_x).reshape(-1, 16)  # tokens standardised by the training tokens' statistics
    torch.testing.assert_close(again.adapter.token_mean, flat.mean(0))
    torch.testing.assert_close(again.adapter.token_scale, flat.std(0, unbiased=False) + 1e-6)


def test_grouped_batches_hold_whole_groups_and_every_item_once():
    groups = np.repeat([7, 3, 9, 1, 5], [6, 6, 6, 6, 2])[np.random.default_rng(0).permutation(26)]
    batches = group_batches(groups, 13, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(26))
    for batch in batches:
        for name in set(groups[batch]):
            assert set(np.flatnonzero(groups == name)) <= set(batch.tolist())  # a group is never split
        assert len(batch) <= 13
    assert group_batches(groups, 4, np.random.default_rng(1))[0].size in (2, 6)  # a group larger than a batch
    x, y = _synthetic(26, 0)
    text = np.ones((2, 16), np.float32)
    grouped = fit_rank_adapter(x, y, text, groups=groups, settings=RankTrainSettings(epochs=1, batch_size=13),
                               config=AdapterConfig(dim=16, heads=2))
    assert grouped.history == [] and np.isfinite(grouped.scores(x, text)).all()


def test_bad_input_is_one_line(tmp_path):
    x, y = _synthetic(8, 0)
    text = np.ones((2, 16), np.float32)
    cases = [
        (lambda: fit_rank_adapter(x, np.ones(8), text), "every target is the same"),
        (lambda: fit_rank_adapter(x, y[:5], text), "8 images but 5 targets"),
        (lambda: fit_rank_adapter(x[..., :4], y, text, config=AdapterConfig(dim=16)), "expected (n, tokens, 16)"),
        (lambda: fit_rank_adapter(x, y * np.nan, text), "NaN"),
        (lambda: AdapterConfig(dim=16, heads=5), "5 heads do not divide"),
        (lambda: RankTrainSettings(pair="hinge"), "choose from logistic, margin"),
        (lambda: RankTrainSettings(regression_weight=0, score_pair_weight=0), "train the ranking score"),
        (lambda: fit_rank_adapter(x, y, text, groups=[0, 1]), "8 images but 2 groups"),
        (lambda: load_ranker(tmp_path), "not a rank adapter folder"),
    ]
    for call, message in cases:
        with pytest.raises(RankAdapterError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)


def test_text_tokens_end_with_the_text_embedding(tiny):
    tokens = text_tokens(tiny, "how blurry is the image")
    assert tokens.shape[0] == len(tiny.tokenize(["how blurry is the image"])[0].nonzero()) and tokens.shape[1] == 64
    torch.testing.assert_close(tokens[-1], tiny.encode_texts(["how blurry is the image"])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(len(tokens)))
    with pytest.raises(CliplabError, match="ranking text is empty"):
        text_tokens(tiny, " ")


@pytest.fixture()
def base(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    return ArrayImageDataset(images, np.zeros(12), ["x"], tmp_path / "images.npy", "toy")


def test_ordinal_set_is_seeded_and_split_by_source_image(base):
    train = ordinal_set("blur", "train", sources=10, base=base, seed=4)
    test = ordinal_set("blur", "test", sources=10, base=base, seed=4)
    assert len(train) == len(test) == 5 * 6
    assert not set(train.groups) & set(test.groups)  # no picture in both
    assert set(train.groups) | set(test.groups) == set(ordinal_set("blur", "all", sources=10, base=base,
                                                                   seed=4).groups)
    np.testing.assert_array_equal(ordinal_set("blur", "test", sources=10, base=base, seed=4).groups, test.groups)
    np.testing.assert_array_equal(numeric_levels(test), np.tile(np.arange(6.0), 5))
    source = int(test.groups[0])
    assert np.array_equal(np.asarray(test.load_image(0)), base.images[source])  # level 0: the clean image
    blurred = corrupt(base.load_image(source), "gaussian_blur", 3, item_seed(4, base.identity(source)))
    assert np.array_equal(np.asarray(test.load_image(3)), np.asarray(blurred))
    assert len(set(test.identities())) == len(test) and test.text == "how blurry is the image"
    bright = ordinal_set("brightness", "test", sources=10, base=base, seed=4)
    assert bright.text == "how bright is the image"
    assert np.asarray(bright.load_image(5)).mean() > np.asarray(bright.load_image(0)).mean()


def test_ordinal_and_level_errors_are_one_line(base):
    for call, message in [(lambda: ordinal_set("noise", base=base), "unknown ordinal property"),
                          (lambda: ordinal_set("blur", "val", base=base), "choose from train, test, all"),
                          (lambda: ordinal_set("blur", sources=40, base=base), "give 2 to 12"),
                          (lambda: OrdinalDataset(base, [0, 1], "blur", levels=(0, 7)), "severity"),
                          (lambda: numeric_levels(base), "class 'x' is not a number")]:
        with pytest.raises(CliplabError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)


def test_image_tokens_are_patch_tokens_or_the_embedding_as_one_token(tiny, base, tmp_path, monkeypatch):
    from cliplab.errors import DenseFeaturesUnavailableError
    from cliplab.features import embed_images
    from cliplab.models.dense import dense_tokens, dense_transform
    from cliplab.train.rank_adapter import image_tokens

    tokens, indices, failures, source = image_tokens(tiny, base, tmp_path / "cache")
    assert source == "patches 4x4" and tokens.shape == (12, 16, 64) and indices == list(range(12)) and not failures
    first = dense_transform(tiny)(base.load_image(0)).unsqueeze(0)
    np.testing.assert_allclose(tokens[0], dense_tokens(tiny, first).reshape(16, 64).numpy(), atol=1e-5)

    def no_grid(_backbone):
        raise DenseFeaturesUnavailableError("no patch grid")

    monkeypatch.setattr("cliplab.models.dense.dense_tower", no_grid)
    tokens, indices, _, source = image_tokens(tiny, base, tmp_path / "cache")
    assert source == "embedding" and tokens.shape == (12, 1, 64)
    np.testing.assert_array_equal(tokens[:, 0], embed_images(tiny, base, tmp_path / "cache").features)
