"""Thinking with llama-cpp-python: streaming chat completions and per-call conversations.

One :class:`LlamaLlm` per process holds the weights; each call has its own
:class:`Conversation` (system prompt + history). llama.cpp keeps the KV cache of the last prompt
evaluated and reuses its longest common prefix on the next one, so a conversation's later turns
evaluate only the new words; the system prompt, shared by every call of a profile, stays cached
even when calls alternate. Generation is serialized by a lock (a llama context is not
thread-safe); a conversation holds it only while it generates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from . import EngineFailed, ModelUnavailable
from .models import resolve

DEFAULT_SYSTEM_PROMPT: Final = (
    "You are a warm, kind and empathetic voice assistant on a phone call. Answer in one or two "
    "short, natural sentences, as people speak. Never use lists, markdown or emojis."
)


@dataclass(frozen=True, slots=True)
class LlmOptions:
    model: str = "qwen2.5-0.5b"  # catalogue name, GGUF path, or "owner/repo:file.gguf" on HF
    n_ctx: int = 2048
    threads: int = 2
    max_tokens: int = 50
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int = -1
    stop: tuple[str, ...] = ()


@dataclass(slots=True)
class Usage:
    completion_tokens: int = 0
    first_token_s: float | None = None
    total_s: float = 0.0
    finish_reason: str | None = None


class LlamaLlm:
    def __init__(self, options: LlmOptions | None = None, *, progress: bool = True) -> None:
        self.options = o = options or LlmOptions()
        try:
            from llama_cpp import Llama
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise ModelUnavailable(f"llama-cpp-python is not installed ({exc})") from exc
        self.resolved = resolve(
            o.model.split(":")[0] if ":" in o.model else o.model, "llm", progress=progress
        )
        kwargs: dict[str, Any] = dict(
            n_ctx=o.n_ctx,
            n_threads=o.threads,
            n_threads_batch=o.threads,
            verbose=False,
            seed=o.seed,
        )
        try:
            if self.resolved.source == "huggingface":
                repo, _, filename = o.model.partition(":")
                self._llm: Any = Llama.from_pretrained(repo, filename or "*q4_k_m.gguf", **kwargs)
            else:
                self._llm = Llama(model_path=str(self.resolved.path), **kwargs)
        except Exception as exc:
            raise ModelUnavailable(f"cannot load LLM {o.model!r}: {exc}") from exc
        self._lock = threading.Lock()
        # Generations queued behind the one running (a hint for throttling, so an unlocked
        # count is good enough).
        self._waiting = 0

    @property
    def contended(self) -> bool:
        """Another generation is waiting for the model."""
        return self._waiting > 0

    @property
    def n_ctx(self) -> int:
        return int(self._llm.n_ctx())

    def count_tokens(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def warm_up(self) -> str:
        """One short generation: the first after load is several times slower than the rest."""
        return "".join(self.stream([{"role": "user", "content": "Say hello."}], max_tokens=8))

    def stream(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        stop: tuple[str, ...] | None = None,
        usage: Usage | None = None,
    ) -> Iterator[str]:
        """Streams the reply's text pieces; blocking. ``usage`` is filled in as it goes."""
        o = self.options
        usage = usage if usage is not None else Usage()
        start = time.perf_counter()
        self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            self._waiting -= 1
        try:
            try:
                chunks = self._llm.create_chat_completion(
                    messages=messages,
                    max_tokens=max_tokens or o.max_tokens,
                    temperature=o.temperature,
                    top_p=o.top_p,
                    stop=list(stop if stop is not None else o.stop) or None,
                    stream=True,
                )
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    piece = choice.get("delta", {}).get("content") or ""
                    if choice.get("finish_reason"):
                        usage.finish_reason = choice["finish_reason"]
                    if piece:
                        if usage.first_token_s is None:
                            usage.first_token_s = time.perf_counter() - start
                        usage.completion_tokens += 1
                        yield piece
            except GeneratorExit:
                raise
            except Exception as exc:
                raise EngineFailed(f"LLM failed: {exc}") from exc
        finally:
            usage.total_s = time.perf_counter() - start
            self._lock.release()


@dataclass
class Conversation:
    """One call's dialogue: a system prompt and the turns so far, trimmed to the context."""

    llm: LlamaLlm
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_tokens: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    reserve: int = 64  # tokens kept free for the chat template's own markers

    def messages(self, user_text: str) -> list[dict[str, str]]:
        msgs = [*self.history, {"role": "user", "content": user_text}]
        budget = self.llm.n_ctx - (self.max_tokens or self.llm.options.max_tokens) - self.reserve
        budget -= self.llm.count_tokens(self.system_prompt)
        # Drop the oldest exchanges first; the newest user turn always stays.
        while len(msgs) > 1 and sum(self.llm.count_tokens(m["content"]) + 8 for m in msgs) > budget:
            msgs = msgs[2:] if len(msgs) > 2 else msgs[1:]
        return [{"role": "system", "content": self.system_prompt}, *msgs]

    def reply(self, user_text: str, *, usage: Usage | None = None) -> Iterator[str]:
        """Streams the reply. The turn joins the history when the stream ends, also when the
        caller of this generator stops early (a short answer, or barge-in): then the history
        holds what was generated."""
        pieces: list[str] = []
        try:
            for piece in self.llm.stream(
                self.messages(user_text), max_tokens=self.max_tokens, usage=usage
            ):
                pieces.append(piece)
                yield piece
        finally:
            self.history += [
                {"role": "user", "content": user_text},
                {"role": "assistant", "content": "".join(pieces).strip()},
            ]
            # Keep the stored history bounded too (the prompt is trimmed again at each turn).
            if len(self.history) > 40:
                del self.history[:2]


__all__ = ["Conversation", "EngineFailed", "LlamaLlm", "LlmOptions", "Usage"]
