"""The language-model interface behind the description methods (papers 7, 10, 21, 30, 36 in ../shared/papers.md).

One call, ``LLM.complete(prompt, system=, json_schema=)``, returns the answer's text or, when JSON is asked
for, the parsed JSON. Every backend shares the on-disk answer cache, the retries and the error reporting
written here; a backend only implements ``_request`` (one attempt, raw text out).

Departures from the authors' code, which calls the OpenAI client directly: answers are cached on disk
(one JSON file per answer, so nothing paid for is lost when a run stops), JSON answers wrapped in a
Markdown code fence or surrounded by prose are accepted, and a ``json_schema`` dict is only checked for its
top-level type (object / array / string) and is part of the cache key; it is not sent to the server.

Answers of the wrong shape: a caller passes ``validate`` (the parsed answer in, ``ValueError`` out when it is
unusable). It runs inside the retry loop before anything is cached, so a valid-JSON answer of the wrong shape is
retried like a malformed one and never replayed from the cache; a cached answer it rejects (cached before the
check existed, or by a caller without one) is a miss. Every rejected answer is kept for the record in
``<key>.rejected.json`` beside the cache (a list of records, written atomically): nothing paid for is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import LLMError
from ..fileio import atomic_write_text, default_cache_root

JSON_SYSTEM = "Answer with valid JSON only, no prose and no code fences."
BUDGET_ENV = "CLIPLAB_LLM_BUDGET"  # seconds one LLM object may spend on requests in all (default: no limit)
Validator = Callable[[Any], object]
_JSON_TYPES = {"object": dict, "array": list, "string": str, "number": (int, float), "boolean": bool}


class RetryableError(Exception):
    """Raised by a backend's ``_request`` for a failure worth another attempt (timeout, 5xx, refusal)."""


