"""The caller simulator against the echo profile and scripted bots, over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bot.asterisk import audiosocket as p
from bot.asterisk.server import Session
from bot.audio import frame_bytes, is_silent, silence, write_wav
from bot.call import Call
from bot.calllog import list_calls, read_call
from bot.tools.simulator import CallerSimulator, DtmfAt, interval_stats, max_in_window

from .conftest import ROOT, chirps, make_settings, running_server, tone


def run_call(settings, sim_kwargs, handle=None):  # type: ignore[no-untyped-def]
    async def main() -> CallerSimulator:
        async with running_server(settings, handle) as server:
            sim = CallerSimulator("127.0.0.1", server.address[1], **sim_kwargs)
            await sim.run()
            return sim

    return asyncio.run(main())


@pytest.mark.parametrize(("rate", "delay_ms"), [(8000, 300), (16000, 120)])
def test_echo_returns_the_callers_audio_at_the_set_delay(
    calls_dir: Path, rate: int, delay_ms: int
) -> None:
    settings = make_settings(calls_dir, VOICEBOT_PROFILES_ECHO_DELAY_MS=str(delay_ms))
    speech = chirps(1.0, rate)
    sim = run_call(settings, {"turns": [speech], "rate": rate, "greeting_wait": 0.2, "quiet": 0.5})
    report = sim.report
    assert report.ended_by == "caller"
    assert set(report.rx_frame_sizes) == {frame_bytes(rate)}
    # The echo is bit-exact: the caller's speech is in the recording, whole.
    received, sent = bytes(sim.received), bytes(sim.sent_audio)
    at_rx, at_tx = received.find(speech), sent.find(speech)
    assert at_rx >= 0 and at_tx >= 0 and at_rx % 2 == 0
    # On the wire: the first frame of speech came back `delay` after it left, within two frames
    # (the playout clock writes a little ahead; the caller's frames arrive on their own tick).
    frame = frame_bytes(rate)
    sent_at = report.turns[0].speech_start
    back_at = sim.rx_times[at_rx // frame]
    assert delay_ms - 60 <= (back_at - sent_at) * 1000 <= delay_ms + 60
    # In the recording: the same speech sits `delay` later than in what was sent, give or take
    # the frames the playout clock had written before the first caller frame arrived.
    lag_ms = (at_rx - at_tx) / 2 / rate * 1000
    assert delay_ms <= lag_ms <= delay_ms + 120


def test_outbound_frames_are_paced_at_20ms_without_bursts(calls_dir: Path) -> None:
    settings = make_settings(calls_dir)
    sim = run_call(settings, {"duration": 3.0, "record": False})
    report = sim.report
    assert set(report.rx_frame_sizes) == {320}
    # ~3 s of calls at one frame per 20 ms (plus the few frames of lead written at the start).
    assert 140 <= report.frames_received <= 160
    iv = report.rx_interval_ms
    assert 19.0 <= iv["mean"] <= 21.0
    assert 15.0 <= iv["p50"] <= 25.0
    # Steady state: never more than a few frames inside one 20 ms window.
    assert report.max_frames_in_20ms <= 4


def test_dtmf_is_injected_as_asterisk_does_and_reaches_the_call_log(calls_dir: Path) -> None:
    settings = make_settings(calls_dir)
    run_call(settings, {"dtmf": [DtmfAt.parse("1@0.2"), DtmfAt.parse("#@0.4")], "record": False})
    [folder] = list(list_calls(calls_dir))
    events = read_call(folder).events
    digits = [(e["digit"], e["t"]) for e in events if e["event"] == "dtmf"]
    assert [d for d, _ in digits] == ["1", "#"]
    assert 0.15 <= digits[0][1] <= 0.35 and 0.35 <= digits[1][1] <= 0.55
    # Asterisk hangs up by closing the connection; the simulator never sends a 0x00 frame.
    assert events[-1]["reason"] == "caller hung up"


def answering_bot(settings: Any, after: float) -> Any:
    """A session handler whose call answers a 0.5 s tone ``after`` seconds into each pause."""

    async def answers(call: Call) -> None:
        heard_speech = False
        while True:
            frame = await call.next_audio()
            if not is_silent(frame.pcm):
                heard_speech = True
            elif heard_speech:
                # Speech ended one frame ago: answer after the rest of the pause.
                await call.play(silence(8000, after - 0.02) + tone(700, 0.5))
                heard_speech = False

    async def handle(session: Session) -> None:
        await Call(session, "t", settings.profile("echo"), settings, behaviour=answers).run()

    return handle


def test_response_latency_is_measured_from_the_end_of_speech(calls_dir: Path) -> None:
    """A scripted bot answers 400 ms after the caller's last voiced frame arrived."""
    settings = make_settings(calls_dir)
    answer_after = 0.4
    turns = [tone(400, 0.6), tone(500, 0.8)]
    handle = answering_bot(settings, answer_after)
    sim = run_call(settings, {"turns": turns, "greeting_wait": 0.2, "quiet": 0.4}, handle)
    results = sim.report.turns
    assert len(results) == 2
    for r in results:
        assert r.response_latency_ms is not None
        # The bot writes 60 ms ahead of real time; the simulator reads each frame on arrival.
        assert answer_after * 1000 - 100 <= r.response_latency_ms <= answer_after * 1000 + 100
        assert 0.4 <= r.reply_seconds <= 0.6
        assert r.talk_over_frames == 0
    assert results[1].speech_start > results[0].speech_end + 0.4  # waited for the reply


