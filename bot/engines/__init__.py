"""Speech engines: STT (faster-whisper), LLM (llama-cpp-python), TTS (Kokoro, Piper).

Engines know nothing about calls or sockets. Each job has one narrow interface, an options
dataclass, and backends created by name; heavy libraries are imported lazily, models are loaded
once per process, and inference is blocking (the call loop runs it in an executor).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Iterator


class EngineError(Exception):
    """Root of the engines' errors."""


class ModelUnavailable(EngineError):
    """A model's weights cannot be found or do not verify; the message says how to get them."""


class EngineFailed(EngineError):
    """An engine raised while running; the call loop apologises and ends the call."""


class Activity:
    """What the engines of one process are doing: the process's scheduler, made once by the
    composition root and handed to every engine and every call's conversation.

    - Engine runs ("stt", "llm", "tts"): each engine sizes its threads by them, run by run:
      alone it takes all its threads, beside another engine one. Two engines each on all the
      cores oversubscribe them: llama.cpp's threads meet at a spinning barrier after every
      graph node, so a descheduled thread keeps the other spinning, and every engine's run
      stretches (docs/performance.md).
    - Replies of any call with LLM or TTS work left: a call replies ahead of the caller's
      endpoint only while there is none (guesswork must not slow a real answer).

    An engine built without one gets its own: alone, it takes all its threads.
    """

    def __init__(self) -> None:
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()
        self.replies = 0  # (kept by the event loop's thread only)

    @property
    def busy(self) -> bool:
        """Some engine is computing."""
        return any(self._running.values())

    def beside(self, engine: str) -> bool:
        """An engine other than ``engine`` is computing."""
        return any(n for e, n in list(self._running.items()) if e != engine)

    def threads(self, engine: str, most: int) -> int:
        """The threads ``engine`` should compute on now: ``most`` alone, one beside another."""
        return 1 if self.beside(engine) else most

    @contextlib.contextmanager
    def running(self, engine: str) -> Iterator[None]:
        with self._lock:
            self._running[engine] = self._running.get(engine, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._running[engine] -= 1

    @contextlib.contextmanager
    def replying(self) -> Iterator[None]:
        """A reply's LLM or TTS work is under way (see ``replies``)."""
        self.replies += 1
        try:
            yield
        finally:
            self.replies -= 1


class DeadlineLock:
    """A lock whose waiters take it earliest deadline first (in arrival order on a tie).

    The TTS holds it for each model run (a window of a clause), so the clause due soonest
    (a first clause a caller waits for) goes before another call's later clause, whose audio
    is due only once the clauses before it have played."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._waiting: list[tuple[float, int]] = []
        self._arrivals = itertools.count()

    @contextlib.contextmanager
    def hold(self, due: float | None = None) -> Iterator[None]:
        """``due``: a ``time.monotonic()`` time (None: now)."""
        me = (time.monotonic() if due is None else due, next(self._arrivals))
        with self._cond:
            heapq.heappush(self._waiting, me)
            while self._held or self._waiting[0] != me:
                self._cond.wait()
            heapq.heappop(self._waiting)
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()