def cache_key(backend_id: str, model: str, prompt: str, system: str | None, json_schema: Any) -> str:
    """sha256 of backend id, model, prompt, system prompt and the JSON request (False, True or the schema)."""
    payload = json.dumps([backend_id, model, prompt, system, _json_flag(json_schema)], sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8", "surrogateescape")).hexdigest()


def _json_flag(json_schema: Any) -> Any:
    return False if json_schema is None or json_schema is False else json_schema


def parse_json(text: str) -> Any:
    """The JSON value in ``text``: the whole text, a fenced ```json block, or its outermost {...} / [...] span."""
    stripped = text.strip()
    candidates = [stripped]
    if stripped.startswith("```"):
        inner = stripped.split("\n", 1)[1] if "\n" in stripped else ""
        candidates.append(inner.rsplit("```", 1)[0])
    for open_, close in ("{}", "[]"):
        start, end = stripped.find(open_), stripped.rfind(close)
        if 0 <= start < end:
            candidates.append(stripped[start : end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's JSON reader goes
            continue
    raise ValueError(f"malformed JSON answer: {_clip(stripped)!r}")


def _check_schema(value: Any, json_schema: Any) -> None:
    if isinstance(json_schema, dict) and json_schema.get("type") in _JSON_TYPES:
        expected = _JSON_TYPES[json_schema["type"]]
        if not isinstance(value, expected) or (json_schema["type"] == "number" and isinstance(value, bool)):
            raise ValueError(f"JSON answer is a {type(value).__name__}, the schema asks for {json_schema['type']}")


def _clip(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


class LLM:
    """Prompt in, text or parsed JSON out; cached, retried, failures raised as one-line ``LLMError``s.

    ``attempts`` tries per call, waiting ``backoff * 2**i`` seconds after failed try ``i``. ``cache``: True
    for ``<cache root>/llm``, a folder, or False for none. ``requests`` counts the attempts actually made.
    ``budget``: seconds this object may spend on requests and their back-off in all, over every call (default
    ``$CLIPLAB_LLM_BUDGET``, else no limit); once spent, every call without a cached answer is an ``LLMError``
    at once, and a request never runs past what is left (``time_left``).
    """

    backend = "llm"

    def __init__(self, model: str, *, attempts: int = 3, backoff: float = 0.5, cache: bool | str | Path = True,
                 budget: float | None = None):
        if attempts < 1:
            raise LLMError(f"{self.backend}: attempts must be at least 1, got {attempts}")
        if budget is None and os.environ.get(BUDGET_ENV):
            try:
                budget = float(os.environ[BUDGET_ENV])
            except ValueError:
                raise LLMError(f"{BUDGET_ENV}={os.environ[BUDGET_ENV]!r}: not a number of seconds") from None
        if budget is not None and not (isinstance(budget, (int, float)) and budget > 0 and not math.isnan(budget)):
            raise LLMError(f"{self.backend}: budget must be a positive number of seconds, got {budget!r}")
        self.budget = None if budget is None else float(budget)
        self.spent = 0.0  # seconds spent in requests and back-off, counted against ``budget``
        self.model = model
        self.attempts = attempts
        self.backoff = backoff
        self.cache_dir: Path | None = (
            (default_cache_root() / "llm") if cache is True else (Path(cache) if cache else None)
        )
        self.requests = 0
        self.cache_hits = 0

    @property
    def backend_id(self) -> str:
        """Identifies where answers come from (part of the cache key); subclasses add their endpoint."""
        return self.backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.backend_id!r}, model={self.model!r})"

    def _request(self, prompt: str, system: str | None, json_mode: bool) -> str:
        """One attempt: the raw answer text. Raise RetryableError to retry, LLMError to give up at once."""
        raise NotImplementedError

    def time_left(self) -> float | None:
        """Seconds of ``budget`` left (None without a budget)."""
        return None if self.budget is None else max(0.0, self.budget - self.spent)

    def _over_budget(self) -> str | None:
        left = self.time_left()
        if left is not None and left <= 0:
            return f"time budget of {self.budget:g} s for LLM requests spent"
        return None

    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / f"{key}.json" if self.cache_dir is not None else None

    def _record(self, prompt: str, system: str | None, json_schema: Any, raw: str) -> dict[str, Any]:
        return {"backend": self.backend_id, "model": self.model, "system": system, "prompt": prompt,
                "json": _json_flag(json_schema), "answer": raw}

    def _reject(self, path: Path | None, record: dict[str, Any], reason: str) -> None:
        """Keep a rejected answer in ``<key>.rejected.json`` (a list; the same answer is kept once)."""
        if path is None:
            return
        rejected = path.with_name(path.name[: -len(".json")] + ".rejected.json")
        kept: list[Any] = []
        with contextlib.suppress(OSError, ValueError, RecursionError):
            kept = json.loads(rejected.read_text(encoding="utf-8"))
        if not isinstance(kept, list):
            kept = [kept]
        if any(isinstance(item, dict) and item.get("answer") == record["answer"] for item in kept):
            return
        kept.append({**record, "rejected": reason})
        rejected.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rejected, json.dumps(kept, ensure_ascii=False, indent=1))

    @staticmethod
    def _usable(raw: str, json_schema: Any, validate: Validator | None) -> Any:
        """The parsed answer; ValueError when it is malformed, of the wrong type or rejected by ``validate``."""
        value = parse_json(raw) if _json_flag(json_schema) is not False else raw
        _check_schema(value, json_schema)
        if validate is not None:
            try:
                validate(value)
            except ValueError as error:
                raise ValueError(f"unusable answer: {error}") from None
        return value

    def _cached(self, path: Path | None, json_schema: Any, validate: Validator | None = None) -> tuple[bool, Any]:
        if path is None or not path.is_file():
            return False, None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            raw = record["answer"]
            if not isinstance(raw, str):
                raise TypeError("answer is not text")
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return False, None  # an unreadable entry is a miss; the fresh answer overwrites it
        try:
            value = self._usable(raw, json_schema, validate)
        except ValueError as error:
            # A readable answer that is no use: a miss, moved beside the cache so that nothing paid for is lost.
            self._reject(path, record, str(error))
            path.unlink(missing_ok=True)
            return False, None
        return True, value

    def complete(self, prompt: str, *, system: str | None = None, json_schema: Any = None,
                 validate: Validator | None = None) -> str | Any:
        """The answer to ``prompt``: text, or parsed JSON when ``json_schema`` is True or a schema dict.

        ``validate(answer)`` raises ``ValueError`` when the parsed answer is unusable: it is then retried (and
        finally reported) like a malformed one, and never cached as good; see the module docstring.
        """
        want_json = _json_flag(json_schema) is not False
        key = cache_key(self.backend_id, self.model, prompt, system, json_schema)
        path = self._cache_path(key)
        hit, value = self._cached(path, json_schema, validate)
        if hit:
            self.cache_hits += 1
            return value
        reason = "no attempt made"
        for attempt in range(self.attempts):
            if self._over_budget():
                raise LLMError(f"{self.backend_id} ({self.model}): {self._over_budget()}; prompt {_clip(prompt)!r} "
                               "not asked")
            started = time.monotonic()
            if attempt:
                left = self.time_left()
                wait = self.backoff * 2 ** (attempt - 1)
                time.sleep(wait if left is None else min(wait, left))
            self.requests += 1
            raw = None
            try:
                if self._over_budget():
                    raise RetryableError(self._over_budget())
                raw = self._request(prompt, system, want_json)
                if not raw or not raw.strip():
                    raise RetryableError("empty answer")
                value = self._usable(raw, json_schema, validate)
            except LLMError:
                raise
            except (RetryableError, ValueError) as error:
                reason = str(error)
                if isinstance(error, ValueError) and raw:
                    self._reject(path, self._record(prompt, system, json_schema, raw), reason)
                continue
            finally:
                self.spent += time.monotonic() - started
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(self._record(prompt, system, json_schema, raw),
                                                   ensure_ascii=False, indent=1))
            return value
        raise LLMError(f"{self.backend_id} ({self.model}): {reason} after {self.attempts} attempt(s) "
                       f"for prompt {_clip(prompt)!r}")


def ask_each(llm: LLM, items: dict[str, str], json: Any = True, system: str | None = None, *,
             validate: Validator | None = None, give_up_after: int | None = None,
             ) -> tuple[dict[str, Any], dict[str, str]]:
    """Ask every prompt of ``items`` (key -> prompt, e.g. one per class); never stop at a failure.

    Returns ``(answers, failures)``: key -> answer for those that worked, key -> one-line reason for the rest.
    ``validate``: as in ``LLM.complete`` (a wrong-shape answer is retried, then reported for its key).
    ``give_up_after``: once that many keys in a row failed and none has worked, the endpoint is taken to be down
    and the remaining keys are reported as not asked.
    """
    answers: dict[str, Any] = {}
    failures: dict[str, str] = {}
    keys = list(items)
    for index, key in enumerate(keys):
        if give_up_after and not answers and len(failures) >= give_up_after:
            reason = not_asked(len(failures), failures[keys[index - 1]])
            failures.update(dict.fromkeys(keys[index:], reason))
            break
        try:
            answers[key] = llm.complete(items[key], system=system, json_schema=json if json else None,
                                        validate=validate)
        except LLMError as error:
            failures[key] = str(error)
    return answers, failures


def not_asked(failed: int, last_reason: str) -> str:
    """The reason given for what is not asked once ``failed`` questions in a row failed and none worked."""
    return f"not asked: the endpoint failed {failed} times in a row ({last_reason})"
