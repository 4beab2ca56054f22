"""cliplab.llm against a local stub speaking OpenAI chat completions, a replay file and a fake transformers pipeline."""

from __future__ import annotations

import json
import time

import pytest

from _llm_stub import Stub
from cliplab.errors import CliplabError, LLMError
from cliplab.llm import (
    LLM,
    OpenAICompatible,
    Replay,
    Transformers,
    ask_each,
    backends,
    load_llm,
    parse_json,
    prompt_key,
)


def _client(stub, tmp_path, **kwargs):
    kwargs.setdefault("attempts", 3)
    kwargs.setdefault("backoff", 0.0)
    return OpenAICompatible(stub.url, "stub-model", api_key="sk-test", timeout=kwargs.pop("timeout", 5.0),
                            cache=tmp_path / "llm", **kwargs)


def test_normal_answer_text_and_protocol(tmp_path):
    with Stub(lambda body, n: (200, "a cat has whiskers", 0)) as stub:
        llm = _client(stub, tmp_path)
        assert llm.complete("describe a cat", system="be brief") == "a cat has whiskers"
    body = stub.bodies[0]
    assert body["model"] == "stub-model"
    assert body["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "describe a cat"}]
    assert "response_format" not in body
    assert stub.headers[0]["Authorization"] == "Bearer sk-test"


def test_json_answer_is_parsed_and_asks_for_json_object(tmp_path):
    with Stub(lambda body, n: (200, '{"cat": ["whiskers", "fur"]}', 0)) as stub:
        assert _client(stub, tmp_path).complete("x", json_schema=True) == {"cat": ["whiskers", "fur"]}
    assert stub.bodies[0]["response_format"] == {"type": "json_object"}


def test_malformed_json_then_good_answer_is_retried(tmp_path):
    answers = {1: "Sure! here it is: {not json", 2: '{"ok": 1}'}
    with Stub(lambda body, n: (200, answers[n], 0)) as stub:
        assert _client(stub, tmp_path).complete("x", json_schema=True) == {"ok": 1}
        assert stub.count == 2


def test_empty_answer_is_retried(tmp_path):
    with Stub(lambda body, n: (200, "" if n == 1 else "fine", 0)) as stub:
        assert _client(stub, tmp_path).complete("x") == "fine"
        assert stub.count == 2


def test_server_that_always_fails_raises_after_n_attempts(tmp_path):
    with Stub(lambda body, n: (500, "boom", 0)) as stub:
        llm = _client(stub, tmp_path, attempts=4)
        with pytest.raises(LLMError, match=r"openai-compatible.*HTTP 500.*after 4 attempt") as info:
            llm.complete("x")
        assert stub.count == 4 and llm.requests == 4
    assert isinstance(info.value, CliplabError)
    assert not list(tmp_path.rglob("*.json"))  # nothing cached for a failure


def test_unauthorized_is_not_retried(tmp_path):
    with Stub(lambda body, n: (401, "bad key", 0)) as stub:
        with pytest.raises(LLMError, match="HTTP 401"):
            _client(stub, tmp_path, attempts=3).complete("x")
        assert stub.count == 1


def test_backoff_is_exponential(tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr("cliplab.llm.base.time.sleep", sleeps.append)
    with Stub(lambda body, n: (503, "busy", 0)) as stub, pytest.raises(LLMError):
        _client(stub, tmp_path, attempts=4, backoff=0.25).complete("x")
    assert sleeps == [0.25, 0.5, 1.0]


def test_slow_server_times_out(tmp_path):
    with Stub(lambda body, n: (200, "late", 1.0)) as stub:
        start = time.perf_counter()
        with pytest.raises(LLMError, match="timed out after 0.2 s after 2 attempt"):
            _client(stub, tmp_path, attempts=2, timeout=0.2).complete("x")
        assert time.perf_counter() - start < 1.5
        assert stub.count == 2


def test_connection_refused_is_an_llm_error(tmp_path):
    with Stub(lambda body, n: (200, "x", 0)) as stub:
        url = stub.url
    llm = OpenAICompatible(url, "m", attempts=2, backoff=0.0, cache=False)
    with pytest.raises(LLMError, match=r"cannot reach .*after 2 attempt"):
        llm.complete("x")


def test_cache_prevents_a_second_request(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path / "root"))
    with Stub(lambda body, n: (200, f'{{"n": {n}}}', 0)) as stub:
        llm = OpenAICompatible(stub.url, "stub-model", backoff=0.0)
        assert llm.cache_dir == tmp_path / "root" / "llm"
        first = llm.complete("describe a dog", json_schema=True)
        again = OpenAICompatible(stub.url, "stub-model", backoff=0.0).complete("describe a dog", json_schema=True)
        assert first == again == {"n": 1}
        assert stub.count == 1
        # Anything in the key changes the answer: prompt, system, JSON flag, model.
        llm.complete("describe a dog", json_schema=True, system="s")
        llm.complete("describe a dog")
        OpenAICompatible(stub.url, "other-model", backoff=0.0).complete("describe a dog", json_schema=True)
        assert stub.count == 4
    entries = list((tmp_path / "root" / "llm").glob("*.json"))
    assert len(entries) == 4 and not list((tmp_path / "root" / "llm").glob(".*"))
    record = json.loads(entries[0].read_text())
    assert {"backend", "model", "prompt", "answer"} <= set(record)


def test_corrupt_cache_entry_is_a_miss(tmp_path):
    with Stub(lambda body, n: (200, "answer", 0)) as stub:
        llm = _client(stub, tmp_path)
        llm.complete("x")
        (entry,) = (tmp_path / "llm").glob("*.json")
        entry.write_text("{truncated")
        assert llm.complete("x") == "answer" and stub.count == 2
        assert llm.complete("x") == "answer" and stub.count == 2


def test_schema_type_is_checked(tmp_path):
    with Stub(lambda body, n: (200, '["a"]' if n == 1 else '{"a": 1}', 0)) as stub:
        assert _client(stub, tmp_path).complete("x", json_schema={"type": "object"}) == {"a": 1}
        assert stub.count == 2


def test_env_configures_the_http_backend(monkeypatch):
    monkeypatch.setenv("CLIPLAB_LLM_BASE_URL", "http://host:1/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "k1")
    monkeypatch.setenv("CLIPLAB_LLM_MODEL", "envmodel")
    llm = OpenAICompatible(cache=False)
    assert (llm.base_url, llm.api_key, llm.model) == ("http://host:1/v1", "k1", "envmodel")
    monkeypatch.setenv("CLIPLAB_LLM_API_KEY", "k2")
    assert OpenAICompatible(cache=False).api_key == "k2"
    monkeypatch.delenv("CLIPLAB_LLM_MODEL")
    with pytest.raises(LLMError, match="CLIPLAB_LLM_MODEL"):
        OpenAICompatible(cache=False)


def test_replay_hits_and_misses(tmp_path):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps({
        "describe a cat": ["whiskers", "fur"],
        prompt_key("describe a dog", "sys", True): '{"dog": ["tail"]}',
        "plain": "some text",
    }))
    llm = load_llm(f"replay:{path}")
    assert isinstance(llm, Replay) and llm.cache_dir is None
    assert llm.complete("describe a cat", json_schema=True) == ["whiskers", "fur"]
    assert llm.complete("describe a dog", system="sys", json_schema=True) == {"dog": ["tail"]}
    assert llm.complete("plain") == "some text"
    with pytest.raises(LLMError, match=r"answers.json has no answer for prompt 'describe a whale'"):
        llm.complete("describe a whale")
    with pytest.raises(LLMError, match="no answer"):  # the key includes the system prompt
        llm.complete("describe a dog", system="other", json_schema=True)


def test_replay_bad_files(tmp_path):
    with pytest.raises(LLMError, match="does not exist"):
        Replay(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(LLMError, match="bad.json is not valid JSON"):
        Replay(tmp_path / "bad.json")


def test_ask_each_reports_failures_per_key_and_returns_the_rest(tmp_path):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps({"cat?": ["whiskers"], "dog?": "not json at all", "owl?": {"owl": ["beak"]}}))
    answers, failures = ask_each(Replay(path), {"cat": "cat?", "dog": "dog?", "fish": "fish?", "owl": "owl?"})
    assert answers == {"cat": ["whiskers"], "owl": {"owl": ["beak"]}}
    assert set(failures) == {"dog", "fish"}
    assert "malformed JSON" in failures["dog"] and "fish?" in failures["fish"]


def test_ask_each_over_http_keeps_going(tmp_path):
    def script(body, n):
        prompt = body["messages"][-1]["content"]
        return (500, "down", 0) if prompt == "bad" else (200, json.dumps({"p": prompt}), 0)

    with Stub(script) as stub:
        answers, failures = ask_each(_client(stub, tmp_path, attempts=2), {"a": "good", "b": "bad", "c": "fine"})
    assert answers == {"a": {"p": "good"}, "c": {"p": "fine"}}
    assert list(failures) == ["b"] and "HTTP 500" in failures["b"]


class FakePipe:
    def __init__(self, outputs):
        self.outputs = list(outputs)
        self.calls = []

    def __call__(self, messages, **kwargs):
        self.calls.append((messages, kwargs))
        return [{"generated_text": self.outputs.pop(0)}]


def test_transformers_backend_with_a_fake_pipeline(tmp_path, monkeypatch):
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": '```json\n{"a": [1]}\n```'}]
    pipe = FakePipe(["not json", chat])
    loaded = []
    monkeypatch.setattr(backends, "_make_pipeline", lambda model, device: loaded.append(model) or pipe)
    llm = load_llm("hf:some/model", cache=tmp_path, backoff=0.0)
    assert isinstance(llm, Transformers) and loaded == []  # lazy
    assert llm.complete("q", json_schema=True) == {"a": [1]}
    assert loaded == ["some/model"] and len(pipe.calls) == 2
    messages, kwargs = pipe.calls[0]
    assert messages[0]["role"] == "system" and "JSON" in messages[0]["content"]
    assert kwargs["do_sample"] is False
    assert llm.complete("q", json_schema=True) == {"a": [1]} and len(pipe.calls) == 2  # cached


def test_transformers_load_failure_is_one_line(monkeypatch, tmp_path):
    def fail(model, device):
        raise OSError("no such model")

    monkeypatch.setattr(backends, "_make_pipeline", fail)
    with pytest.raises(LLMError, match=r"transformers \(x/y\): cannot load the model: no such model"):
        Transformers("x/y", cache=False).complete("q")


def test_load_llm_specs(monkeypatch):
    monkeypatch.delenv("CLIPLAB_LLM_BASE_URL", raising=False)
    http = load_llm("http://localhost:8000/v1", model="m", cache=False)
    assert isinstance(http, OpenAICompatible) and http.base_url == "http://localhost:8000/v1"
    hosted = load_llm("openai:gpt-x", cache=False)
    assert hosted.model == "gpt-x" and hosted.base_url == backends.DEFAULT_BASE_URL
    assert load_llm(hosted) is hosted
    with pytest.raises(LLMError, match="unknown LLM spec 'bogus'"):
        load_llm("bogus")


def test_parse_json_is_lenient_but_not_blind():
    assert parse_json('{"a": 1}') == {"a": 1}
    assert parse_json('```json\n["x"]\n```') == ["x"]
    assert parse_json('Here you go: {"a": 2} hope it helps') == {"a": 2}
    with pytest.raises(ValueError, match="malformed JSON"):
        parse_json("I cannot help with that.")


def test_the_base_class_is_abstract():
    with pytest.raises(NotImplementedError):
        LLM("m", cache=False)._request("p", None, False)


# ---- answers of the wrong shape (valid JSON, unusable): validate= ----------------------------------------

def _needs_ok(answer):
    if not isinstance(answer, dict) or answer.get("ok") != 1:
        raise ValueError("no 'ok': 1 in the answer")


def _rejected(tmp_path):
    return [record for path in sorted((tmp_path / "llm").glob("*.rejected.json"))
            for record in json.loads(path.read_text())]


def test_wrong_shape_then_good_answer_is_retried_and_only_the_good_one_cached(tmp_path):
    answers = {1: '{"differences": "none"}', 2: '{"ok": 1}'}
    with Stub(lambda body, n: (200, answers[n], 0)) as stub:
        llm = _client(stub, tmp_path)
        assert llm.complete("x", json_schema=True, validate=_needs_ok) == {"ok": 1}
        assert stub.count == 2
        assert llm.complete("x", json_schema=True, validate=_needs_ok) == {"ok": 1}  # from the cache
        assert stub.count == 2 and llm.cache_hits == 1
    (good,) = [p for p in (tmp_path / "llm").glob("*.json") if not p.name.endswith(".rejected.json")]
    assert json.loads(good.read_text())["answer"] == '{"ok": 1}'
    (bad,) = _rejected(tmp_path)
    assert bad["answer"] == '{"differences": "none"}' and "no 'ok'" in bad["rejected"] and bad["prompt"] == "x"
    assert good.with_name(good.name.replace(".json", ".rejected.json")).is_file()  # beside its cache entry


def test_always_wrong_shape_is_reported_per_key_and_nothing_is_cached_as_good(tmp_path):
    def script(body, n):
        prompt = body["messages"][-1]["content"]
        return 200, '{"ok": 1}' if prompt == "good" else f'{{"ok": 2, "n": {n}}}', 0

    with Stub(script) as stub:
        llm = _client(stub, tmp_path, attempts=3)
        answers, failures = ask_each(llm, {"a": "good", "b": "bad"}, validate=_needs_ok)
        assert answers == {"a": {"ok": 1}} and list(failures) == ["b"]
        assert "unusable answer: no 'ok': 1" in failures["b"] and "after 3 attempt" in failures["b"]
        assert stub.count == 1 + 3
        with pytest.raises(LLMError, match="unusable answer"):  # a rerun asks again: nothing was cached for it
            llm.complete("bad", json_schema=True, validate=_needs_ok)
        assert stub.count == 1 + 3 + 3
    cached = [p for p in (tmp_path / "llm").glob("*.json") if not p.name.endswith(".rejected.json")]
    assert [json.loads(p.read_text())["prompt"] for p in cached] == ["good"]
    assert len(_rejected(tmp_path)) == 6 and {r["prompt"] for r in _rejected(tmp_path)} == {"bad"}


def test_cached_wrong_shape_answer_is_a_miss_and_kept_as_rejected(tmp_path):
    answers = {1: '{"ok": "cached before the check"}', 2: '{"ok": 1}'}
    with Stub(lambda body, n: (200, answers[n], 0)) as stub:
        assert _client(stub, tmp_path).complete("x", json_schema=True) == {"ok": "cached before the check"}
        rerun = _client(stub, tmp_path)
        assert rerun.complete("x", json_schema=True, validate=_needs_ok) == {"ok": 1}
        assert stub.count == 2 and rerun.cache_hits == 0 and rerun.requests == 1
        assert _client(stub, tmp_path).complete("x", json_schema=True, validate=_needs_ok) == {"ok": 1}
        assert stub.count == 2  # the good answer replaced it in the cache
    (bad,) = _rejected(tmp_path)
    assert bad["answer"] == answers[1] and "no 'ok'" in bad["rejected"]


def test_validate_works_without_a_disk_cache_and_on_text(tmp_path):
    def no_sorry(text):
        if text.startswith("Sorry"):
            raise ValueError("a refusal")

    with Stub(lambda body, n: (200, "Sorry, no." if n == 1 else "whiskers", 0)) as stub:
        llm = OpenAICompatible(stub.url, "m", attempts=2, backoff=0.0, cache=False)
        assert llm.complete("x", validate=no_sorry) == "whiskers" and stub.count == 2


def test_ask_each_gives_up_when_the_endpoint_is_down(tmp_path):
    with Stub(lambda body, n: (200, "x", 0)) as stub:
        url = stub.url  # closed
    llm = OpenAICompatible(url, "m", attempts=2, backoff=0.0, cache=tmp_path / "llm")
    keys = {f"k{i}": f"prompt {i}" for i in range(8)}
    answers, failures = ask_each(llm, keys, give_up_after=3)
    assert answers == {} and list(failures) == list(keys) and llm.requests == 3 * 2
    assert "cannot reach" in failures["k2"]
    assert failures["k3"].startswith("not asked: the endpoint failed 3 times in a row (")
    assert failures["k3"].endswith(f"({failures['k2']})") and failures["k7"] == failures["k3"]


def test_ask_each_does_not_give_up_after_a_success(tmp_path):
    def script(body, n):
        return (200, '{"a": 1}', 0) if body["messages"][-1]["content"] == "p0" else (500, "down", 0)

    with Stub(script) as stub:
        answers, failures = ask_each(_client(stub, tmp_path, attempts=1), {f"k{i}": f"p{i}" for i in range(6)},
                                     give_up_after=2)
        assert list(answers) == ["k0"] and len(failures) == 5 and stub.count == 6
        assert not any(reason.startswith("not asked") for reason in failures.values())
