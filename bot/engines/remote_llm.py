"""Thinking on an inference server: the OpenAI-compatible chat completions API, streamed.

Any server that speaks ``POST /v1/chat/completions`` with ``"stream": true`` will do: llama.cpp's
``llama-server``, the server that ships with llama-cpp-python (``python -m llama_cpp.server``),
vLLM, Ollama, or a hosted API. The server batches the replies of every bot instance.

Prompt reuse is the server's: each request sends the call's whole conversation, and the server
keeps the evaluated prefix (llama.cpp: ``cache_prompt``, sent with every request; vLLM:
``--enable-prefix-caching``; llama-cpp-python's server reuses its one context's prefix by
itself). Closing a reply's stream closes its connection: the server stops decoding it (on
barge-in and hang-up).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, Final

import httpx

from ..config import DEFAULT_SYSTEM_PROMPT, ModelSettings, default
from . import EngineFailed, ModelUnavailable
from .base import Message, Usage

CHARS_PER_TOKEN: Final = 3  # a cautious estimate: English runs ~4 characters a token
# llama.cpp's servers sample as the in-process engine does only when told (their defaults add
# a repeat penalty of 1.1 over the last 64 tokens), so what bench quality measures in process
# holds for the server. ``cache_prompt`` keeps the conversation's prefix evaluated (llama-server).
LLAMA_FIELDS: Final = {"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0, "cache_prompt": True}


@dataclass(frozen=True, slots=True)
class RemoteLlmOptions:
    url: str  # the API's base, e.g. http://127.0.0.1:8080/v1
    model: str = ""  # the server's model name ("" for a server with one model)
    api_key: str = ""
    n_ctx: int = default(ModelSettings, "llm_n_ctx")
    max_tokens: int = default(ModelSettings, "llm_max_tokens")
    temperature: float = 0.2
    top_p: float = 0.9
    llama_fields: bool = default(ModelSettings, "llm_llama_fields")
    connect_timeout_s: float = default(ModelSettings, "connect_timeout_s")
    read_timeout_s: float = default(ModelSettings, "read_timeout_s")


class OpenAiLlm:
    """An LLM behind the OpenAI-compatible API; satisfies ``base.LlmEngine``."""

    def __init__(self, options: RemoteLlmOptions) -> None:
        self.options = o = options
        headers = {"Authorization": f"Bearer {o.api_key}"} if o.api_key else {}
        timeout = httpx.Timeout(o.read_timeout_s, connect=o.connect_timeout_s)
        self._http = httpx.Client(base_url=o.url.rstrip("/"), headers=headers, timeout=timeout)
        self._lock = threading.Lock()
        self._streaming = 0

    def __repr__(self) -> str:
        return f"OpenAiLlm({self.options.url!r}, model={self.options.model!r})"

    @property
    def n_ctx(self) -> int:
        return self.options.n_ctx

    @property
    def max_tokens(self) -> int:
        return self.options.max_tokens

    @property
    def contended(self) -> bool:
        """More than one reply of this instance streams now (the server's own load is not
        visible from here)."""
        return self._streaming > 1

    def count_tokens(self, text: str) -> int:
        """An estimate: the API has no tokenizer (a history trimmed a little early)."""
        return len(text) // CHARS_PER_TOKEN + 1

    def check(self) -> str:
        """The server's answer to ``GET /models``: one line naming its models. Raises
        ModelUnavailable, naming the URL and what went wrong."""
        try:
            response = self._http.get("/models")
            response.raise_for_status()
            names = [m.get("id", "?") for m in response.json().get("data", [])]
        except (httpx.HTTPError, ValueError) as exc:
            raise ModelUnavailable(f"LLM server {self.options.url}: {_why(exc)}") from exc
        return f"{self.options.url} serves {', '.join(names) or 'no model'}"

    def warm_up(self, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
        """One short reply: checks the server answers, and leaves the system prompt in its
        prefix cache."""
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": "Say hello."},
        ]
        return "".join(self.stream(messages, max_tokens=8))

    def prepare(self, messages: list[Message]) -> None:
        """Nothing: the server keeps the conversation's prefix from its last request."""

    def forget(self, messages: list[Message]) -> None:
        """Nothing: the server evicts old prefixes by itself."""

    def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        usage: Usage | None = None,
        temperature: float | None = None,
    ) -> Generator[str, None, None]:
        """The reply's text pieces as the server sends them; blocking. Closing the generator
        closes the connection (the server stops the reply)."""
        o = self.options
        usage = usage if usage is not None else Usage()
        body = self._body(messages, max_tokens or o.max_tokens, temperature)
        start = time.perf_counter()
        with self._counted():
            try:
                with self._http.stream("POST", "/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        response.read()
                        raise EngineFailed(
                            f"LLM server {o.url}: HTTP {response.status_code}: "
                            f"{response.text[:200]}"
                        )
                    for piece, finish in _events(response.iter_lines()):
                        if finish:
                            usage.finish_reason = finish
                        if not piece:
                            continue
                        if usage.first_token_s is None:
                            usage.first_token_s = time.perf_counter() - start
                        usage.completion_tokens += 1
                        yield piece
            except httpx.HTTPError as exc:
                raise EngineFailed(f"LLM server {o.url}: {_why(exc)}") from exc
            finally:
                usage.total_s = time.perf_counter() - start

    def close(self) -> None:
        self._http.close()

    def _body(
        self, messages: list[Message], max_tokens: int, temperature: float | None
    ) -> dict[str, Any]:
        o = self.options
        body: dict[str, Any] = {
            "messages": messages,
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": o.temperature if temperature is None else temperature,
            "top_p": o.top_p,
        }
        if o.llama_fields:
            body.update(LLAMA_FIELDS)
        if o.model:
            body["model"] = o.model
        return body

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """Counts the replies streaming now (for ``contended``)."""
        with self._lock:
            self._streaming += 1
        try:
            yield
        finally:
            with self._lock:
                self._streaming -= 1


def _events(lines: Iterator[str]) -> Iterator[tuple[str, str | None]]:
    """(text, finish reason) of each server-sent chunk, until ``[DONE]``."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments, "event:" lines
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
            choice = chunk["choices"][0] if chunk.get("choices") else {}
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise EngineFailed(
                f"LLM server sent a chunk that is not a completion: {data[:120]}"
            ) from exc
        delta = choice.get("delta") or {}
        yield delta.get("content") or "", choice.get("finish_reason")


def _why(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return str(exc) or type(exc).__name__
