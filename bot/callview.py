"""What an operator looks at of a call, read from its folder: a summary row, its turns with
their latency marks, what happened on its timeline, its recording's waveform.

Shared by the call inspector (bot/inspector.py) and ``voicebot calls``.
"""

from __future__ import annotations

import wave
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from .calllog import EVENTS_FILE, CallRecord, list_calls, read_call, started_at
from .recording import RECORDING_FILE

# The marks of a turn's waterfall, in the order the answer passes them (ms after speech_end).
WATERFALL: Final = (
    ("endpoint", "end of turn"),
    ("stt_done", "transcript"),
    ("llm_first_token", "first token"),
    ("first_clause", "first clause"),
    ("tts_first_audio", "first audio"),
    ("first_frame_out", "first frame out"),
)
# Events shown on a call's timeline.
NOTABLE: Final = frozenset(
    {
        "greeting",
        "barge_in",
        "transfer",
        "transfer_failed",
        "transfer_unavailable",
        "apology",
        "error",
        "warning",
        "dtmf",
        "busy",
        "turn_discarded",
        "call_end",
    }
)
WAVE_POINTS: Final = 1200


def summary(record: CallRecord, state: str | None = None) -> dict[str, Any]:
    """One row of the call list. ``state``: the live call's state (None: not live)."""
    start, end = record.start, record.end or {}
    began = started_at(record.folder)
    answered = [e for e in record.events if e["event"] == "turn" and e.get("marks_ms")]
    latencies = [
        t["marks_ms"]["first_frame_out"] for t in answered if "first_frame_out" in t["marks_ms"]
    ]
    return {
        "id": record.folder.name,
        "started": began.isoformat() if began else None,
        "profile": start.get("profile"),
        "peer": start.get("peer"),
        "live": state is not None,
        "state": state,
        "duration": _duration(record, began, state),
        "turns": sum(1 for e in record.events if e["event"] == "turn"),
        "end": end.get("reason"),
        "worst_ms": max(latencies, default=None),
        "recording": (record.folder / RECORDING_FILE).is_file(),
    }


def _duration(record: CallRecord, began: datetime | None, state: str | None) -> float:
    """The call's length; a live call's so far (to the second, from its folder's name)."""
    end = record.end
    if end is not None and "duration" in end:
        return float(end["duration"])
    if state is not None and began is not None:
        return round((datetime.now(UTC) - began).total_seconds(), 1)
    return float(record.events[-1]["t"]) if record.events else 0.0


Cache = dict[str, tuple[tuple[int, str | None], dict[str, Any]]]


def summaries(
    root: Path, live: dict[str, str], limit: int = 200, cache: Cache | None = None
) -> list[dict[str, Any]]:
    """Live calls first (with their state and length so far), then the most recent ones.
    ``cache`` keeps the ended calls' rows between calls: read again only when a log grew."""
    rows: list[dict[str, Any]] = []
    for folder in list_calls(root):
        name = folder.name
        if len(rows) >= limit and name not in live:
            continue
        try:
            key = ((folder / EVENTS_FILE).stat().st_mtime_ns, live.get(name))
            if cache is not None and name not in live and cache.get(name, (None,))[0] == key:
                rows.append(cache[name][1])
                continue
            row = summary(read_call(folder), live.get(name))
        except (OSError, ValueError):
            continue  # a folder being removed, or a log that is not JSON
        if cache is not None:
            cache[name] = (key, row)
        rows.append(row)
    return sorted(rows, key=lambda r: not r["live"])


def turns(record: CallRecord) -> list[dict[str, Any]]:
    """Each turn: when (``at_s`` on the call's timeline), words, reply, waterfall."""
    out = []
    for e in record.events:
        if e["event"] != "turn":
            continue
        marks = e.get("marks_ms") or {}
        out.append(
            {
                "index": e.get("index"),
                "at_s": e.get("at_s"),
                "transcript": e.get("transcript", ""),
                "reply": e.get("reply", ""),
                "interrupted": bool(e.get("interrupted")),
                "asked_again": e.get("misheard") is not None or bool(e.get("unanswered")),
                "waterfall": [
                    {"mark": mark, "label": label, "ms": marks[mark]}
                    for mark, label in WATERFALL
                    if mark in marks
                ],
            }
        )
    return out


def timeline(record: CallRecord) -> list[dict[str, Any]]:
    """The notable events: greeting, barge-ins, transfers, errors, DTMF, the end."""
    out = []
    for e in record.events:
        if e["event"] in NOTABLE:
            detail = {k: v for k, v in e.items() if k not in ("t", "event")}
            out.append({"t": e["t"], "event": e["event"], "detail": detail})
    return out


def waveform(path: Path, points: int = WAVE_POINTS) -> dict[str, Any]:
    """The recording's peaks, ``points`` per channel in [0, 1], and its length."""
    with wave.open(str(path)) as w:
        rate, frames = w.getframerate(), w.getnframes()
        samples = np.frombuffer(w.readframes(frames), dtype="<i2").reshape(-1, w.getnchannels())
    peaks: list[list[float]] = []
    for channel in range(samples.shape[1]):
        x = np.abs(samples[:, channel].astype(np.float32)) / 32768.0
        usable = len(x) // points * points
        if usable:
            buckets = x[:usable].reshape(points, -1).max(axis=1)
        else:
            buckets = np.pad(x, (0, points - len(x)))
        peaks.append([round(float(v), 3) for v in buckets])
    return {"seconds": frames / rate if rate else 0.0, "left": peaks[0], "right": peaks[-1]}


def waterfall_text(turn: dict[str, Any], width: int = 40) -> list[str]:
    """A turn's waterfall as text bars: each mark's time after the caller's last word."""
    steps = turn["waterfall"]
    if not steps:
        return ["  (no answer)"]
    most = max(s["ms"] for s in steps) or 1.0
    lines = []
    for s in steps:
        bar = "#" * max(1, round(width * s["ms"] / most)) if s["ms"] > 0 else ""
        lines.append(f"  {s['label']:<16}{s['ms']:>7.0f} ms  {bar}")
    return lines
