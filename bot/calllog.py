"""Per-call logs: one folder per call, named by start time and AudioSocket UUID.

``events.jsonl`` holds one JSON object a line, written as things happen (so a crash loses at
most the line being written): ``t`` is seconds since the call started on the monotonic clock,
``event`` its name, then the event's fields. ``summary.txt`` is written when the call ends, for
people. Every call's log ends with exactly one ``call_end`` event carrying the reason.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TextIO

log = logging.getLogger(__name__)

EVENTS_FILE: Final = "events.jsonl"
SUMMARY_FILE: Final = "summary.txt"


class CallLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the call's UUID, so interleaved calls stay readable."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        call = self.extra.get("call", "-") if self.extra else "-"
        return f"[{call}] {msg}", kwargs


Observer = Callable[[dict[str, Any]], None]


class CallLog:
    """``observer``: told every event as it is written (the process's metrics)."""

    def __init__(
        self,
        root: str | Path,
        call_id: str,
        *,
        started: datetime | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.started = started or datetime.now(UTC)
        self._observer = observer
        self._t0 = time.monotonic()
        self.call_id = call_id
        base = Path(root) / f"{self.started:%Y%m%d-%H%M%S}-{call_id}"
        base.parent.mkdir(parents=True, exist_ok=True)
        # A UUID is unique per call from Asterisk, but a peer may repeat one: never share a log.
        self.folder = base
        for n in range(2, 10_000):
            try:
                self.folder.mkdir()
                break
            except FileExistsError:
                self.folder = base.with_name(f"{base.name}-{n}")
        self._fh: TextIO | None = (self.folder / EVENTS_FILE).open("a", encoding="utf-8")
        self._events: list[dict[str, Any]] = []
        self.closed = False

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def event(self, name: str, **fields: Any) -> dict[str, Any]:
        if self._fh is None:
            raise RuntimeError(f"call log {self.folder} is closed; cannot record {name!r}")
        record = {"t": round(self.elapsed(), 4), "event": name, **fields}
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()
        self._events.append(record)
        if self._observer is not None:
            self._observer(record)
        return record

    def close(self, reason: str, **fields: Any) -> None:
        """Record the end of the call and write the summary; a second close does nothing."""
        if self.closed:
            return
        self.event("call_end", reason=reason, **fields)
        self.closed = True
        assert self._fh is not None
        self._fh.close()
        self._fh = None
        (self.folder / SUMMARY_FILE).write_text(render_summary(self._events), encoding="utf-8")


def render_summary(events: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for e in events:
        fields = ", ".join(f"{k}={v}" for k, v in e.items() if k not in {"t", "event"})
        lines.append(f"{e['t']:9.3f}s  {e['event']:<12} {fields}".rstrip())
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class CallRecord:
    folder: Path
    events: list[dict[str, Any]]

    @property
    def start(self) -> dict[str, Any]:
        return next((e for e in self.events if e["event"] == "call_start"), {})

    @property
    def end(self) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e["event"] == "call_end"), None)


def read_call(folder: str | Path) -> CallRecord:
    """A call's events so far: a call still going on (or cut off by a crash) may have its last
    line half written, and that line is not an event yet."""
    folder = Path(folder)
    events = []
    with (folder / EVENTS_FILE).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip() and line.endswith("\n"):
                events.append(json.loads(line))
    return CallRecord(folder, events)


def list_calls(root: str | Path) -> Iterator[Path]:
    """Call folders under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return iter(())
    return iter(sorted((p for p in root.iterdir() if (p / EVENTS_FILE).is_file()), reverse=True))


def started_at(folder: Path) -> datetime | None:
    """When a call began, from its folder's name (``YYYYmmdd-HHMMSS-<uuid>``, UTC)."""
    try:
        return datetime.strptime(folder.name[:15], "%Y%m%d-%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def prune(root: str | Path, keep_days: int, now: datetime | None = None) -> list[Path]:
    """Removes the call folders that began more than ``keep_days`` ago (0: none); returns
    them. A folder it cannot remove is logged and left."""
    if keep_days <= 0:
        return []
    cutoff = (now or datetime.now(UTC)) - timedelta(days=keep_days)
    removed = []
    for folder in list_calls(root):
        began = started_at(folder)
        if began is not None and began < cutoff:
            try:
                shutil.rmtree(folder)
            except OSError as exc:
                log.warning("cannot remove old call %s: %s", folder, exc.strerror or exc)
                continue
            removed.append(folder)
    return removed
