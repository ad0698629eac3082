"""Call recordings: call.wav, stereo, both sides on the line's timeline, written as the call
goes, readable after a crash; old call folders pruned."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import wave
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bot.app import Bot, tidy_calls
from bot.audio import FRAME_SECONDS, float_to_pcm
from bot.calllog import list_calls, prune, read_call
from bot.recording import HEADER_BYTES, RECORDING_FILE, Recorder, header, repair
from bot.tools.simulator import CallerSimulator
from bot.tools.subserver import free_port

from .conftest import make_settings

RATE = 8000
FRAME = int(RATE * FRAME_SECONDS)


def tone(frames: int, hz: float = 440.0) -> bytes:
    t = np.arange(frames * FRAME) / RATE
    return float_to_pcm(0.5 * np.sin(2 * np.pi * hz * t))


def channels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, RATE)
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
    return samples[:, 0], samples[:, 1]


def voiced_from(x: np.ndarray) -> int:
    """The first sample of sound."""
    return int(np.argmax(np.abs(x) > 1000))


def test_each_side_lands_on_the_slot_it_was_heard_in(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / RECORDING_FILE, RATE, start=100.0, lead_frames=3)
    silent, loud = bytes(FRAME * 2), tone(1)
    late = {55: 0.035, 56: 0.015}  # a jittery frame, and the one in its burst
    for _ in range(3):  # the playout's start: its lead written at once
        rec.bot(100.0, silent, RATE)
    for i in range(200):  # 4 s
        t = 100.0 + i * FRAME_SECONDS
        rec.bot(t, loud if i == 120 else silent, RATE)  # then one frame each 20 ms
        if not 100 <= i < 150:  # a phone with DTX sends nothing for a second
            sound = loud if 50 <= i < 60 or i == 160 else silent
            rec.caller(t + late.get(i, 0.001), sound, RATE)
    rec.close()
    left, right = channels(tmp_path / RECORDING_FILE)
    assert len(left) == pytest.approx(4 * RATE, abs=5 * FRAME)
    loud_left = sorted({i // FRAME for i in np.flatnonzero(np.abs(left) > 1000)})
    assert loud_left == [*range(50, 60), 160]  # the late frames in their slots; none shifted
    # The bot's frame where it went out on the line: Asterisk plays what arrives.
    assert sorted({i // FRAME for i in np.flatnonzero(np.abs(right) > 1000)}) == [120]


def test_a_recording_is_readable_while_the_call_goes_on(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / RECORDING_FILE, RATE, start=0.0)
    for i in range(150):  # 3 s, never closed: a server killed now
        rec.caller(i * FRAME_SECONDS, tone(1), RATE)
        rec.bot(i * FRAME_SECONDS, bytes(FRAME * 2), RATE)
    left, _ = channels(tmp_path / RECORDING_FILE)
    assert 2.0 - 0.2 <= len(left) / RATE <= 3.0  # at most the last second (and the lag) lost


def test_repair_gives_a_cut_off_recording_the_header_of_its_length(tmp_path: Path) -> None:
    path = tmp_path / RECORDING_FILE
    path.write_bytes(header(RATE, 0) + bytes(4 * RATE) + b"\x01\x02")  # 1 s and a torn sample
    assert repair(path)
    with wave.open(str(path)) as w:
        assert w.getnframes() == RATE
    assert path.stat().st_size == HEADER_BYTES + 4 * RATE
    assert not repair(path)  # nothing more to fix


def test_a_recording_that_cannot_be_written_stops_and_says_why(tmp_path: Path) -> None:
    why: list[str] = []
    missing = Recorder(tmp_path / "gone" / RECORDING_FILE, RATE, 0.0, on_error=why.append)
    missing.caller(0.0, tone(1), RATE)
    assert not missing.recording and "No such file or directory" in why[0]
    full = Recorder(Path("/dev/full"), RATE, 0.0, on_error=why.append)
    for i in range(200):
        full.caller(i * FRAME_SECONDS, tone(1), RATE)
    full.close()
    assert not full.recording and "No space left on device" in why[1] and len(why) == 2


def test_an_echo_call_is_recorded_as_the_caller_heard_it(calls_dir: Path) -> None:
    settings = make_settings(calls_dir, VOICEBOT_SERVER_PORT="0")  # echo, 500 ms delay
    speech = tone(25)  # half a second of sound
    sim: CallerSimulator | None = None

    async def main() -> None:
        nonlocal sim
        bot = Bot(settings)
        await bot.start()
        try:
            port = bot.servers["echo"].address[1]
            sim = CallerSimulator("127.0.0.1", port, [speech], greeting_wait=0.5, quiet=1.5)
            await sim.run()
        finally:
            await bot.close(grace=2)

    asyncio.run(main())
    assert sim is not None
    # On the wire, as the caller (Asterisk) had it: the speech left, and its echo arrived.
    sent_at = sim.report.turns[0].speech_start
    back_at = sim.rx_times[bytes(sim.received).find(speech) // (2 * FRAME)]
    [folder] = list_calls(calls_dir)
    end = read_call(folder).end
    assert end is not None and end["recording"] == RECORDING_FILE
    left, right = channels(folder / RECORDING_FILE)
    assert end["recording_s"] == pytest.approx(len(left) / RATE, abs=0.01)
    recorded = (voiced_from(right) - voiced_from(left)) / RATE
    assert recorded == pytest.approx(back_at - sent_at, abs=2 * FRAME_SECONDS)
    assert recorded == pytest.approx(0.5, abs=0.1)  # the echo's delay


def test_record_false_records_nothing(calls_dir: Path) -> None:
    settings = make_settings(calls_dir, VOICEBOT_SERVER_PORT="0", VOICEBOT_CALLS_RECORD="false")

    async def main() -> None:
        bot = Bot(settings)
        await bot.start()
        try:
            port = bot.servers["echo"].address[1]
            await CallerSimulator("127.0.0.1", port, [], duration=0.5).run()
        finally:
            await bot.close(grace=2)

    asyncio.run(main())
    [folder] = list_calls(calls_dir)
    assert not (folder / RECORDING_FILE).exists()
    end = read_call(folder).end
    assert end is not None and "recording" not in end


def test_a_killed_server_leaves_a_readable_recording_fixed_at_the_next_start(
    calls_dir: Path,
) -> None:
    port = free_port()
    env = {**os.environ, "VOICEBOT_CALLS_DIR": str(calls_dir), "VOICEBOT_HTTP_PORT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--port", str(port), "--profile", "echo"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None and "ready" in server.stdout.readline()

        async def call() -> None:
            sim = CallerSimulator("127.0.0.1", port, [], duration=30)
            task = asyncio.ensure_future(sim.run())
            await asyncio.sleep(2.5)  # the call's length before the crash, not a synchronisation
            server.send_signal(signal.SIGKILL)
            await task

        asyncio.run(call())
    finally:
        server.kill()
        server.wait()
    [folder] = list_calls(calls_dir)
    assert read_call(folder).end is None  # killed: no call_end
    wav = folder / RECORDING_FILE
    left, _ = channels(wav)
    assert 1.0 <= len(left) / RATE <= 2.5  # readable as it is: all but the last second
    old = time.time() - 3600
    os.utime(wav, (old, old))  # long quiet: no live call's
    settings = make_settings(calls_dir)
    with wave.open(str(wav)) as w:
        before = w.getnframes()
    tidy_calls(settings)  # what the next start does
    with wave.open(str(wav)) as w:
        assert w.getnframes() >= before
    assert (wav.stat().st_size - HEADER_BYTES) % 4 == 0


def test_old_call_folders_are_removed_after_keep_days(calls_dir: Path) -> None:
    for name in ("20261101-120000-old", "20261205-120000-recent", "20261206-090000-today"):
        (calls_dir / name).mkdir(parents=True)
        (calls_dir / name / "events.jsonl").write_text("")
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    assert prune(calls_dir, 0, now) == []  # 0: keep all
    assert [p.name for p in prune(calls_dir, 7, now)] == ["20261101-120000-old"]
    assert sorted(p.name for p in calls_dir.iterdir()) == [
        "20261205-120000-recent",
        "20261206-090000-today",
    ]


def test_a_call_whose_recording_fails_goes_on_and_its_log_says_why(
    calls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bot.call

    def on_a_full_disk(path: Path, *args: Any, **kwargs: Any) -> Recorder:
        return Recorder(Path("/dev/full"), *args, **kwargs)  # every write: ENOSPC

    monkeypatch.setattr(bot.call, "Recorder", on_a_full_disk)
    settings = make_settings(calls_dir, VOICEBOT_SERVER_PORT="0")
    speech = tone(25)

    async def main() -> None:
        bot_ = Bot(settings)
        await bot_.start()
        try:
            port = bot_.servers["echo"].address[1]
            sim = CallerSimulator("127.0.0.1", port, [speech], greeting_wait=0.5, quiet=1.5)
            report = await sim.run()
            assert report.ended_by == "caller" and bytes(sim.received).find(speech) >= 0
        finally:
            await bot_.close(grace=2)

    asyncio.run(main())
    [folder] = list_calls(calls_dir)
    events = read_call(folder).events
    [warning] = [e for e in events if e["event"] == "warning"]
    assert warning["message"].startswith("recording stopped: No space left on device")
    assert events[-1]["event"] == "call_end" and events[-1]["reason"] == "caller hung up"
    assert "recording" not in events[-1]
