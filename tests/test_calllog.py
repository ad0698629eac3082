from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.calllog import EVENTS_FILE, SUMMARY_FILE, CallLog, list_calls, read_call


def test_log_folder_events_and_summary(tmp_path: Path) -> None:
    log = CallLog(tmp_path, "abc")
    assert log.folder.parent == tmp_path and log.folder.name.endswith("-abc")
    log.event("call_start", peer="1.2.3.4:5")
    log.event("dtmf", digit="1")
    # Written as it happens, not at the end: a crash loses nothing already logged.
    lines = (log.folder / EVENTS_FILE).read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["call_start", "dtmf"]
    log.close("caller hung up", frames_in=3)
    log.close("again")  # a second close changes nothing
    record = read_call(log.folder)
    assert [e["event"] for e in record.events] == ["call_start", "dtmf", "call_end"]
    assert record.end == {**record.events[-1], "reason": "caller hung up", "frames_in": 3}
    assert "caller hung up" in (log.folder / SUMMARY_FILE).read_text()
    with pytest.raises(RuntimeError, match="is closed"):
        log.event("late")


def test_a_call_still_being_logged_reads_up_to_its_last_whole_line(tmp_path: Path) -> None:
    log = CallLog(tmp_path, "abc")
    log.event("call_start", peer="1.2.3.4:5")
    with (log.folder / EVENTS_FILE).open("a") as fh:
        fh.write('{"t": 1.5, "event": "tu')  # the line being written as it is read
    assert [e["event"] for e in read_call(log.folder).events] == ["call_start"]


def test_calls_are_listed_newest_first(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    for hour in (9, 11, 10):
        CallLog(tmp_path, f"c{hour}", started=datetime(2026, 1, 1, hour, tzinfo=UTC)).close("x")
    assert [p.name[-3:] for p in list_calls(tmp_path)] == ["c11", "c10", "-c9"]
    assert list(list_calls(tmp_path / "missing")) == []


def test_a_repeated_uuid_never_shares_a_log(tmp_path: Path) -> None:
    started = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    logs = [CallLog(tmp_path, "same-uuid", started=started) for _ in range(3)]
    for i, log in enumerate(logs):
        log.event("call_start", n=i)
        log.close("caller hung up")
    assert len({log.folder for log in logs}) == 3
    for i, log in enumerate(logs):
        assert [e["event"] for e in read_call(log.folder).events] == ["call_start", "call_end"]
        assert read_call(log.folder).events[0]["n"] == i
