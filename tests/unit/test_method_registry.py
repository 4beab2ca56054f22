"""What a method needs is declared at its registration, checked against a vocabulary, and tells the truth.

This file is the one place that reads the heads' signatures and attributes: to check that each declaration
(``needs``, ``default_templates``, ``gives``) agrees with the head it describes. Everything else reads the
declarations.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from cliplab.errors import CliplabError
from cliplab.heads import list_heads
from cliplab.heads.registry import DATASET_TEMPLATES, GIVES, NEEDS, _scan_registrations, method_names, register

ENTRIES = list_heads()
# a declared need and the parameter of fit (or __init__) through which the head takes it
FIT_PARAMETER = {"val": "X_val", "views": "views", "caption_features": "caption_features", "images": "images"}
INIT_PARAMETER = {"descriptions": "descriptions", "llm": "llm", "aux_features": "aux_model"}


@pytest.mark.parametrize("kwargs, word", [
    ({"family": "nosuch"}, "family 'nosuch'"),
    ({"family": "fewshot", "needs": ("val", "nosuch")}, "needs 'nosuch'"),
    ({"family": "fewshot", "needs": "val"}, "tuple of names"),
    ({"family": "zeroshot", "gives": ("weights",)}, "gives 'weights'"),
    ({"family": "zeroshot", "default_templates": ["a {c}"]}, "default_templates"),
])
def test_register_refuses_words_outside_the_vocabularies(kwargs, word):
    with pytest.raises(CliplabError, match=word):
        register("no-such-head", **kwargs)


def test_the_encoder_family_and_every_need_are_in_the_vocabulary():
    register("no-such-head", family="encoder", needs=NEEDS, gives=GIVES)  # builds the decorator: no error


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_declared_needs_are_what_fit_and_init_take(entry):
    fit = inspect.signature(entry.cls.fit).parameters
    init = inspect.signature(entry.cls.__init__).parameters
    for need, parameter in FIT_PARAMETER.items():
        assert (need in entry.needs) == (parameter in fit), (entry.name, need)
    for need, parameter in INIT_PARAMETER.items():
        assert (need in entry.needs) == (parameter in init), (entry.name, need)
    assert entry.needs_train == ("y" in fit and fit["y"].default is inspect.Parameter.empty), entry.name


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_declared_template_default_is_the_heads_own(entry):
    init = inspect.signature(entry.cls.__init__).parameters
    assert entry.takes_templates == ("templates" in init), entry.name
    if entry.default_templates not in (None, DATASET_TEMPLATES):  # the head's own default, written twice
        own = init["templates"].default
        assert own == (None if entry.default_templates == () else entry.default_templates), entry.name


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_declared_gives_sentences_is_what_the_head_has(entry):
    assert ("sentences" in entry.gives) == callable(getattr(entry.cls, "sentences", None)), entry.name


@pytest.mark.parametrize("name, params", [
    ("zeroshot", {"templates": ["a {c}", "the {c}"]}), ("dclip", {}), ("cupl", {}), ("waffle", {"waffle_count": 2}),
    ("ncm", {}), ("real", {}), ("real-linear", {}),
])
def test_declared_class_weights_are_a_d_by_c_matrix(tiny, name, params):
    from cliplab.heads import create_head, head_entry

    assert "class_weights" in head_entry(name).gives
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, tiny.embed_dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = np.repeat(np.arange(3), 4)
    head = create_head(name, backbone=tiny, class_names=["cat", "dog", "car"], **params)
    head.fit(X, y) if head_entry(name).needs_train else head.fit()
    assert head.weights_.shape == (tiny.embed_dim, 3)
    assert set(method_names(gives="class_weights")) >= {"zeroshot", "ncm"}
    assert not {"perceptionclip", "gda"} & set(method_names(gives="class_weights"))  # (d, C x Z) and (C, d)


def test_declared_fit_problem_keys_are_fit_summary_keys(tiny):
    from cliplab.heads import create_head

    fitted = {"real": create_head("real", backbone=tiny, class_names=["cat", "dog"]).fit(),
              "real-linear": create_head("real-linear", backbone=tiny, class_names=["cat", "dog"]).fit()}
    for name, head in fitted.items():
        from cliplab.heads import head_entry

        assert head_entry(name).fit_problems and set(head_entry(name).fit_problems) <= set(head.fit_summary())


def test_method_names_read_from_the_source_equal_the_registry():
    scanned = _scan_registrations()
    assert scanned is not None
    assert sorted((n, f, nd, g, t) for n, f, nd, g, t in scanned) == sorted(
        (e.name, e.family, e.needs, e.gives, e.needs_train) for e in ENTRIES)
    assert method_names() == sorted(e.name for e in ENTRIES)
    assert method_names("zeroshot", trained=False) == sorted(
        e.name for e in ENTRIES if e.family == "zeroshot" and not e.needs_train)
    assert method_names(need="llm") == sorted(e.name for e in ENTRIES if "llm" in e.needs)
