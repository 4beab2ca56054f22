"""Language models for the description methods (papers 7, 10, 21, 30, 36): prompt in, text or JSON out.

``load_llm("replay:answers.json" | "http://localhost:8000/v1" | "openai:MODEL" | "hf:PATH")`` gives an
``LLM``; ``llm.complete(prompt, system=, json_schema=True)`` answers (cached on disk, retried, failures
raised as ``cliplab.errors.LLMError``); ``ask_each(llm, {key: prompt})`` asks many and reports failures per key.
"""

from ..errors import LLMError
from .backends import OpenAICompatible, Replay, Transformers, load_llm, prompt_key
from .base import LLM, RetryableError, ask_each, cache_key, parse_json

__all__ = ["LLM", "LLMError", "OpenAICompatible", "Replay", "RetryableError", "Transformers", "ask_each",
           "cache_key", "load_llm", "parse_json", "prompt_key"]
