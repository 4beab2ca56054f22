"""CLIP-S, RefCLIP-S, the self-critical CLIP-S reward and the grammar head (paper 47), against written-out formulas."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cliplab.errors import CliplabError
from cliplab.eval import caption_grammar as grammar
from cliplab.eval.captions import (
    PROMPT,
    clip_s,
    harmonic_mean,
    prompted,
    refclip_s,
    reference_score,
    self_critical_reward,
)


def _hessel_clip_score(images: np.ndarray, candidates: np.ndarray, w: float = 2.5) -> np.ndarray:
    """Hessel et al.'s ``get_clip_score`` on precomputed features, written out (numpy >= 1.21 branch)."""
    images = images / np.sqrt(np.sum(images ** 2, axis=1, keepdims=True))
    candidates = candidates / np.sqrt(np.sum(candidates ** 2, axis=1, keepdims=True))
    return w * np.clip(np.sum(images * candidates, axis=1), 0, None)


def _hessel_ref_only(candidates: np.ndarray, references: list[np.ndarray]) -> np.ndarray:
    """Hessel's ``get_refonlyclipscore``: the raw max cosine to the references (no w, no clipping)."""
    candidates = candidates / np.sqrt(np.sum(candidates ** 2, axis=1, keepdims=True))
    out = []
    for cand, refs in zip(candidates, references):
        refs = refs / np.sqrt(np.sum(refs ** 2, axis=1, keepdims=True))
        out.append(np.max(cand.dot(refs.T)))
    return np.array(out)


def _reward_refclip(img, text, refs, w=2.5):
    """CLIP-Caption-Reward's ``calc_refclip_s`` on normalised (B, d), (B, d), (B, R, d) tensors, written out."""
    clip = w * torch.relu((img * text).sum(-1))
    ref = (w * torch.relu((text[:, None, :] * refs).sum(-1))).max(dim=1).values
    return 2 / (1 / clip + 1 / ref)


def _normed(rng, *shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_clip_s_equals_the_reference_function_on_random_features():
    rng = np.random.default_rng(0)
    images, texts = rng.standard_normal((50, 16)) * 3, rng.standard_normal((50, 16))
    texts[:5] = -images[:5]  # negative cosines: clipped to 0
    ours = clip_s(images, texts)
    np.testing.assert_allclose(ours, _hessel_clip_score(images, texts), rtol=0, atol=1e-12)
    assert (ours[:5] == 0).all() and ours.max() > 0
    np.testing.assert_allclose(clip_s(images, texts, w=1.0), ours / 2.5, atol=1e-12)


def test_refclip_s_hand_computed_case():
    # cos(image, caption) = 0.6 -> CLIP-S 1.5; references at cosines 0.8 and 0.0 -> best 0.8
    image = np.array([[1.0, 0.0, 0.0]])
    caption = np.array([[0.6, 0.8, 0.0]])
    refs = [np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]) * np.array([[1.0], [2.0]])]  # unnormalised rows
    # the first reference is the caption itself: cosine 1.0
    assert reference_score(caption, refs)[0] == pytest.approx(1.0)
    refs = [np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 5.0]])]  # cosines 0.8 and 0.0
    assert clip_s(image, caption)[0] == pytest.approx(1.5)
    assert reference_score(caption, refs)[0] == pytest.approx(0.8)
    assert refclip_s(image, caption, refs)[0] == pytest.approx(2 * 1.5 * 0.8 / (1.5 + 0.8))
    # the reward convention scales and clips the reference side: 2.5 * 0.8 = 2.0
    assert refclip_s(image, caption, refs, convention="reward")[0] == pytest.approx(2 * 1.5 * 2.0 / 3.5)


def test_refclip_s_equals_hessel_and_the_reward_code_on_random_features():
    rng = np.random.default_rng(1)
    images, texts = rng.standard_normal((20, 8)), rng.standard_normal((20, 8))
    refs = [rng.standard_normal((int(rng.integers(1, 6)), 8)) for _ in range(20)]
    a, b = _hessel_clip_score(images, texts), _hessel_ref_only(texts, refs)
    np.testing.assert_allclose(refclip_s(images, texts, refs), 2 * a * b / (a + b), atol=1e-12)

    img, txt = _normed(rng, 10, 8), _normed(rng, 10, 8)
    txt[:3] = img[:3] + 0.3 * txt[:3]  # positive CLIP-S for some rows
    ref = _normed(rng, 10, 4, 8)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    ref[:, 0] = txt + 0.1 * ref[:, 0]
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    want = _reward_refclip(torch.tensor(img), torch.tensor(txt), torch.tensor(ref)).numpy()
    np.testing.assert_allclose(refclip_s(img, txt, list(ref), convention="reward"), want, atol=1e-12)


