"""The three LLM backends: an OpenAI-compatible HTTP endpoint, a replay file, a local transformers model.

``load_llm(spec)`` turns "replay:FILE", "http(s)://BASE_URL", "openai:MODEL" or "hf:PATH" into one.
The HTTP backend speaks the chat-completions protocol (vLLM, Ollama, llama.cpp servers, hosted APIs) with
the standard library's urllib, so it needs no client package (departure: the authors of papers 7 and 10
use the ``openai`` client; we send the same request body).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..errors import LLMError
from .base import JSON_SYSTEM, LLM, RetryableError, _clip

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Client errors that another attempt cannot fix (bad request, key, model name).
_FATAL_STATUS = {400, 401, 403, 404, 422}


class OpenAICompatible(LLM):
    """POST ``{base_url}/chat/completions``; base URL, key and model from arguments or the environment.

    Env: ``CLIPLAB_LLM_BASE_URL`` (default the OpenAI API), ``CLIPLAB_LLM_API_KEY`` or ``OPENAI_API_KEY``,
    ``CLIPLAB_LLM_MODEL``. JSON requests send ``response_format={"type": "json_object"}``. Temperature 0 by
    default so that answers repeat where the server allows.

    ``timeout`` is a deadline for the whole request, from connecting to the last byte of the answer (a server
    that keeps the connection alive by trickling bytes is cut off too), and never past the ``budget`` left.
    """

    backend = "openai-compatible"

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, *, temperature: float = 0.0, max_tokens: int | None = None,
                 attempts: int = 3, backoff: float = 0.5, cache: bool | str | Path = True,
                 budget: float | None = None):
        model = model or os.environ.get("CLIPLAB_LLM_MODEL")
        if not model:
            raise LLMError(f"{self.backend}: no model given: pass model= or set CLIPLAB_LLM_MODEL")
        super().__init__(model, attempts=attempts, backoff=backoff, cache=cache, budget=budget)
        self.base_url = (base_url or os.environ.get("CLIPLAB_LLM_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key or os.environ.get("CLIPLAB_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.temperature = temperature
        self.max_tokens = max_tokens

    @property
    def backend_id(self) -> str:
        return f"{self.backend}:{self.base_url}"

    def _request(self, prompt: str, system: str | None, json_mode: bool) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        left = self.time_left()
        limit = self.timeout if left is None else min(self.timeout, left)
        deadline = time.monotonic() + limit
        try:
            with urllib.request.urlopen(request, timeout=max(limit, 0.001)) as response:
                payload = _read_until(response, deadline)
        except _DeadlineError:
            raise RetryableError(f"no complete answer within {limit:g} s") from None
        except urllib.error.HTTPError as error:
            detail = _clip(error.read().decode("utf-8", "replace")) if error.fp else ""
            message = f"HTTP {error.code} from {self.base_url}/chat/completions {detail}".rstrip()
            if error.code in _FATAL_STATUS:
                raise LLMError(f"{self.backend_id} ({self.model}): {message}") from None
            raise RetryableError(message) from None
        except TimeoutError:
            raise RetryableError(f"timed out after {self.timeout:g} s") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise RetryableError(f"timed out after {self.timeout:g} s") from None
            raise RetryableError(f"cannot reach {self.base_url}: {error.reason}") from None
        except (ConnectionError, OSError) as error:
            raise RetryableError(f"connection to {self.base_url} failed: {error}") from None
        try:
            choice = json.loads(payload)["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            text = _clip(payload.decode("utf-8", "replace"))
            raise RetryableError(f"malformed chat-completions response: {text!r}") from None
        if message.get("refusal"):
            raise RetryableError(f"refusal: {_clip(str(message['refusal']))}")
        if choice.get("finish_reason") == "content_filter":
            raise RetryableError("refusal: answer stopped by the content filter")
        return message.get("content") or ""


class _DeadlineError(Exception):
    pass


def _read_until(response, deadline: float, chunk: int = 65536) -> bytes:
    """The whole body of ``response``, or _DeadlineError once ``deadline`` (time.monotonic) passes.

    Each read may wait at most the time left: the socket's timeout is narrowed to it before every read
    (where urllib exposes the socket), so a server trickling a byte at a time cannot keep a request alive.
    """
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    parts: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _DeadlineError
        if sock is not None:
            sock.settimeout(left)
        try:
            part = response.read1(chunk) if hasattr(response, "read1") else response.read(chunk)
        except TimeoutError:
            raise _DeadlineError from None
        if not part:
            return b"".join(parts)
        parts.append(part)


def prompt_key(prompt: str, system: str | None = None, json_mode: bool = False) -> str:
    """Backend-independent key of a request, for replay files: sha256 of (prompt, system, JSON asked or not)."""
    payload = json.dumps([prompt, system, bool(json_mode)])
    return hashlib.sha256(payload.encode("utf-8", "surrogateescape")).hexdigest()


class Replay(LLM):
    """Answers from a JSON file ``{prompt_key(...) or prompt text: answer}``: exact repeats, offline.

    An answer may be text or a JSON value (returned as is when JSON is asked for). A prompt that is not in
    the file is an ``LLMError`` naming it, never retried. Not cached on disk by default (the file is the cache).
    """

    backend = "replay"

    def __init__(self, path: str | Path, *, cache: bool | str | Path = False, budget: float | None = None):
        self.path = Path(path)
        try:
            answers = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LLMError(f"replay file {self.path} does not exist") from None
        except RecursionError:
            raise LLMError(f"replay file {self.path} is nested too deeply to read (not a {{prompt: answer}} "
                           "object)") from None
        except (OSError, ValueError) as error:
            raise LLMError(f"replay file {self.path} is not valid JSON: {_clip(str(error))}") from None
        if not isinstance(answers, dict):
            raise LLMError(f"replay file {self.path} must hold a JSON object {{prompt: answer}}")
        self.answers: dict[str, Any] = answers
        super().__init__(self.path.name, attempts=1, backoff=0.0, cache=cache, budget=budget)

    @property
    def backend_id(self) -> str:
        return f"replay:{self.path}"

    def _request(self, prompt: str, system: str | None, json_mode: bool) -> str:
        for key in (prompt_key(prompt, system, json_mode), prompt):
            if key in self.answers:
                answer = self.answers[key]
                return answer if isinstance(answer, str) else json.dumps(answer)
        raise LLMError(f"replay file {self.path} has no answer for prompt {_clip(prompt)!r}")


def _make_pipeline(model: str, device: Any):
    """transformers' text-generation pipeline, imported only here (tests replace this function)."""
    from transformers import pipeline

    return pipeline("text-generation", model=model, device=device)


