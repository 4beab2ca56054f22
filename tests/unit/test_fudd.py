"""FuDD (paper 10): re-scoring inside the ambiguous set, one LLM query per class pair/set, failures fall back."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from cliplab.features.text import embed_texts
from cliplab.heads import create_head
from cliplab.heads.fudd import PAIR_SYSTEM, pair_prompt, parse_pair_answer
from cliplab.llm import LLM, RetryableError

NAMES = ["cat", "dog", "ship", "truck", "bird", "frog"]
PAIR = re.compile(r"distinguish a photo of a (.+?) from a photo of a (.+?)\?")


def _answer(a: str, b: str) -> dict:
    return {"differences": [
        {"attribute": "shape", "first": f"a photo of a {a}, with a {a}-like shape.",
         "second": f"a photo of a {b}, with a {b}-like shape."},
        {"attribute": "colour", "first": f"a photo of a {a}, coloured like a {a}.",
         "second": f"a photo of a {b}, coloured like a {b}."},
    ]}


class Scripted(LLM):
    """Answers every pair question with two made-up differences; pairs naming a class in ``fail`` fail."""

    def __init__(self, cache=False, fail=(), wrong=(), attempts=1):
        super().__init__("scripted", attempts=attempts, backoff=0.0, cache=cache)
        self.fail = set(fail)
        self.wrong = set(wrong)  # classes whose pairs get valid JSON of the wrong shape
        self.prompts: list[str] = []

    def _request(self, prompt, system, json_mode):
        self.prompts.append(prompt)
        a, b = PAIR.search(prompt).groups()
        if {a, b} & self.fail:
            raise RetryableError("server error 503")
        if {a, b} & self.wrong:
            return json.dumps({"differences": f"{a} and {b} look different"})
        return json.dumps(_answer(a, b))


def _features(tiny, n=40, seed=0):
    X = np.random.default_rng(seed).normal(size=(n, tiny.embed_dim)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def _head(tiny, tmp_path, llm, top_k=3, names=NAMES):
    return create_head("fudd", backbone=tiny, class_names=names, llm=llm, top_k=top_k,
                       cache_dir=tmp_path / "cache").fit()


def test_predictions_stay_in_the_zero_shot_top_k(tiny, tmp_path):
    head = _head(tiny, tmp_path, Scripted())
    X = _features(tiny)
    zeroshot = head.zeroshot_logits(X)
    sets = head.ambiguous_sets(zeroshot)
    pred = head.predict(X)
    assert all(p in s for p, s in zip(pred, sets))
    logits = head.logits(X)
    for row, s in enumerate(sets):  # every class of the set scores above every class outside it
        outside = np.setdiff1d(np.arange(len(NAMES)), s)
        assert logits[row, s].min() > logits[row, outside].max()
    assert not head.failures_ and head.descriptions_
    # FuDD changed something (else the test would prove nothing)
    assert not np.allclose(logits, zeroshot)


def test_no_llm_and_k1_equal_zero_shot(tiny, tmp_path):
    X = _features(tiny)
    zs = create_head("zeroshot", backbone=tiny, class_names=NAMES, templates=["a photo of a {c}."],
                     cache_dir=tmp_path / "cache").fit()
    plain = _head(tiny, tmp_path, None)
    np.testing.assert_allclose(plain.logits(X), zs.logits(X), rtol=1e-6)
    llm = Scripted()
    k1 = _head(tiny, tmp_path, llm, top_k=1)
    np.testing.assert_allclose(k1.logits(X), zs.logits(X), rtol=1e-6)
    assert llm.requests == 0 and k1.llm_calls_ == 0


def test_each_class_pair_is_asked_once_and_the_disk_cache_serves_a_second_run(tiny, tmp_path):
    llm = Scripted(cache=tmp_path / "llm")
    head = _head(tiny, tmp_path, llm)
    X = _features(tiny, n=60)
    first = head.logits(X)
    sets = {tuple(sorted(s)) for s in head.ambiguous_sets(head.zeroshot_logits(X)).tolist()}
    pairs = {(a, b) for s in sets for i, a in enumerate(s) for b in s[i + 1:]}
    assert len(sets) > 1 and len(sets) < len(X)  # images share sets
    assert llm.requests == len(pairs) == head.llm_calls_ == len(set(llm.prompts))
    head.logits(X)  # the same images again: nothing new asked
    assert llm.requests == len(pairs)
    again = _head(tiny, tmp_path, llm)  # a new fit: every answer comes from the LLM's disk cache
    np.testing.assert_allclose(again.logits(X), first, rtol=1e-6)
    assert llm.requests == len(pairs) and again.llm_calls_ == 0 and again.llm_cache_hits_ == len(pairs)


def test_a_failing_set_keeps_zero_shot_and_is_reported(tiny, tmp_path):
    head = _head(tiny, tmp_path, Scripted(fail={"dog"}))
    X = _features(tiny, n=60)
    zeroshot = head.zeroshot_logits(X)
    sets = head.ambiguous_sets(zeroshot)
    with pytest.warns(RuntimeWarning, match="keep their zero-shot logits"):
        logits = head.logits(X)
    has_dog = np.array([1 in s for s in sets])
    assert has_dog.any() and (~has_dog).any()
    np.testing.assert_array_equal(logits[has_dog], zeroshot[has_dog])
    assert not np.allclose(logits[~has_dog], zeroshot[~has_dog])
    failed = {head.set_key(s) for s in sets[has_dog].tolist()}
    assert set(head.failures_) == failed
    assert all("503" in reason and "dog" in reason for reason in head.failures_.values())


def test_hand_computed_rescoring_on_three_classes(tiny, tmp_path):
    names = ["cat", "dog", "ship"]
    replay = {pair_prompt(a, b): _answer(a, b) for a, b in [("cat", "dog"), ("cat", "ship"), ("dog", "ship")]}
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(replay))
    head = _head(tiny, tmp_path, f"replay:{path}", top_k=2, names=names)
    X = _features(tiny, n=12, seed=3)
    W = embed_texts(tiny, [f"a photo of a {c}." for c in names], tmp_path / "cache").T
    scale = head.logit_scale_
    zeroshot = scale * X @ W
    logits = head.logits(X)
    for row in range(len(X)):
        a, b = sorted(np.argsort(-zeroshot[row], kind="stable")[:2])
        first, second = parse_pair_answer(_answer(names[a], names[b]))
        expected = np.empty(3)
        for c, sentences in ((a, first), (b, second)):
            e = embed_texts(tiny, sentences, tmp_path / "cache").astype(np.float64)
            d = e.mean(axis=0)
            expected[c] = scale * X[row] @ (d / np.linalg.norm(d))
        (out,) = set(range(3)) - {a, b}
        shift = max(0.0, zeroshot[row, out] - min(expected[a], expected[b]) + 1.0)
        expected[out] = zeroshot[row, out] - shift
        np.testing.assert_allclose(logits[row], expected, rtol=1e-5, atol=1e-5)
    assert head.descriptions_[head.set_key([a, b])][names[a]] == first


def test_malformed_answer_is_a_failure_not_a_crash(tiny, tmp_path):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps({pair_prompt("cat", "dog"): {"differences": [{"first": "", "second": "x"}]}}))
    head = _head(tiny, tmp_path, f"replay:{path}", top_k=2, names=["cat", "dog"])
    X = _features(tiny, n=4)
    with pytest.warns(RuntimeWarning):
        np.testing.assert_array_equal(head.logits(X), head.zeroshot_logits(X))
    assert "no difference" in head.failures_["cat | dog"]
    assert PAIR_SYSTEM and head.fit_summary()["class_sets_failed"] == 1


def test_http_llm_spec_asks_the_server_once_per_pair(tiny, tmp_path, monkeypatch):
    from _llm_stub import Stub

    def script(body, n):
        a, b = PAIR.search(body["messages"][-1]["content"]).groups()
        return 200, json.dumps(_answer(a, b)), 0

    monkeypatch.setenv("CLIPLAB_LLM_MODEL", "stub-model")
    names = ["cat", "dog", "ship", "truck"]
    X = _features(tiny, n=20)
    with Stub(script) as stub:
        head = _head(tiny, tmp_path, stub.url, top_k=3, names=names)
        first = head.logits(X)
        asked = stub.count
        assert 0 < asked <= 6 and head.llm_calls_ == asked and not head.failures_
        again = _head(tiny, tmp_path, stub.url, top_k=3, names=names)  # answers from the LLM's disk cache
        np.testing.assert_allclose(again.logits(X), first, rtol=1e-6)
        assert stub.count == asked and again.llm_calls_ == 0
    assert stub.bodies[0]["response_format"] == {"type": "json_object"}


def test_wrong_shape_pair_answer_is_retried_then_cached_good(tiny, tmp_path):
    llm = Scripted(cache=tmp_path / "llm", attempts=3)
    answers = iter(['{"differences": []}', json.dumps(_answer("cat", "dog"))])
    llm._request = lambda prompt, system, json_mode: llm.prompts.append(prompt) or next(answers)
    head = _head(tiny, tmp_path, llm, top_k=2, names=["cat", "dog"])
    X = _features(tiny, n=4)
    assert not np.allclose(head.logits(X), head.zeroshot_logits(X))
    assert not head.failures_ and head.llm_calls_ == 2 == llm.requests
    (rejected,) = (tmp_path / "llm").glob("*.rejected.json")
    assert json.loads(rejected.read_text())[0]["answer"] == '{"differences": []}'
    again = _head(tiny, tmp_path, Scripted(cache=tmp_path / "llm", fail={"cat"}), top_k=2, names=["cat", "dog"])
    again.logits(X)
    assert again.llm_calls_ == 0 and again.llm_cache_hits_ == 1 and not again.failures_


def test_always_wrong_shape_fails_the_set_and_a_cached_wrong_answer_is_asked_again(tiny, tmp_path):
    names = ["cat", "dog"]
    X = _features(tiny, n=4)
    wrong = Scripted(cache=tmp_path / "llm", wrong={"cat"}, attempts=2)
    head = _head(tiny, tmp_path, wrong, top_k=2, names=names)
    with pytest.warns(RuntimeWarning):
        np.testing.assert_array_equal(head.logits(X), head.zeroshot_logits(X))
    assert "unusable answer" in head.failures_["cat | dog"] and wrong.requests == 2
    assert not [p for p in (tmp_path / "llm").glob("*.json") if not p.name.endswith(".rejected.json")]
    # A wrong-shape answer cached before answers were checked (the same backend, model and prompt) is a miss.
    wrong.complete(pair_prompt("cat", "dog"), system=PAIR_SYSTEM, json_schema={"type": "object"})
    good = Scripted(cache=tmp_path / "llm")
    rerun = _head(tiny, tmp_path, good, top_k=2, names=names)
    assert not np.allclose(rerun.logits(X), rerun.zeroshot_logits(X))
    assert good.requests == 1 and rerun.llm_cache_hits_ == 0 and not rerun.failures_


def test_down_endpoint_gives_up_after_n_failed_pairs(tiny, tmp_path):
    from _llm_stub import Stub
    from cliplab.llm import OpenAICompatible

    with Stub(lambda body, n: (200, "{}", 0)) as stub:
        url = stub.url  # closed: nothing listens there any more
    X = _features(tiny, n=60)
    llm = OpenAICompatible(url, "m", attempts=2, backoff=0.0, cache=tmp_path / "llm")
    head = _head(tiny, tmp_path, llm)
    zeroshot = head.zeroshot_logits(X)
    with pytest.warns(RuntimeWarning, match="keep their zero-shot logits"):
        np.testing.assert_array_equal(head.logits(X), zeroshot)
    assert llm.requests == 3 * 2 == head.llm_calls_  # three pairs tried, attempts=2 each
    sets = {head.set_key(s) for s in head.ambiguous_sets(zeroshot).tolist()}
    assert set(head.failures_) == sets and len(sets) > 2
    not_asked = [r for r in head.failures_.values() if r.startswith("not asked: the endpoint failed 3 times in a row")]
    assert not_asked and "cannot reach" in not_asked[0]
    assert head.fit_summary()["class_sets_not_asked"] == len(not_asked)
    with pytest.warns(RuntimeWarning):
        head.logits(X)
    assert llm.requests == 6  # still given up
    never = OpenAICompatible(url, "m", attempts=1, backoff=0.0, cache=False)
    patient = create_head("fudd", backbone=tiny, class_names=NAMES, llm=never, top_k=3, give_up_after=None,
                          cache_dir=tmp_path / "cache").fit()
    with pytest.warns(RuntimeWarning):
        patient.logits(X)
    pairs = {(a, b) for s in patient.ambiguous_sets(zeroshot).tolist() for a in s for b in s if a < b}
    assert never.requests == len(pairs) > 3
    assert not any(r.startswith("not asked") for r in patient.failures_.values())
