"""The engine seams: what a conversation asks of each engine, and what comes back.

One narrow Protocol per job. The real engines (``stt.WhisperStt``, ``llm.LlamaLlm``, the TTS
classes in ``tts``) satisfy them, and so do the fakes in the conversation's tests: mypy checks
both against these classes.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    audio_seconds: float
    seconds: float  # wall time spent transcribing
    language: str | None = None
    # Whisper's mean log-probability of the transcript's tokens: near 0 for words it is sure
    # of, under about -0.75 for words it most likely misheard. None when unknown.
    confidence: float | None = None


@dataclass(slots=True)
class Usage:
    """One reply's use of the LLM, filled in as it streams."""

    completion_tokens: int = 0
    first_token_s: float | None = None  # after the model took it (prompt evaluation included)
    wait_s: float = 0.0  # waiting for a free sequence (every one busy with another reply)
    total_s: float = 0.0
    finish_reason: str | None = None


class SttEngine(Protocol):
    def transcribe(self, pcm: bytes, rate: int) -> Transcript:
        """The words of 16-bit mono PCM at ``rate``; blocking."""
        ...


class LlmEngine(Protocol):
    @property
    def n_ctx(self) -> int:
        """Tokens one reply's prompt and answer may take."""
        ...

    @property
    def max_tokens(self) -> int:
        """The longest reply, in tokens, unless a stream asks for another."""
        ...

    @property
    def contended(self) -> bool:
        """More than one reply wants the model now."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        usage: Usage | None = None,
        temperature: float | None = None,
    ) -> Generator[str, None, None]:
        """The reply's text pieces as they are decoded; blocking. Closing the iterator stops
        the reply and frees its place in the model."""
        ...

    def prepare(self, messages: list[Message]) -> None:
        """A hint: evaluate what the next turn's prompt starts with, ahead of it."""
        ...

    def forget(self, messages: list[Message]) -> None:
        """A hint: a dialogue that starts with ``messages`` is over."""
        ...

    def warm_up(self, system_prompt: str) -> str:
        """A short generation after load, leaving ``system_prompt`` evaluated."""
        ...


class TtsEngine(Protocol):
    native_rate: int

    def synthesize(
        self, text: str, voice: str | None = None, *, due: float | None = None
    ) -> Iterator[FloatArray]:
        """Audio at ``native_rate`` in chunks (float in [-1, 1]), the first as early as it can.
        ``voice``: another voice of the same model (None: the options' voice). ``due``: when
        the audio is needed (``time.monotonic()``; None: now): concurrent syntheses take the
        model run by run, earliest due first."""
        ...

    def check_voice(self, voice: str) -> None:
        """Raises ModelUnavailable, naming the choices, if this engine cannot speak ``voice``."""
        ...


class EngineSet(Protocol):
    """The three engines every call of a process shares."""

    @property
    def stt(self) -> SttEngine: ...

    @property
    def llm(self) -> LlmEngine: ...

    @property
    def tts(self) -> TtsEngine: ...
