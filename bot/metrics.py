"""Prometheus metrics of one bot instance, counted from its calls' log events.

Every number here comes from an event a call also writes to its ``events.jsonl`` (a turn's
``marks_ms``, a ``call_end``'s reason, a ``barge_in``...), so ``/metrics`` and the call logs
cannot disagree. One :class:`Metrics` per process, with its own registry (no global one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds from the caller's last word: the bot answers in ~0.5-2 s on a CPU.
LATENCY_BUCKETS: Final = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
WAIT_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
# The turn's marks (bot/conversation/records.py) measured here, after its speech_end.
STAGES: Final = ("endpoint", "stt_done", "llm_first_token", "tts_first_audio", "first_frame_out")
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, calls_in_progress: Callable[[], int] | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self.in_progress = Gauge("voicebot_calls_in_progress", "Calls now", registry=r)
        if calls_in_progress is not None:
            self.in_progress.set_function(lambda: float(calls_in_progress()))
        self.calls = Counter("voicebot_calls", "Calls ended, by reason", ["reason"], registry=r)
        self.turns = Counter("voicebot_turns", "Caller turns answered", registry=r)
        self.response = Histogram(
            "voicebot_response_seconds",
            "From the caller's last word to the answer's first frame on the line",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stages = Histogram(
            "voicebot_turn_stage_seconds",
            "From the caller's last word to each stage of the answer",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_wait = Histogram(
            "voicebot_engine_wait_seconds",
            "Time a reply waited for its engine (the LLM: a free sequence)",
            ["engine"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.underruns = Counter(
            "voicebot_playout_underruns", "An answer's audio ran out before it ended", registry=r
        )
        self.reanchors = Counter(
            "voicebot_playout_reanchors", "Playout fell behind and restarted its clock", registry=r
        )
        self.barge_ins = Counter(
            "voicebot_barge_ins", "The caller spoke over the bot and stopped it", registry=r
        )
        self.interrupted = Counter(
            "voicebot_replies_interrupted", "Answers cut short by the caller", registry=r
        )
        self.busy = Counter(
            "voicebot_busy_rejections", "Calls refused: every line busy", registry=r
        )
        self.failures = Counter(
            "voicebot_engine_failures", "Calls ended by an engine failure (apology)", registry=r
        )

    def observe(self, record: dict[str, Any]) -> None:
        """One call-log event."""
        event = record.get("event")
        if event == "turn":
            self._turn(record)
        elif event == "call_end":
            self.calls.labels(reason=str(record.get("reason", "unknown"))).inc()
            self.reanchors.inc(int(record.get("playout_reanchors", 0)))
        elif event == "barge_in":
            self.barge_ins.inc()
        elif event == "busy":
            self.busy.inc()
        elif event == "apology":
            self.failures.inc()

    def _turn(self, record: dict[str, Any]) -> None:
        marks = record.get("marks_ms") or {}
        if not record.get("reply") or "first_frame_out" not in marks:
            return  # a turn that got no answer on the line has no latency
        self.turns.inc()
        self.response.observe(marks["first_frame_out"] / 1000)
        for stage in STAGES:
            if stage in marks:
                self.stages.labels(stage=stage).observe(marks[stage] / 1000)
        if "llm_wait_ms" in record:
            self.engine_wait.labels(engine="llm").observe(record["llm_wait_ms"] / 1000)
        self.underruns.inc(int(record.get("underruns", 0)))
        if record.get("interrupted"):
            self.interrupted.inc()

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