def test_a_talk_over_is_the_bot_speaking_between_the_callers_first_and_last_sound(
    calls_dir: Path,
) -> None:
    """An answer into a pause inside the turn talks over the caller; one into the quiet after
    the last word (still sent as part of the turn: a voice's silent tail) does not."""
    settings = make_settings(calls_dir)
    paused = tone(400, 0.5) + silence(8000, 0.7) + tone(500, 0.6)
    tail = tone(400, 0.6) + silence(8000, 1.2)
    handle = answering_bot(settings, 0.3)
    sim = run_call(settings, {"turns": [paused, tail], "greeting_wait": 0.2, "quiet": 0.4}, handle)
    into_pause, after_tail = sim.report.turns
    assert into_pause.talk_over_frames >= 10  # the bot's 0.5 s tone over the second tone
    assert after_tail.talk_over_frames == 0
    assert after_tail.response_latency_ms is not None and after_tail.response_latency_ms < 600


def test_a_caller_says_a_turn_again_when_its_hook_asks_after_the_reply(calls_dir: Path) -> None:
    """The ``again`` hook sees each turn once its reply is measured; a clip it returns is said
    before the next turn, answered and measured like any turn, and marked as said again."""
    settings = make_settings(calls_dir)
    seen: list[tuple[int, bool, float | None]] = []
    slower = tone(400, 0.9)

    async def again(turn: Any) -> bytes | None:
        seen.append((turn.index, turn.again, turn.response_latency_ms))
        return slower if turn.index == 0 and not turn.again else None

    turns = [tone(400, 0.6), tone(500, 0.6)]
    kwargs = {"turns": turns, "greeting_wait": 0.2, "quiet": 0.4, "again": again}
    sim = run_call(settings, kwargs, answering_bot(settings, 0.3))
    assert [(index, said_again) for index, said_again, _ in seen] == [(0, False), (1, False)]
    assert all(latency is not None for _, _, latency in seen)  # asked after the reply
    first, repeat, second = sim.report.turns
    assert (first.index, repeat.index, second.index) == (0, 0, 1)
    assert (first.again, repeat.again, second.again) == (False, True, False)
    assert repeat.speech_end - repeat.speech_start == pytest.approx(0.9, abs=0.03)
    assert repeat.response_latency_ms is not None and repeat.response_latency_ms < 600
    assert repeat.speech_start > first.speech_end + 0.3 and second.speech_start > repeat.speech_end


def mute_bot(settings: Any) -> Any:
    """A session handler whose call listens and never answers."""

    async def mute(call: Call) -> None:
        while True:
            await call.next_audio()

    async def handle(session: Session) -> None:
        await Call(session, "mute", settings.profile("echo"), settings, behaviour=mute).run()

    return handle


def test_a_rooms_noise_is_under_the_whole_call_and_the_speech_end_is_the_callers(
    calls_dir: Path,
) -> None:
    """The background is mixed into every frame, silence and turns alike; a turn still ends
    where its own speech ends, and the bot hears exactly speech plus noise."""
    settings = make_settings(calls_dir)
    handle = mute_bot(settings)

    room = tone(300, 0.5, level=0.05)  # a loop shorter than the call
    turn = silence(8000, 0.2) + tone(400, 0.6)
    sim = run_call(
        settings,
        {"turns": [turn], "greeting_wait": 0, "answer_timeout": 0.6, "background": room},
        handle,
    )
    size = frame_bytes(8000)
    sent = bytes(sim.sent_audio)
    assert not any(is_silent(sent[i : i + size]) for i in range(0, len(sent), size))
    result = sim.report.turns[0]
    start = result.first_frame * size
    speech = np.frombuffer(sent[start : start + len(turn)], "<i2").astype(np.int32)
    at = start // 2 % (len(room) // 2)
    loop = np.frombuffer(room, "<i2").astype(np.int32)
    noise_part = loop[(at + np.arange(len(speech))) % len(loop)]
    clean = np.frombuffer(turn, "<i2").astype(np.int32)
    assert np.array_equal(speech, np.clip(clean + noise_part, -32768, 32767))
    assert result.speech_end - result.speech_start == pytest.approx(0.8, abs=0.03)


