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
    """How many STT and TTS runs are computing in this process right now.

    The LLM sizes its thread pool by it (bot/engines/llm.py): llama.cpp's threads meet at a
    spinning barrier after every graph node, so on a machine with as many threads as cores
    they must not share the cores with another engine's threads.
    """

    def __init__(self) -> None:
        self._running = 0
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._running > 0

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1


ACTIVITY = Activity()  # the process's engines share the cores


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
