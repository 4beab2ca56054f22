"""REAL-Prompt and REAL-Linear (paper 36) on the tiny model: names from counts, retrieval, training inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplab.data.synonyms import load_image_text_corpus
from cliplab.errors import DatasetError
from cliplab.features.embed import embed_images
from cliplab.heads import create_head
from cliplab.heads import real_linear as real_linear_module

REPLAY = Path(__file__).resolve().parents[1] / "data" / "real_synonyms_replay.json"
pytestmark = pytest.mark.filterwarnings("ignore:real-linear. no corpus image")
TEMPLATES = ["a photo of a {c}.", "art of the {c}."]


def _corpus(tmp_path, lines):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _zeroshot(tiny, names, cache):
    return create_head("zeroshot", backbone=tiny, class_names=names, templates=TEMPLATES, cache_dir=cache).fit()


def test_own_name_as_only_synonym_is_the_template_head(tiny, tmp_path):
    names = ["sea lion", "cat", "dog"]
    corpus = _corpus(tmp_path, ["a sea lion", "a cat", "dogs"])
    head = create_head("real", backbone=tiny, class_names=names, templates=TEMPLATES, corpus=corpus,
                       synonyms={n: [n] for n in names}, cache_dir=tmp_path).fit()
    reference = _zeroshot(tiny, names, tmp_path)
    assert head.chosen_names_ == names
    np.testing.assert_array_equal(head.weights_, reference.weights_)
    X = np.random.default_rng(0).normal(size=(5, tiny.embed_dim)).astype(np.float32)
    np.testing.assert_array_equal(head.logits(X), reference.logits(X))
    default = create_head("real", backbone=tiny, class_names=names, templates=TEMPLATES, cache_dir=tmp_path).fit()
    np.testing.assert_array_equal(default.weights_, reference.weights_)


def test_the_most_frequent_synonym_fills_the_templates(tiny, tmp_path):
    corpus = _corpus(tmp_path, ["my kitty", "kitty!", "a cat", "Kitty sleeping", "a dog", "puppy"])
    head = create_head("real", backbone=tiny, class_names=["cat", "dog"], templates=TEMPLATES, corpus=corpus,
                       synonyms={"cat": ["kitty", "kitten"], "dog": ["puppy"]}, cache_dir=tmp_path).fit()
    assert head.chosen_names_ == ["kitty", "dog"]  # puppy ties with dog: the own name stays
    assert head.synonym_counts_ == {"cat": {"cat": 1, "kitty": 3, "kitten": 0}, "dog": {"dog": 1, "puppy": 1}}
    np.testing.assert_array_equal(head.weights_, _zeroshot(tiny, ["kitty", "dog"], tmp_path).weights_)
    assert head.fit_summary()["renamed"] == {"cat": "kitty"}


def test_llm_synonyms_through_replay_with_failures_reported(tiny, tmp_path):
    corpus = _corpus(tmp_path, ["an eared seal", "eared seals? no: eared seal", "sea lion", "dog"])
    head = create_head("real", backbone=tiny, class_names=["sea lion", "dog"], templates=TEMPLATES, corpus=corpus,
                       llm=f"replay:{REPLAY}", cache_dir=tmp_path).fit()
    assert head.synonym_counts_["sea lion"] == {"sea lion": 1, "lion": 1, "eared seal": 2}
    assert head.chosen_names_ == ["eared seal", "dog"]
    assert set(head.llm_failures_) == {"dog"}


def test_synonyms_without_a_corpus_are_refused(tiny):
    with pytest.raises(DatasetError, match="corpus"):
        create_head("real", backbone=tiny, class_names=["a", "b"], synonyms={"a": ["x"]}).fit()


# ------------------------------------------------------------------------------------------------ REAL-Linear

CLASSES = ["cat", "dog", "fish"]
ROWS = [  # (caption, retrieved for)
    ("a photo of a cat.", "cat"),
    ("a photo of a dog.", "dog"),
    ("a photo of a cat.", "cat"),
    ("a photo of a car.", None),
    ("a photo of a cat.", "cat"),
    ("A photo of a DOG.", "dog"),
]


@pytest.fixture()
def image_corpus(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i, (caption, _) in enumerate(ROWS):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
        lines.append(json.dumps({"path": f"img{i}.png", "caption": caption}))
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _linear(tiny, corpus, tmp_path, **params):
    return create_head("real-linear", backbone=tiny, class_names=CLASSES, templates=["a photo of a {c}."],
                       corpus=corpus, cache_dir=tmp_path, **params)


def test_retrieved_sets_and_training_inputs(tiny, image_corpus, tmp_path, monkeypatch):
    captured = {}
    original = real_linear_module.train_linear

    def spy(features, labels, *args, **kwargs):
        captured["features"], captured["labels"] = np.array(features), np.array(labels)
        return original(features, labels, *args, **kwargs)

    monkeypatch.setattr(real_linear_module, "train_linear", spy)
    X_test = np.random.default_rng(1).normal(size=(4, tiny.embed_dim)).astype(np.float32)
    head = _linear(tiny, image_corpus, tmp_path, max_images=2, steps=3).fit(X_test, np.array([0, 1, 2, 0]))
    dataset = load_image_text_corpus(image_corpus)
    ids = dataset.item_ids()
    assert head.retrieved_ == {"cat": [ids[0], ids[2]], "dog": [ids[1], ids[5]], "fish": []}  # max_images=2
    assert head.empty_classes_ == ["fish"]
    corpus_features = embed_images(tiny, dataset, tmp_path, progress=False)
    expected = corpus_features.take([ids[0], ids[2], ids[1], ids[5]]).features
    np.testing.assert_array_equal(captured["features"], expected)  # exactly the retrieved items, no test row
    np.testing.assert_array_equal(captured["labels"], [0, 0, 1, 1])
    assert head.fit_summary()["retrieved_per_class"] == {"cat": 2, "dog": 2, "fish": 0}


def test_untrained_head_is_the_zero_shot_head_and_training_moves_it(tiny, image_corpus, tmp_path):
    zeroshot = create_head("zeroshot", backbone=tiny, class_names=CLASSES, templates=["a photo of a {c}."],
                           cache_dir=tmp_path).fit()
    untrained = _linear(tiny, image_corpus, tmp_path, steps=0).fit()
    np.testing.assert_array_equal(untrained.weights_, zeroshot.weights_)
    trained = _linear(tiny, image_corpus, tmp_path, steps=20, lr=1e-2).fit()
    again = _linear(tiny, image_corpus, tmp_path, steps=20, lr=1e-2).fit()
    assert not np.allclose(trained.weights_, zeroshot.weights_)
    np.testing.assert_array_equal(trained.weights_, again.weights_)  # seeded
    default = create_head("real-linear", backbone=tiny, class_names=CLASSES, templates=["a photo of a {c}."],
                          cache_dir=tmp_path).fit()
    np.testing.assert_array_equal(default.weights_, zeroshot.weights_)