class Transformers(LLM):
    """A local transformers text-generation model (greedy decoding), loaded on first use.

    JSON mode has no server-side support here: the request adds ``JSON_SYSTEM`` to the system prompt and the
    answer is parsed leniently (``base.parse_json``).
    """

    backend = "transformers"

    def __init__(self, model_name_or_path: str, *, max_new_tokens: int = 512, device: Any = None,
                 attempts: int = 2, backoff: float = 0.0, cache: bool | str | Path = True,
                 budget: float | None = None):
        super().__init__(str(model_name_or_path), attempts=attempts, backoff=backoff, cache=cache, budget=budget)
        self.max_new_tokens = max_new_tokens
        self.device = device
        self._pipe = None

    @property
    def backend_id(self) -> str:
        return f"{self.backend}:max_new_tokens={self.max_new_tokens}"

    def _pipeline(self):
        if self._pipe is None:
            try:
                self._pipe = _make_pipeline(self.model, self.device)
            except ImportError:
                raise LLMError(f"{self.backend} ({self.model}): the transformers package is not installed") from None
            except Exception as error:  # noqa: BLE001 - any load failure becomes one line naming the model
                raise LLMError(f"{self.backend} ({self.model}): cannot load the model: {_clip(str(error))}") from None
        return self._pipe

    def _request(self, prompt: str, system: str | None, json_mode: bool) -> str:
        if json_mode:
            system = f"{system}\n{JSON_SYSTEM}" if system else JSON_SYSTEM
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        try:
            out = self._pipeline()(messages, max_new_tokens=self.max_new_tokens, do_sample=False,
                                   return_full_text=False)
        except LLMError:
            raise
        except Exception as error:  # noqa: BLE001 - generation errors are worth a retry
            raise RetryableError(f"generation failed: {_clip(str(error))}") from None
        generated = out[0]["generated_text"] if out else ""
        if isinstance(generated, list):  # chat format: the conversation with the new assistant turn last
            generated = generated[-1].get("content", "") if generated else ""
        return str(generated)


def load_llm(spec: str, **kwargs: Any) -> LLM:
    """An LLM from a spec: "replay:FILE", "http(s)://BASE_URL" (model from kwargs or CLIPLAB_LLM_MODEL),
    "openai:MODEL" (base URL from CLIPLAB_LLM_BASE_URL or the OpenAI API) or "hf:PATH"."""
    if isinstance(spec, LLM):
        return spec
    kind, _, rest = spec.partition(":")
    if kind == "replay" and rest:
        return Replay(rest, **kwargs)
    if kind in ("http", "https"):
        return OpenAICompatible(base_url=spec, **kwargs)
    if kind == "openai" and rest:
        return OpenAICompatible(model=rest, **kwargs)
    if kind == "hf" and rest:
        return Transformers(rest, **kwargs)
    raise LLMError(f"unknown LLM spec {spec!r}: use replay:FILE, http(s)://BASE_URL, openai:MODEL or hf:PATH")