def test_harmonic_mean_is_zero_when_both_terms_are():
    assert harmonic_mean([0.0, 1.0, 2.0], [0.0, 0.0, 2.0]).tolist() == [0.0, 0.0, 2.0]


def test_reward_is_zero_when_the_sample_is_the_greedy_caption():
    rng = np.random.default_rng(2)
    images, greedy = rng.standard_normal((4, 8)), rng.standard_normal((4, 8))
    rewards, mean = self_critical_reward(images, np.repeat(greedy, 3, axis=0), greedy)
    assert rewards.shape == (12,) and np.all(rewards == 0)
    assert mean == pytest.approx(clip_s(images, greedy).mean())
    refs = [rng.standard_normal((3, 8)) for _ in range(4)]
    rewards, _ = self_critical_reward(images, np.repeat(greedy, 3, axis=0), greedy, mode="refclip_s",
                                      references=refs)
    assert np.all(rewards == 0)


def test_reward_is_sample_minus_greedy_per_image_block():
    rng = np.random.default_rng(3)
    B, K = 3, 4
    images, samples, greedy = rng.standard_normal((B, 8)), rng.standard_normal((B * K, 8)), rng.standard_normal((B, 8))
    rewards, mean = self_critical_reward(images, samples, greedy)
    for i in range(B):
        for k in range(K):
            want = (_hessel_clip_score(images[i:i + 1], samples[i * K + k:i * K + k + 1])
                    - _hessel_clip_score(images[i:i + 1], greedy[i:i + 1]))[0]
            assert rewards[i * K + k] == pytest.approx(want, abs=1e-12)
    assert mean == pytest.approx(_hessel_clip_score(np.repeat(images, K, 0), samples).mean())
    with pytest.raises(CliplabError):
        self_critical_reward(images, samples[:-1], greedy)


def test_the_prompt_prefix_is_theirs():
    assert prompted(["a dog"]) == ["A photo depicts a dog"] and PROMPT == "A photo depicts"
    assert prompted(["a dog"], "") == ["a dog"]


@pytest.mark.parametrize("kind", grammar.CORRUPTIONS)
def test_each_corruption_does_what_it_says(kind):
    vocab = ["red", "blue", "cat", "tree"]
    text = "a dog sits on the grass near a fence"
    tokens = text.split()
    for seed in range(20):
        out, used = grammar.corrupt(text, vocab, random.Random(seed), kind)
        words = out.split()
        assert used == kind
        if kind == "shuffle":
            assert sorted(words) == sorted(tokens)
        elif kind == "remove":
            assert 1 <= len(tokens) - len(words) <= 3
            assert any(words == tokens[:i] + tokens[i + n:] for n in (1, 2, 3) for i in range(len(tokens)))
        elif kind == "insert":
            extra = len(words) - len(tokens)
            assert 1 <= extra <= 3 and sum(w in vocab for w in words) == extra
        elif kind == "swap":
            assert len(words) == len(tokens) and 1 <= sum(a != b for a, b in zip(words, tokens)) <= 3
            assert all(b in vocab for a, b in zip(tokens, words) if a != b)
        else:  # repeat: only tokens of the caption, 1..9 more of them
            assert set(words) <= set(tokens) and 1 <= len(words) - len(tokens) <= 9


def test_negatives_are_seeded_and_short_captions_work():
    caps = ["a cat", "dog", "two birds on a wire"]
    assert grammar.negatives(caps, seed=5) == grammar.negatives(caps, seed=5)
    assert grammar.negatives(caps * 10, seed=5) != grammar.negatives(caps * 10, seed=6)
    for kind in grammar.CORRUPTIONS:
        grammar.corrupt("dog", ["cat", "dog"], random.Random(0), kind)


def test_grammar_head_learns_a_separable_corpus_through_the_training_loop():
    rng = np.random.default_rng(0)
    good = rng.standard_normal((200, 8)) + np.array([2.0] + [0] * 7)
    bad = rng.standard_normal((200, 8)) - np.array([2.0] + [0] * 7)
    head = grammar.fit_grammar_head(good[:150], bad[:150], epochs=20, lr=2e-2, batch_size=100)
    assert grammar.accuracy(head, good[150:], bad[150:]) > 0.9
    net = head.net
    assert net[0].bias is None and net[2].bias is None and net[2].out_features == 2
    x = torch.tensor(good[:3], dtype=torch.float32)
    want = torch.softmax(net[2](torch.relu(net[0](x))), dim=-1)[:, 1].detach().numpy()
    np.testing.assert_allclose(head.probability(good[:3]), want, atol=1e-6)
