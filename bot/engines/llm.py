"""Thinking with llama-cpp-python: streaming chat completions and per-call conversations.

One :class:`LlamaLlm` per process holds the weights; each call has its own
:class:`Conversation` (system prompt + history). llama.cpp keeps the KV cache of the last prompt
evaluated and reuses its longest common prefix on the next one, so a conversation's later turns
evaluate only the new words; the system prompt, shared by every call of a profile, stays cached
even when calls alternate. Generation is serialized by a lock (a llama context is not
thread-safe); a conversation holds it only while it generates.

llama.cpp moves some weights into "extra" buffer types with CPU-specific layouts (AMX tiles,
repacked Q4). Built on a CPU with AMX, llama-cpp-python 0.3.36 picks the AMX layout and then
crashes the process (SIGSEGV) on the first prompt of more than one token (seen on a Sapphire
Rapids VM). scripts/bootstrap compiles AMX out (``-mno-amx-*``); for a build that has it anyway
(a wheel built elsewhere), ``extra_buffers = "auto"`` turns the extra layouts off (measured
here: 22 tokens a second either way).

llama.cpp built with OpenMP (pip's default) runs its thread pool on libgomp, the same library
(by soname) PyTorch uses for Kokoro's vocoder. Once PyTorch's threads exist, libgomp counts more
OpenMP threads than cores and "throttles": llama.cpp's barriers, one per graph node, sleep
instead of spinning. Measured here after one vocoder run: the first token of a turn 161-171 ms
instead of ~100, decoding ~1.5x slower. scripts/bootstrap builds llama.cpp with
``-DGGML_OPENMP=OFF`` (its own thread pool); the stack warns about an OpenMP build beside
PyTorch's vocoder.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from . import ACTIVITY, EngineFailed, ModelUnavailable
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
    extra_buffers: str = "auto"  # llama.cpp's extra weight layouts: auto (off if built with AMX)


def built_with(low_level: Any, feature: str) -> bool:
    """Whether this llama.cpp build says ``feature = 1`` in its system info (``AMX_INT8``,
    ``OPENMP``)."""
    try:
        info = low_level.llama_print_system_info()
    except Exception:
        return False
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    return f"{feature} = 1" in text


def built_with_amx(low_level: Any) -> bool:
    """Whether this llama.cpp build uses Intel AMX (it does where it was compiled on a CPU
    with AMX and without ``-mno-amx-*``, as scripts/bootstrap compiles it)."""
    return built_with(low_level, "AMX_INT8")


_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def _model_params(low_level: Any, *, extra_buffers: bool) -> Iterator[None]:
    """``Llama()`` builds its model parameters itself from ``llama_cpp.llama_cpp``'s defaults:
    have them use (or not) llama.cpp's extra buffer types while one model loads."""
    if extra_buffers:
        yield
        return
    default = low_level.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = False
        return p

    with _PARAMS_LOCK:
        low_level.llama_model_default_params = params
        try:
            yield
        finally:
            low_level.llama_model_default_params = default


@dataclass(slots=True)
class Usage:
    completion_tokens: int = 0
    first_token_s: float | None = None  # after the model was free (prompt evaluation included)
    wait_s: float = 0.0  # waiting for another generation to end
    total_s: float = 0.0
    finish_reason: str | None = None


class LlamaLlm:
    def __init__(self, options: LlmOptions | None = None, *, progress: bool = True) -> None:
        self.options = o = options or LlmOptions()
        try:
            import llama_cpp.llama_cpp as low_level  # where Llama() takes its defaults from
            from llama_cpp import Llama
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise ModelUnavailable(f"llama-cpp-python is not installed ({exc})") from exc
        if o.extra_buffers not in ("auto", "on", "off"):
            raise ModelUnavailable(
                f"extra_buffers must be auto, on or off, not {o.extra_buffers!r}"
            )
        # OpenMP: see the module's docstring (Engines warns where it matters).
        self.openmp = built_with(low_level, "OPENMP")
        self.extra_buffers = o.extra_buffers == "on" or (
            o.extra_buffers == "auto" and not built_with_amx(low_level)
        )
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
            with _model_params(low_level, extra_buffers=self.extra_buffers):
                self._llm: Any = self._load(Llama, kwargs)
        except Exception as exc:
            raise ModelUnavailable(f"cannot load LLM {o.model!r}: {exc}") from exc
        self.threads = o.threads  # llama.cpp's threads now (see _fit_threads)
        self._lock = threading.Lock()
        # Generations queued behind the one running (a hint for throttling, so an unlocked
        # count is good enough).
        self._waiting = 0

    def _fit_threads(self) -> None:
        """One thread while STT or TTS computes beside the LLM, else ``options.threads``.

        llama.cpp's threads meet at a barrier after every graph node. Built without OpenMP
        (as scripts/bootstrap builds it), the barrier spins: with another engine's threads on
        the same cores, a descheduled thread keeps the other spinning. Measured at 4 calls on 2
        cores (p50 / p95 response): 4.0 / 6.8 s with 2 LLM threads always, 1.9 / 2.9 s with
        this (the OpenMP build, whose barriers sleep: 2.4 / 3.9 s).
        """
        want = 1 if ACTIVITY.busy else self.options.threads
        if want != self.threads:
            self._llm._ctx.set_n_threads(want, want)
            self.threads = want

    def _load(self, llama: Any, kwargs: dict[str, Any]) -> Any:
        o = self.options
        if self.resolved.source == "huggingface":
            repo, _, filename = o.model.partition(":")
            return llama.from_pretrained(repo, filename or "*q4_k_m.gguf", **kwargs)
        return llama(model_path=str(self.resolved.path), **kwargs)

    @property
    def contended(self) -> bool:
        """Another generation is waiting for the model."""
        return self._waiting > 0

    @property
    def n_ctx(self) -> int:
        return int(self._llm.n_ctx())

    def count_tokens(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def warm_up(self, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
        """One short generation: the first after load is several times slower than the rest.
        It leaves ``system_prompt`` evaluated in the context, where the first call's prompt
        starts (llama.cpp reuses the longest common prefix: ~0.2 s less on the first turn)."""
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": "Say hello."},
        ]
        return "".join(self.stream(messages, max_tokens=8))

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
        usage.wait_s = time.perf_counter() - start
        start += usage.wait_s
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
                while True:
                    self._fit_threads()  # each step below is one llama_decode
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
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

    def reply(
        self,
        user_text: str,
        *,
        usage: Usage | None = None,
        keep: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """Streams the reply. The turn joins the history when the stream ends, also when the
        caller of this generator stops early (a short answer, or barge-in): then the history
        holds what was generated. ``keep``, asked at that moment, can say the exchange never
        happened (a reply started ahead of the caller's last word, then dropped)."""
        pieces: list[str] = []
        try:
            for piece in self.llm.stream(
                self.messages(user_text), max_tokens=self.max_tokens, usage=usage
            ):
                pieces.append(piece)
                yield piece
        finally:
            if keep is None or keep():
                self.history += [
                    {"role": "user", "content": user_text},
                    {"role": "assistant", "content": "".join(pieces).strip()},
                ]
                # Keep the stored history bounded (the prompt is trimmed again at each turn).
                if len(self.history) > 40:
                    del self.history[:2]


__all__ = ["Conversation", "EngineFailed", "LlamaLlm", "LlmOptions", "Usage"]
