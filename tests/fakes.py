"""Engine doubles for the conversation's tests: they stand at the engine boundary, and mypy
checks them against the engines' Protocols (the block at the end; tests/test_typing.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bot.engines import ModelUnavailable
from bot.engines.base import FloatArray, Message, Transcript, Usage

if TYPE_CHECKING:
    from bot.conversation.turns import Vad
    from bot.engines.base import EngineSet, LlmEngine, SttEngine, TtsEngine


def _now() -> float:
    """The time on the call path's clock: the loop's on its thread (virtual in a virtual
    test), else the monotonic clock it reads."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def _no_time(seconds: float) -> None:
    """An engine double's work takes no time (in threads, it takes what it takes)."""


def _wait_in_thread(event: Any) -> None:
    """A double held by a test, in a worker thread (tests/virtual.py holds it on its clock)."""
    event.wait(10)


class ScriptedVad:
    def is_speech(self, pcm: bytes, rate: int) -> bool:
        return pcm[0] == 1


@dataclass
class FakeStt:
    """Names what it heard by its length, so a test can tell partial from whole turns."""

    calls: list[float] = field(default_factory=list)
    hold: threading.Event | None = None
    text: str = ""  # what it hears instead (when set)
    confidence: float | None = None
    seconds: float = 0.0  # virtual time a transcription takes
    # How the double's time passes: tests/virtual.py's InlineExecutor.spend and spend_until.
    spend: Callable[[float], None] = _no_time
    wait: Callable[[Any], None] = _wait_in_thread

    def transcribe(self, pcm: bytes, rate: int) -> Transcript:
        self.spend(self.seconds)
        if self.hold is not None:
            self.wait(self.hold)
        seconds = len(pcm) / 2 / rate
        self.calls.append(seconds)
        # No final punctuation: the detector cannot tell if the turn is complete (default hangover).
        text = self.text or f"I spoke for {seconds:.1f} seconds"
        return Transcript(text, seconds, 0.01, confidence=self.confidence)


class FakeLlm:
    def __init__(self, words: str = "Sure, here is the answer you wanted.") -> None:
        self.max_tokens = 50
        self.n_ctx = 2048
        self.contended = False
        self.words = words.split(" ")
        self.hold: Any = None  # a threading.Event, or an asyncio.Event on virtual time
        self.wait: Callable[[Any], None] = _wait_in_thread
        self.prompts: list[list[Message]] = []
        self.prepared: list[list[Message]] = []
        self.forgotten: list[list[Message]] = []
        self.stopped_early = threading.Event()

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def prepare(self, messages: list[Message]) -> None:
        self.prepared.append(messages)

    def forget(self, messages: list[Message]) -> None:
        self.forgotten.append(messages)

    def warm_up(self, system_prompt: str = "") -> str:
        self.prompts.append([{"role": "system", "content": system_prompt}])
        return "Hello."

    def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        usage: Usage | None = None,
        temperature: float | None = None,
    ) -> Generator[str, None, None]:
        self.prompts.append(messages)
        finished = False
        try:
            for i, word in enumerate(self.words):
                if self.hold is not None:
                    self.wait(self.hold)
                if usage is not None:
                    usage.completion_tokens += 1
                    usage.first_token_s = usage.first_token_s or 0.01
                yield word if i == 0 else " " + word
            finished = True
        finally:
            if not finished:
                self.stopped_early.set()


class FakeTts:
    """A loud tone, 60 ms per word, in one chunk per clause."""

    native_rate = 8000

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.voices: list[str | None] = []
        self.hold: Any = None  # a threading.Event, or an asyncio.Event on virtual time
        self.streaming: threading.Event | None = None  # set when the bot is first heard
        self.heard_first: list[bool] = []
        self.seconds: dict[str, float] = {}  # audio of a clause (default: 60 ms a word)
        self.dues: list[tuple[str, float | None, float]] = []  # text, due, when asked
        self.holds: dict[str, Any] = {}  # a clause waits for its event (as ``hold``)
        self.synthesis: dict[str, float] = {}  # virtual time a clause takes before its audio
        self.spend: Callable[[float], None] = _no_time
        self.wait: Callable[[Any], None] = _wait_in_thread

    def check_voice(self, voice: str) -> None:
        if voice not in ("", "tone"):
            raise ModelUnavailable(f"no voice {voice!r} (voices: tone)")

    def synthesize(
        self, text: str, voice: str | None = None, *, due: float | None = None
    ) -> Iterator[FloatArray]:
        if self.hold is not None:
            self.wait(self.hold)
        if text in self.holds:
            self.wait(self.holds[text])
        self.texts.append(text)
        self.voices.append(voice)
        self.dues.append((text, due, _now()))
        self.spend(self.synthesis.get(text, 0.0))
        n = round(8000 * self.seconds.get(text, 0.06 * len(text.split())))
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 8000)).astype(np.float32)
        if self.streaming is None:
            yield tone
            return
        # Streaming, like Kokoro ONNX: the second half only once the first was heard.
        yield tone[: n // 2]
        self.heard_first.append(self.streaming.wait(5))
        yield tone[n // 2 :]


@dataclass
class FakeEngines:
    stt: FakeStt = field(default_factory=FakeStt)
    llm: FakeLlm = field(default_factory=FakeLlm)
    tts: FakeTts = field(default_factory=FakeTts)


if TYPE_CHECKING:  # what the conversation takes: mypy fails here if a fake drifts from it
    _vad: Vad = ScriptedVad()
    _stt: SttEngine = FakeStt()
    _llm: LlmEngine = FakeLlm()
    _tts: TtsEngine = FakeTts()
    _engines: EngineSet = FakeEngines()
