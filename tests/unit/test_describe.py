"""Description sets written by an LLM (cliplab.data.describe): replay file, local HTTP stub, cache, heads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _llm_stub import Stub
from cliplab.data.describe import CUPL_QUESTIONS, build_prompts, clean_answer, generate_descriptions
from cliplab.data.descriptions import load_descriptions, save_descriptions
from cliplab.errors import DescriptionError
from cliplab.llm import OpenAICompatible, Replay

REPLAY = Path(__file__).parents[1] / "data" / "describe_replay_cifar10.json"
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _client(stub, tmp_path, attempts=2):
    return OpenAICompatible(stub.url, "stub-model", timeout=5.0, attempts=attempts, backoff=0.0,
                            cache=tmp_path / "llm")


def _prompt(body) -> str:
    return body["messages"][-1]["content"]


def _features_for(prompt: str) -> str:
    """A well-formed DCLIP answer naming the class found in the prompt ('... identify a "cat" in a photo?')."""
    name = prompt.split('"')[1]
    return json.dumps({"features": [f"- {name} ears", f"has a {name} tail.", f"{name} ears"]})


# ---- prompts and cleaning -------------------------------------------------------------------------------

def test_prompts_name_the_class_with_its_article_domain_and_count():
    dclip = build_prompts(["cat", "airplane"], "dclip", n_per_prompt=4, domain="a photo of a pet")
    assert list(dclip) == ["cat", "airplane"] and all(len(v) == 1 for v in dclip.values())
    assert 'a "cat" (a photo of a pet)' in dclip["cat"][0] and 'an "airplane"' in dclip["airplane"][0]
    assert "up to 4" in dclip["cat"][0] and '"features"' in dclip["cat"][0] and "JSON" in dclip["cat"][0]
    cupl = build_prompts(["owl"], "cupl")
    assert len(cupl["owl"]) == len(CUPL_QUESTIONS) == 5 and len(set(cupl["owl"])) == 5
    assert all("an owl" in p and '"sentences"' in p and "5 different" in p for p in cupl["owl"])
    assert "(" not in build_prompts(["owl"], "cupl", domain="  ")["owl"][0]


def test_bad_style_count_and_labels_are_one_line_errors():
    with pytest.raises(DescriptionError, match="unknown description style 'waffle'"):
        build_prompts(["cat"], "waffle")
    with pytest.raises(DescriptionError, match="at least 1"):
        build_prompts(["cat"], "dclip", n_per_prompt=0)
    with pytest.raises(Exception, match="duplicate|same"):
        build_prompts(["cat", "Cat"])


def test_cleaning_strips_bullets_numbers_quotes_and_drops_duplicates_and_empties():
    answer = {"features": ["- has four legs.", "2) pointed ears", '"whiskers"', "  ", "Has four legs", 7,
                           "\u2022 a   long tail", "1. \u201csoft fur\u201d"]}
    assert clean_answer(answer, "cat", "dclip") == ["has four legs", "pointed ears", "whiskers", "a long tail",
                                                    "soft fur"]
    assert clean_answer(answer, "cat", "dclip", n_per_prompt=2) == ["has four legs", "pointed ears"]
    # a DCLIP phrase may start with "a"/an article: it is not taken for a list letter
    assert clean_answer({"features": ["a long tail"]}, "cat", "dclip") == ["a long tail"]


def test_cupl_sentences_must_name_their_class():
    answer = {"sentences": ["A cat has whiskers", "Cats sleep a lot.", "It has four legs!", "it has four legs!"]}
    assert clean_answer(answer, "cat", "cupl") == ["A cat has whiskers.", "Cats sleep a lot.",
                                                   "cat: It has four legs!"]
    assert clean_answer(answer, "cat", "cupl", mention="drop") == ["A cat has whiskers.", "Cats sleep a lot."]
    assert clean_answer(answer, "cat", "cupl", mention="keep")[-1] == "It has four legs!"
    assert clean_answer({"sentences": ["An aquarium fish swims."]}, "aquarium_fish", "cupl") == \
        ["An aquarium fish swims."]  # loose match: underscores and case


def test_answer_shapes():
    assert clean_answer({"whatever": ["x"]}, "cat", "dclip") == ["x"]  # the object's only list
    assert clean_answer(["x", "y"], "cat", "dclip") == ["x", "y"]
    with pytest.raises(ValueError, match="without a 'features' list"):
        clean_answer({"a": ["x"], "b": ["y"]}, "cat", "dclip")
    with pytest.raises(ValueError, match="not a list"):
        clean_answer(3, "cat", "dclip")


# ---- replay: the CIFAR-10 file shipped in tests/data ----------------------------------------------------

def test_replay_dclip_gives_the_hand_written_answers_cleaned():
    descriptions, failures = generate_descriptions(f"replay:{REPLAY}", CIFAR10, "dclip", progress=False)
    assert failures == {} and list(descriptions) == CIFAR10
    assert descriptions["cat"] == ["has four legs", "pointed ears", "whiskers", "a long tail", "soft fur"]
    assert descriptions["airplane"] == ["has two long wings", "a tail fin", "jet engines under the wings",
                                        "a row of small windows", "white or grey metal body"]
    assert descriptions["automobile"] == ["has four wheels", "windscreen and side windows",
                                          "headlights at the front", "a shiny painted body"]  # duplicate dropped
    assert descriptions["dog"][-1] == "a wagging tail"  # the blank item dropped
    again, _ = generate_descriptions(Replay(REPLAY), CIFAR10, "dclip", progress=False)
    assert again == descriptions


def test_replay_cupl_gives_every_question_answered_in_sentences():
    descriptions, failures = generate_descriptions(f"replay:{REPLAY}", CIFAR10, "cupl", progress=False)
    assert failures == {} and list(descriptions) == CIFAR10
    assert descriptions["automobile"] == [
        "An automobile has four wheels and a painted metal body.",
        "You can identify an automobile by its wheels, doors and headlights.",
        "A photo of an automobile shows a car parked on a street.",
        "automobile: A car parked on a street.",
        "An automobile driving along a road.",
        "A red automobile parked by the kerb.",
    ]
    assert descriptions["airplane"][-1] == "A white airplane in the sky."  # quotes stripped
    assert descriptions["dog"][-1] == "A happy dog with its tongue out."  # bullet stripped
    assert descriptions["bird"][-1] == "A small brown bird on a fence."  # numbering stripped
    for name, sentences in descriptions.items():
        assert all(name in s.casefold() for s in sentences), name


def test_replay_miss_is_a_failure_for_that_class_only():
    descriptions, failures = generate_descriptions(f"replay:{REPLAY}", ["cat", "platypus", "dog"], "dclip",
                                                   progress=False)
    assert list(descriptions) == ["cat", "dog"] and list(failures) == ["platypus"]
    assert "no answer for prompt" in failures["platypus"]


# ---- HTTP: the local chat-completions stub ----------------------------------------------------------------

def test_malformed_json_for_one_class_is_retried_then_reported_and_a_rerun_asks_only_it(tmp_path):
    broken = {"on": True}

    def script(body, n):
        prompt = _prompt(body)
        if '"dog"' in prompt and broken["on"]:
            return 200, "Sure! Dogs have {fur, tails", 0
        return 200, _features_for(prompt), 0

    with Stub(script) as stub:
        llm = _client(stub, tmp_path, attempts=3)
        descriptions, failures = generate_descriptions(llm, ["cat", "dog", "owl"], "dclip", progress=False)
        assert stub.count == 1 + 3 + 1  # dog tried three times
        assert list(descriptions) == ["cat", "owl"] and list(failures) == ["dog"]
        assert "malformed JSON" in failures["dog"] and "after 3 attempt" in failures["dog"]
        assert descriptions["cat"] == ["cat ears", "has a cat tail"]
        out = save_descriptions(descriptions, tmp_path / "partial.json")
        assert load_descriptions(out) == descriptions

        broken["on"] = False
        again, failures = generate_descriptions(_client(stub, tmp_path), ["cat", "dog", "owl"], "dclip",
                                                progress=False)
        assert failures == {} and list(again) == ["cat", "dog", "owl"]
        assert stub.count == 5 + 1  # only the dog was asked again
        assert again["cat"] == descriptions["cat"]
        assert generate_descriptions(_client(stub, tmp_path), ["cat", "dog", "owl"], "dclip",
                                     progress=False)[0] == again
        assert stub.count == 6  # everything from the cache


def test_one_failed_cupl_question_fails_the_class(tmp_path):
    def script(body, n):
        prompt = _prompt(body)
        if prompt.startswith("How can you identify a cat"):
            return 500, "boom", 0
        name = "cat" if "a cat" in prompt else "dog"
        return 200, json.dumps({"sentences": [f"A {name} from question {prompt[:12]}."]}), 0

    with Stub(script) as stub:
        descriptions, failures = generate_descriptions(_client(stub, tmp_path), ["cat", "dog"], "cupl",
                                                       progress=False)
    assert list(descriptions) == ["dog"] and len(descriptions["dog"]) == 5
    assert failures["cat"].startswith("1 of 5 prompts failed: ") and "HTTP 500" in failures["cat"]


def test_endpoint_down_stops_after_a_few_classes(tmp_path):
    with Stub(lambda body, n: (200, "{}", 0)) as stub:
        url = stub.url  # closed: nothing listens there any more
    llm = OpenAICompatible(url, "m", attempts=2, backoff=0.0, cache=tmp_path / "llm")
    names = [f"class {i}" for i in range(10)]
    descriptions, failures = generate_descriptions(llm, names, "dclip", progress=False)
    assert descriptions == {} and list(failures) == names
    assert llm.requests == 3 * 2  # three classes tried, the rest not asked
    assert "cannot reach" in failures["class 0"]
    assert failures["class 9"].startswith("not asked: the first 3 classes all failed")


def _good_cache_entries(tmp_path):
    return [p for p in (tmp_path / "llm").glob("*.json") if not p.name.endswith(".rejected.json")]


def test_wrong_shape_answer_is_retried_and_the_good_one_cached(tmp_path):
    def script(body, n):
        prompt = _prompt(body)
        if '"dog"' in prompt and n == 2:
            return 200, json.dumps({"colour": "brown", "size": 3}), 0  # valid JSON, no list: unusable
        return 200, _features_for(prompt), 0

    with Stub(script) as stub:
        descriptions, failures = generate_descriptions(_client(stub, tmp_path, attempts=3), ["cat", "dog"], "dclip",
                                                       progress=False)
        assert failures == {} and descriptions["dog"] == ["dog ears", "has a dog tail"]
        assert stub.count == 3
        assert generate_descriptions(_client(stub, tmp_path), ["cat", "dog"], "dclip", progress=False)[0] == \
            descriptions
        assert stub.count == 3  # both from the cache
    (rejected,) = (tmp_path / "llm").glob("*.rejected.json")
    assert '"colour"' in json.loads(rejected.read_text())[0]["answer"]


def test_always_wrong_shape_is_reported_for_its_class_and_never_cached(tmp_path):
    def script(body, n):
        prompt = _prompt(body)
        if '"dog"' in prompt:
            return 200, json.dumps({"features": ["", "  ", 7]}), 0  # a list, but nothing usable in it
        return 200, _features_for(prompt), 0

    with Stub(script) as stub:
        descriptions, failures = generate_descriptions(_client(stub, tmp_path, attempts=2), ["cat", "dog", "owl"],
                                                       "dclip", progress=False)
        assert list(descriptions) == ["cat", "owl"] and list(failures) == ["dog"]
        assert "unusable answer: the answer held no usable descriptions" in failures["dog"]
        assert "after 2 attempt" in failures["dog"] and stub.count == 1 + 2 + 1
        assert len(_good_cache_entries(tmp_path)) == 2  # cat and owl only
        generate_descriptions(_client(stub, tmp_path, attempts=2), ["cat", "dog", "owl"], "dclip", progress=False)
        assert stub.count == 4 + 2  # the dog is asked again, the others come from the cache


def test_a_cached_wrong_shape_answer_is_asked_again(tmp_path):
    prompt = build_prompts(["dog"])["dog"][0]
    state = {"good": False}

    def script(body, n):
        return 200, _features_for(_prompt(body)) if state["good"] else '{"answer": "dogs are dogs"}', 0

    with Stub(script) as stub:
        # cached as an earlier version did, with no check of its shape (same backend, model, prompt, schema)
        _client(stub, tmp_path).complete(prompt, json_schema={"type": "object"})
        assert len(_good_cache_entries(tmp_path)) == 1
        state["good"] = True
        llm = _client(stub, tmp_path)
        descriptions, failures = generate_descriptions(llm, ["dog"], "dclip", progress=False)
        assert failures == {} and descriptions == {"dog": ["dog ears", "has a dog tail"]}
        assert stub.count == 2 and llm.requests == 1 and llm.cache_hits == 0
    (rejected,) = (tmp_path / "llm").glob("*.rejected.json")
    assert json.loads(rejected.read_text())[0]["answer"] == '{"answer": "dogs are dogs"}'
    (entry,) = _good_cache_entries(tmp_path)
    assert "dog ears" in json.loads(entry.read_text())["answer"]


def test_record_makes_a_replay_file_that_repeats_the_run_offline(tmp_path):
    with Stub(lambda body, n: (200, _features_for(_prompt(body)), 0)) as stub:
        record = tmp_path / "answers.json"
        live, _ = generate_descriptions(_client(stub, tmp_path), ["cat", "dog"], "dclip", record=record,
                                        progress=False)
        assert stub.count == 2
    assert set(json.loads(record.read_text())) == {p for (p,) in build_prompts(["cat", "dog"]).values()}
    replayed, failures = generate_descriptions(f"replay:{record}", ["cat", "dog"], "dclip", progress=False)
    assert replayed == live and failures == {}
    generate_descriptions(f"replay:{REPLAY}", ["owl"], "dclip", record=record, progress=False)  # a miss: kept
    assert len(json.loads(record.read_text())) == 2


# ---- the generated files run through the heads ------------------------------------------------------------

@pytest.mark.parametrize("style, head", [("dclip", "dclip"), ("cupl", "cupl")])
def test_generated_file_runs_through_its_head(tmp_path, tiny, style, head):
    from cliplab.heads import create_head

    descriptions, _ = generate_descriptions(f"replay:{REPLAY}", CIFAR10, style, progress=False)
    path = save_descriptions(descriptions, tmp_path / f"{style}.json")
    assert load_descriptions(path, CIFAR10) == descriptions
    model = create_head(head, backbone=tiny, class_names=CIFAR10, descriptions=path, cache_dir=tmp_path / "f")
    model.fit()
    X = np.random.default_rng(0).standard_normal((4, model.weights_.shape[0])).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    assert model.logits(X).shape == (4, 10)
    if head == "dclip":
        assert "cat, which has four legs" in model.sentences_[3]
