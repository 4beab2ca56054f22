"""WaffleCLIP-style random descriptors (heads/waffle.py) against a hand computation on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.data.prompts import descriptor_clause, descriptor_sentence
from cliplab.errors import DescriptionError
from cliplab.features.text import embed_prompts
from cliplab.heads import create_head
from cliplab.heads.waffle import waffle_descriptors, word_list

CLASSES = ["cat", "dog", "sea turtle"]
DESCRIPTIONS = {"cat": ["pointed ears", "whiskers"], "dog": ["a wagging tail"], "sea turtle": ["a shell", "flippers"]}


def _features(tiny, n=10, seed=0):
    X = np.random.default_rng(seed).normal(size=(n, tiny.embed_dim)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_word_list_is_real_lowercase_words():
    words = word_list()
    assert len(words) > 10_000 and all(w.isalpha() and w.islower() and len(w) >= 3 for w in words)
    assert {"photo", "water", "house"} <= set(words)


def test_descriptors_are_seeded_and_have_their_lengths():
    a = waffle_descriptors(CLASSES, 4, seed=1, characters="xyz")
    assert a == waffle_descriptors(CLASSES, 4, seed=1, characters="xyz")
    assert a != waffle_descriptors(CLASSES, 4, seed=2, characters="xyz")
    assert len(a) == 8
    words, chars = a[0::2], a[1::2]
    # 1.33 words per name -> 1 word; mean word length (3 + 3 + 4.5) / 3 = 3.5 -> round() = 4 letters at most
    assert all(len(w.split(" ")) == 1 and len(w) <= 4 and w.isalpha() for w in words)
    # longest words 3, 3, 6 -> ceil(4) = 4 chars, 1 group -> their rounding adds a group: 5 characters
    assert all(len(c) == 5 and set(c) <= set("xyz") for c in chars)
    two_groups = waffle_descriptors(["sea turtle", "red fox"], 2, characters="q")
    # one space per name -> 2 groups; longest words 6, 3 -> 5 -> 5 + 2 - 1 = 6 -> two groups of 3
    assert two_groups[1] == "qqq, qqq"


def test_same_descriptors_for_every_class(tiny, tmp_path):
    head = create_head("waffle", backbone=tiny, class_names=CLASSES, waffle_count=3, seed=5, cache_dir=tmp_path)
    per_class = head.descriptors()
    assert len(per_class) == 3 and len(per_class[0]) == 6 and per_class[0] == per_class[1] == per_class[2]
    assert per_class[0] != create_head("waffle", backbone=tiny, class_names=CLASSES, waffle_count=3, seed=6,
                                       cache_dir=tmp_path).descriptors()[0]


def test_weights_equal_the_hand_computation(tiny, tmp_path):
    templates = ["a photo of a {c}", "art of the {c}"]
    head = create_head("waffle", backbone=tiny, class_names=CLASSES, waffle_count=2, seed=3, templates=templates,
                       suffix=".", cache_dir=tmp_path).fit()
    shared = waffle_descriptors(CLASSES, 2, seed=3, characters="abcdefghijklmnopqrstuvwxyz0123456789")
    sentences = [[descriptor_sentence(t, c, d, suffix=".") for t in templates for d in shared] for c in CLASSES]
    assert head.sentences_ == sentences and "sea turtle" in sentences[2][0]
    expected = np.stack([e.mean(axis=0) for e in embed_prompts(tiny, sentences, tmp_path)], axis=1)
    np.testing.assert_allclose(head.weights_, expected, rtol=1e-5, atol=1e-6)
    X = _features(tiny)
    np.testing.assert_allclose(head.logits(X), head.logit_scale_ * X @ expected, rtol=1e-4, atol=1e-4)


def test_default_is_their_a_photo_of_a_template_with_the_clause_before_the_full_stop(tiny, tmp_path):
    head = create_head("waffle", backbone=tiny, class_names=CLASSES, waffle_count=2, seed=7, cache_dir=tmp_path)
    shared = head.descriptors()[0]
    sentences = head.sentences()
    # their label_before_text 'A photo of a ' + class + ', which ...' + label_after_text '.'
    assert sentences[2] == [f"A photo of a sea turtle, {descriptor_clause(d)}." for d in shared]
    assert all(s.startswith("A photo of a ") and s.endswith(".") and "., " not in s for row in sentences for s in row)
    assert create_head("waffle", backbone=tiny, class_names=CLASSES, waffle_count=0).sentences()[0] == \
        ["A photo of a cat."]


def test_zero_count_is_the_template_classifier(tiny, tmp_path):
    X = _features(tiny)
    waffle = create_head("waffle", backbone=tiny, class_names=CLASSES, waffle_count=0, templates=["a photo of a {c}."],
                         cache_dir=tmp_path).fit()
    zeroshot = create_head("zeroshot", backbone=tiny, class_names=CLASSES, templates=["a photo of a {c}."],
                           cache_dir=tmp_path).fit()
    assert waffle.sentences_ == [["a photo of a cat."], ["a photo of a dog."], ["a photo of a sea turtle."]]
    np.testing.assert_allclose(waffle.logits(X), zeroshot.logits(X), rtol=1e-5, atol=1e-5)


def test_descriptions_give_the_character_pool_and_the_mixed_mode(tiny, tmp_path):
    head = create_head("waffle", backbone=tiny, class_names=CLASSES, waffle_count=3, descriptions=DESCRIPTIONS,
                       cache_dir=tmp_path)
    pool = set("".join(d for v in DESCRIPTIONS.values() for d in v)) - set(" ,.")
    assert all(set(c.replace(", ", "")) <= pool for c in head.descriptors()[0][1::2])
    mixed = head.set_params(add_descriptions=True, seed=4).descriptors()
    assert all(len(d) == 3 * 2 for d in mixed)  # int(2/3 * 3) = 2 pairs + 4 own draws -> 6 kept of 8
    for name, descs in zip(CLASSES, mixed):
        own = [d for d in descs if d in DESCRIPTIONS[name]]
        others = {d for n, v in DESCRIPTIONS.items() if n != name for d in v}
        assert not others & set(descs) and len(own) >= 2
    with pytest.raises(DescriptionError):
        create_head("waffle", backbone=tiny, class_names=CLASSES, add_descriptions=True).descriptors()
