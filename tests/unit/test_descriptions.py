"""Description sets (CuPL / DCLIP files) and the DCLIP and CuPL heads against reference formulas on the tiny model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from cliplab.data.descriptions import load_descriptions, read_descriptions, save_descriptions
from cliplab.data.prompts import builtin_class_names
from cliplab.errors import DescriptionError
from cliplab.features.text import class_weights
from cliplab.heads import create_head
from cliplab.heads.dclip import descriptor_clause, descriptor_sentence

SHARED = Path("/work/shared/descriptions")
CLASSES = ["cat", "dog", "sea_turtle"]


def _shared(relative: str) -> Path:
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"real description file not found: {path}")
    return path


def _features(tiny, n=12, seed=0):
    X = np.random.default_rng(seed).normal(size=(n, tiny.embed_dim)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


# --- loading and saving ----------------------------------------------------------------------------------------

def test_real_cupl_cifar10_matches_the_cifar10_labels():
    labels = builtin_class_names("cifar10")
    sets = load_descriptions(_shared("cupl/full_prompts/cifar10_prompts_full.json"), labels)
    assert list(sets) == labels
    assert all(len(v) >= 10 and all(isinstance(s, str) and s for s in v) for v in sets.values())


def test_real_gzipped_cupl_file_loads():
    sets = read_descriptions(_shared("cupl/base_prompts/bird_prompts_base.json.gz"))
    assert len(sets) == 500 and all(sets.values())  # Birdsnap


def test_real_dclip_pets_matches_folder_style_labels_loosely():
    raw = json.loads(_shared("dclip/descriptors_pets.json").read_text())
    labels = [k.lower().replace(" ", "_") for k in raw]  # "British Shorthair" -> "british_shorthair"
    sets = load_descriptions(SHARED / "dclip/descriptors_pets.json", labels)
    assert len(sets) == 37 and list(sets) == labels
    assert sets["british_shorthair"] == raw["British Shorthair"]


def test_real_dclip_dtd_through_the_head(tiny, tmp_path):
    labels = builtin_class_names("dtd")
    path = _shared("dclip/descriptors_dtd.json")
    head = create_head("dclip", backbone=tiny, class_names=labels, descriptions=str(path), cache_dir=tmp_path).fit()
    raw = json.loads(path.read_text())
    assert head.weights_.shape == (tiny.embed_dim, 47)
    assert [len(s) for s in head.sentences_] == [len(raw[c]) for c in labels]
    assert head.sentences_[0][0] == descriptor_sentence("{c}", "banded", raw["banded"][0])
    X = _features(tiny)
    np.testing.assert_allclose(head.sentence_scores(X, 5).mean(axis=1), head.logits(X)[:, 5] / head.logit_scale_,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["set.json", "set.json.gz"])
def test_save_then_load_round_trips(tmp_path, name):
    sets = {"cat": ["A cat has whiskers.", "pointy ears"], "sea turtle": ["a shell", ""]}
    path = save_descriptions(sets, tmp_path / "sub" / name)
    assert read_descriptions(path) == sets
    assert load_descriptions(path, CLASSES[::-1][:1] + ["cat"], subset=False) == {
        "sea_turtle": sets["sea turtle"], "cat": sets["cat"]}
    assert [p.name for p in path.parent.iterdir()] == [name]  # no temporary file left
    if name.endswith(".gz"):
        assert json.loads(gzip.decompress(path.read_bytes())) == sets
        assert save_descriptions(sets, tmp_path / "again.json.gz").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('["cat", "dog"]', "expected a JSON object"),
    ('{"cat": "whiskers"}', "'cat' must map to a list of strings"),
    ('{"cat": ["whiskers", 3]}', "not a string: 3"),
    ('{"cat": []}', "'cat' has no descriptions"),
    ('{"cat": ["  "]}', "'cat' has only blank descriptions"),
    ('{"dog": ["x"], "cat": ["", " \\t"]}', "'cat' has only blank descriptions"),
    ('{"cat": [""]}', "'cat' has only blank descriptions"),  # "no descriptor" is for in-memory mappings only
    ('{"cat": ["a"], "Cat": ["b"]}', "are the same name"),
    ("{}", "no classes described"),
])
def test_malformed_files_are_one_clear_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DescriptionError, match=message) as info:
        read_descriptions(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_labels_must_match_the_described_classes(tiny, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"cat": ["x"], "dog": ["y"], "sea turtle": ["z"], "zebra": ["stripes"]}))
    with pytest.raises(DescriptionError, match=r"d.json: class 'zebra' is not among the labels"):
        load_descriptions(path, CLASSES)
    assert list(load_descriptions(path, CLASSES, subset=True)) == CLASSES
    with pytest.raises(DescriptionError, match="no descriptions for label 'horse'"):
        load_descriptions(path, ["cat", "horse"], subset=True)
    with pytest.raises(DescriptionError, match="not found"):
        read_descriptions(tmp_path / "missing.json")
    with pytest.raises(DescriptionError, match="no descriptions for label 'dog'"):
        create_head("dclip", backbone=tiny, class_names=["cat", "dog"], descriptions={"cat": ["x"]}).fit()


# --- DCLIP ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("descriptor, clause", [
    ("antennae", "which has antennae"),  # their startswith('a') gives "which is antennae": the documented slip
    ("almond-shaped eyes", "which has almond-shaped eyes"),
    ("aircraft", "which has aircraft"),
    ("a long tail", "which is a long tail"),
    ("an insect", "which is an insect"),
    ("used for cutting", "which is used for cutting"),
    ("has six legs", "which has six legs"),
    ("often, a cap or lid", "which often, a cap or lid"),
    ("typically red", "which typically red"),
    ("may have spots", "which may have spots"),
    ("can fly", "which can fly"),
    ("candles or other light sources", "which has candles or other light sources"),
    ("mayonnaise", "which has mayonnaise"),
    ("pointed ears", "which has pointed ears"),
    ("", ""),
])
def test_descriptor_phrasing(descriptor, clause):
    assert descriptor_clause(descriptor) == clause


def test_descriptor_sentence_forms():
    assert descriptor_sentence("{c}", "cat", "pointed ears") == "cat, which has pointed ears"
    assert descriptor_sentence("{c}", "cat", "pointed ears", suffix=".") == "cat, which has pointed ears."
    assert descriptor_sentence("a photo of a {c}", "cat", "") == "a photo of a cat"
    assert descriptor_sentence("{c}", "cat", "pointed ears", phrase=False) == "cat, pointed ears"


def test_the_clause_goes_before_the_templates_full_stop():
    # DCLIP's/WaffleCLIP's label_before_text + class + ", which ..." + label_after_text "."
    assert descriptor_sentence("A photo of a {c}.", "cat", "antennae") == "A photo of a cat, which has antennae."
    assert descriptor_sentence("a photo of a {c}.", "cat", "a long tail", suffix="!") == \
        "a photo of a cat, which is a long tail.!"
    assert descriptor_sentence("a {c}.", "cat", "whiskers", phrase=False) == "a cat, whiskers."
    assert descriptor_sentence("A photo of a {c}.", "cat", "") == "A photo of a cat."  # no descriptor: unchanged
    assert descriptor_sentence("A photo of a {c}.", "cat", "", suffix="!") == "A photo of a cat.!"
    assert descriptor_sentence("{c} in the wild", "cat", "whiskers") == "cat in the wild, which has whiskers"


def test_blank_descriptions_are_rejected_but_an_in_memory_empty_descriptor_is_not(tiny):
    with pytest.raises(DescriptionError, match=r"^descriptions: class 'cat' has only blank descriptions$"):
        load_descriptions({"cat": ["  "], "dog": ["x"]}, ["cat", "dog"])
    with pytest.raises(DescriptionError, match="'cat' has only blank descriptions"):
        create_head("dclip", backbone=tiny, class_names=["cat"], descriptions={"cat": [" ", ""]}).sentences()
    assert load_descriptions({"cat": [""], "dog": ["x", " "]}, ["cat", "dog"]) == {"cat": [""], "dog": ["x", " "]}
    with pytest.raises(DescriptionError, match="only blank"):
        save_descriptions({"cat": [""]}, Path("/nonexistent/never-written.json"))


@pytest.mark.parametrize("templates", [["a photo of a {c}."], ["a photo of a {c}.", "art of the {c}"]])
def test_dclip_with_one_empty_descriptor_is_the_template_classifier(tiny, tmp_path, templates):
    X = _features(tiny)
    dclip = create_head("dclip", backbone=tiny, class_names=CLASSES, templates=templates, cache_dir=tmp_path,
                        descriptions={c: [""] for c in CLASSES}).fit()
    # one template: CLIP's classifier exactly; several: the mean of per-prompt scores (no renormalisation)
    plain = create_head("zeroshot", backbone=tiny, class_names=CLASSES, templates=templates, cache_dir=tmp_path,
                        renormalize=len(templates) == 1).fit()
    np.testing.assert_allclose(dclip.logits(X), plain.logits(X), rtol=1e-5, atol=1e-5)
    no_file = create_head("dclip", backbone=tiny, class_names=CLASSES, templates=templates, cache_dir=tmp_path).fit()
    np.testing.assert_array_equal(no_file.logits(X), dclip.logits(X))


def test_dclip_scores_follow_the_authors_formula(tiny, tmp_path):
    descriptions = {"cat": ["pointed ears", "a small mammal", "whiskers"], "dog": ["has a wet nose", "antennae"],
                    "sea turtle": ["used for swimming"]}
    expected = {"cat": ["cat, which has pointed ears", "cat, which is a small mammal", "cat, which has whiskers"],
                "dog": ["dog, which has a wet nose", "dog, which has antennae"],
                "sea_turtle": ["sea_turtle, which is used for swimming"]}
    head = create_head("dclip", backbone=tiny, class_names=CLASSES, descriptions=descriptions, logit_scale=1.0,
                       cache_dir=tmp_path).fit()
    assert head.sentences_ == [expected[c] for c in CLASSES]
    X = _features(tiny)
    reference = []
    for c in CLASSES:  # authors: F.normalize(encode_text(sentences)), image @ v.T, mean over descriptors
        e = tiny.encode_texts(expected[c]).numpy().astype(np.float64)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        reference.append((X.astype(np.float64) @ e.T).mean(axis=1))
    np.testing.assert_allclose(head.logits(X), np.stack(reference, axis=1), rtol=1e-4, atol=1e-5)
    assert head.predict(X).tolist() == np.stack(reference, axis=1).argmax(axis=1).tolist()


# --- CuPL -----------------------------------------------------------------------------------------------------

def test_cupl_is_clip_ensembling_of_the_sentences(tiny, tmp_path):
    sentences = {"cat": ["A cat is a small furry pet.", "Cats have whiskers."], "dog": ["A dog wags its tail."],
                 "sea turtle": ["A sea turtle swims in the ocean.", "It has a shell.", "Flippers."]}
    head = create_head("cupl", backbone=tiny, class_names=CLASSES, descriptions=sentences, cache_dir=tmp_path).fit()
    X = _features(tiny)
    mapping = {"cat": sentences["cat"], "dog": sentences["dog"], "sea_turtle": sentences["sea turtle"]}
    W = class_weights(tiny, CLASSES, mapping, renormalize=True, cache_dir=tmp_path)
    np.testing.assert_allclose(head.logits(X), tiny.logit_scale * X @ W, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(head.weights_, axis=0), 1.0, rtol=1e-5)
    # CuPL + e: the sentences and the filled templates, ensembled together
    both = create_head("cupl", backbone=tiny, class_names=CLASSES, descriptions=sentences, templates=["a {c}"],
                       cache_dir=tmp_path).fit()
    W2 = class_weights(tiny, CLASSES, {c: mapping[c] + [f"a {c}"] for c in CLASSES}, cache_dir=tmp_path)
    np.testing.assert_allclose(both.weights_, W2, rtol=1e-5, atol=1e-6)