def test_a_turn_without_an_answer_is_reported_missed(calls_dir: Path) -> None:
    settings = make_settings(calls_dir)
    handle = mute_bot(settings)

    sim = run_call(
        settings, {"turns": [tone(400, 0.3)], "greeting_wait": 0, "answer_timeout": 0.5}, handle
    )
    assert sim.report.turns[0].response_latency_ms is None


def test_bot_hangup_frame_ends_the_simulated_call(calls_dir: Path) -> None:
    settings = make_settings(calls_dir)

    async def bye(call: Call) -> None:
        await call.play(tone(300, 0.1))

    async def handle(session: Session) -> None:
        await Call(session, "bye", settings.profile("echo"), settings, behaviour=bye).run()

    sim = run_call(settings, {"duration": 5.0}, handle)
    assert sim.report.ended_by == "bot"
    assert sim.report.duration < 2.0


def test_simulator_reports_a_bot_that_breaks_the_protocol() -> None:
    async def main() -> str:
        async def bot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(19)
            writer.write(p.encode_frame(p.Kind.DTMF, b"5"))  # Asterisk would hang up on this
            await writer.drain()
            await reader.read()

        server = await asyncio.start_server(bot, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            report = await CallerSimulator("127.0.0.1", port, duration=2.0).run()
        return report.ended_by

    assert (
        asyncio.run(main()) == "error: bot broke the protocol: DTMF frame from the server "
        "(Asterisk would hang up)"
    )


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="not 44100"):
        CallerSimulator("127.0.0.1", 1, rate=44100)
    with pytest.raises(ValueError, match="expected DIGIT@SECONDS"):
        DtmfAt.parse("1")
    with pytest.raises(ValueError, match="not a DTMF digit"):
        DtmfAt.parse("x@1")
    with pytest.raises(ValueError, match="not a number"):
        DtmfAt.parse("1@soon")


def test_interval_statistics() -> None:
    times = [0.0, 0.02, 0.04, 0.06, 0.061, 0.062, 0.1]
    stats = interval_stats(times)
    assert stats["max"] == pytest.approx(38.0) and stats["count"] == 6
    assert max_in_window(times, 0.02) == 3
    assert interval_stats([1.0]) == {}


def test_voicebot_serve_and_call_commands_end_to_end(tmp_path: Path) -> None:
    """The two commands a user runs: `voicebot serve` (echo) and `voicebot call` with a WAV."""
    wav = tmp_path / "hello.wav"
    write_wav(str(wav), chirps(0.8, 16000), 16000)  # resampled to the call's 8 kHz
    out = tmp_path / "bot.wav"
    env = {
        **os.environ,
        "VOICEBOT_CALLS_DIR": str(tmp_path / "calls"),
        "VOICEBOT_PROFILES_ECHO_DELAY_MS": "200",
        "VOICEBOT_HTTP_PORT": "0",
        "PYTHONUNBUFFERED": "1",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--port", "0", "--profile", "echo"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready = server.stdout.readline()
        assert "ready: AudioSocket echo on 127.0.0.1:" in ready
        port = int(ready.split("127.0.0.1:")[1].split(",")[0])
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bot",
                "call",
                f"127.0.0.1:{port}",
                str(wav),
                "--json",
                "--record",
                str(out),
                "--greeting-wait",
                "0.2",
                "--quiet",
                "0.5",
                "--uuid",
                str(uuid.UUID(int=7)),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["ended_by"] == "caller" and report["uuid"] == str(uuid.UUID(int=7))
        assert report["turns"][0]["response_latency_ms"] is not None
        assert out.stat().st_size > 44 + 2 * 8000  # over a second of 8 kHz audio recorded
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=15)
    assert server.returncode == 0, err
    listing = subprocess.run(
        [sys.executable, "-m", "bot", "calls", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    rows = json.loads(listing.stdout)
    assert len(rows) == 1 and rows[0]["end"] == "caller hung up"
    show = subprocess.run(
        [sys.executable, "-m", "bot", "calls", "show", "00000007"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "call_start" in show.stdout and "call_end" in show.stdout


def test_bench_pacing_serves_every_call_it_asks_for(tmp_path: Path) -> None:
    # More calls than the default [limits] max_calls: pacing is measured on calls, not on
    # busy prompts that end after a few seconds.
    run = subprocess.run(
        [sys.executable, "-m", "bot", "bench", "pacing", "--calls", "6", "--seconds", "6"]
        + ["--json", "--calls-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    [result] = json.loads(run.stdout)
    assert result["calls"] == 6
    assert min(result["frames_per_call"]) >= 290  # 6 s of 20 ms frames, every call
