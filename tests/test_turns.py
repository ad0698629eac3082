"""Turn detection frame by frame with a scripted VAD: onset, pre-roll, pauses, hangover, gate."""

from __future__ import annotations

import numpy as np
import pytest

from bot.config import TurnSettings
from bot.conversation.turns import (
    HEARING_S,
    BargeIn,
    Discarded,
    EndOfTurn,
    NoiseFloor,
    Paused,
    Resumed,
    SpeechStarted,
    TurnDetector,
    WebRtcVad,
    level_dbfs,
    looks_complete,
)

V = b"\x01" + bytes(319)  # the scripted VAD calls this voiced
S = bytes(320)


# The frame positions below were worked out for these timings.
# The scripted frames have no level to speak of: the noise gate is tested on real signals below.
BASE = {"pause_ms": 160, "hangover_ms": 500, "hangover_complete_ms": 300, "noise_margin_db": 0.0}


class ScriptedVad:
    def is_speech(self, pcm: bytes, rate: int) -> bool:
        return pcm[0] == 1


def run(
    frames: list[bytes],
    settings: TurnSettings | None = None,
    gated: set[int] | None = None,
    hints: dict[int, bool | None] | None = None,
    *,
    barge_in: bool = False,
) -> list[tuple[int, object]]:
    det = TurnDetector(ScriptedVad(), 8000, settings or TurnSettings(**BASE), barge_in=barge_in)
    out = []
    for i, f in enumerate(frames):
        if hints and i in hints:
            det.hint_complete(hints[i])
        for ev in det.feed(f, i * 0.02, gated=bool(gated and i in gated)):
            out.append((i, ev))
    return out


def kinds(events: list[tuple[int, object]]) -> list[tuple[int, str]]:
    return [(i, type(e).__name__) for i, e in events]


def test_a_turn_starts_after_onset_and_keeps_its_pre_roll() -> None:
    frames = [S] * 20 + [bytes([2]) + bytes(319)] + [V] * 20 + [S] * 30
    events = run(frames)
    assert kinds(events)[0] == (23, "SpeechStarted")  # 3 voiced frames = 60 ms onset
    end = next(e for _, e in events if isinstance(e, EndOfTurn))
    # The 300 ms (15 frames) up to the onset are kept: the quiet frame marked 2 is in them.
    assert end.audio.startswith(S * 11 + bytes([2]) + bytes(319) + V)
    assert len(end.audio) == (15 + 17 + 5) * 320
    assert end.voiced_frames == 20 and end.reason == "hangover"
    assert end.speech_end == pytest.approx(40 * 0.02)


def test_pause_then_endpoint_after_the_default_hangover() -> None:
    events = run([V] * 10 + [S] * 40)
    assert kinds(events) == [(2, "SpeechStarted"), (17, "Paused"), (34, "EndOfTurn")]
    paused = events[1][1]
    assert isinstance(paused, Paused) and paused.speech_end == pytest.approx(9 * 0.02)
    end = events[2][1]
    assert isinstance(end, EndOfTurn)
    # Trailing silence beyond 100 ms is not sent to STT.
    assert len(end.audio) == (10 + 5) * 320


def test_speech_after_a_pause_resumes_the_same_turn() -> None:
    events = run([V] * 10 + [S] * 12 + [V] * 10 + [S] * 40)
    assert kinds(events) == [
        (2, "SpeechStarted"),
        (17, "Paused"),
        (22, "Resumed"),
        (39, "Paused"),
        (56, "EndOfTurn"),
    ]
    end = events[-1][1]
    assert isinstance(end, EndOfTurn) and end.voiced_frames == 20


@pytest.mark.parametrize(("hint", "end_frame"), [(True, 24), (False, 54), (None, 34)])
def test_hangover_adapts_to_whether_the_words_are_complete(
    hint: bool | None, end_frame: int
) -> None:
    # Pause detected at frame 17; the speculative transcript arrives at frame 20.
    events = run([V] * 10 + [S] * 60, hints={20: hint})
    assert kinds(events)[-1] == (end_frame, "EndOfTurn")


def test_a_pause_inside_a_sentence_does_not_end_the_turn_when_words_trail_off() -> None:
    # 400 ms pause after "... a table for two, and": the trailing-word hint holds the turn.
    events = run([V] * 20 + [S] * 20 + [V] * 15 + [S] * 50, hints={30: False, 60: True})
    assert [k for _, k in kinds(events)].count("EndOfTurn") == 1
    end = events[-1][1]
    assert isinstance(end, EndOfTurn) and end.voiced_frames == 35


def test_clicks_and_coughs_are_not_turns() -> None:
    events = run([V] * 5 + [S] * 40)  # 100 ms of sound
    assert kinds(events) == [(2, "SpeechStarted"), (12, "Paused"), (29, "Discarded")]
    d = events[-1][1]
    assert isinstance(d, Discarded) and "100 ms of speech is under 200 ms" in d.reason
    assert run([V, V, S] * 10) == []  # never 60 ms in a row: no onset at all


def test_a_monologue_still_gets_an_answer() -> None:
    events = run([V] * 400, TurnSettings(**BASE, max_utterance_s=5.0))
    end = next(e for _, e in events if isinstance(e, EndOfTurn))
    assert end.reason == "max length" and len(end.audio) == 250 * 320


def test_the_gate_keeps_the_bots_own_echo_from_starting_a_turn() -> None:
    gated = set(range(0, 60))
    events = run([V] * 60 + [S] * 10, gated=gated)
    assert events == []
    # After the gate opens, speech starts a turn again, without the echo in its pre-roll.
    events = run([V] * 60 + [S] * 5 + [V] * 10 + [S] * 40, gated=gated)
    assert kinds(events)[0] == (67, "SpeechStarted")
    end = events[-1][1]
    assert isinstance(end, EndOfTurn) and V * 11 not in end.audio[: 5 * 320]


def test_the_caller_is_heard_from_a_single_voiced_frame_outside_the_gate() -> None:
    det = TurnDetector(ScriptedVad(), 8000, TurnSettings(**BASE))
    det.feed(V, 0.0, gated=True)  # our own echo: not the caller
    assert not det.hearing(0.0)
    det.feed(S, 0.02)
    det.feed(V, 0.04)  # one voiced frame: no onset yet, but the caller may be starting
    det.feed(S, 0.06)
    assert not det.in_speech and det.hearing(0.06)
    assert det.hearing(0.04 + HEARING_S - 0.01) and not det.hearing(0.04 + HEARING_S)
    for i in range(3, 6):  # the onset: a turn
        det.feed(V, i * 0.02)
    assert det.in_speech and det.hearing(10.0)


def test_barge_in_after_sustained_speech_through_the_gate_keeps_the_words() -> None:
    settings = TurnSettings(**BASE, barge_in_ms=200)
    gated = set(range(0, 100))
    frames = [S] * 10 + [V, V, S] * 3 + [V] * 30 + [S] * 40
    events = run(frames, settings, gated=gated, barge_in=True)
    names = kinds(events)
    assert names[:2] == [(28, "BargeIn"), (28, "SpeechStarted")]  # 10 frames = 200 ms
    end = events[-1][1]
    assert isinstance(end, EndOfTurn) and end.voiced_frames == 30
    # Short bursts through the gate (under 200 ms) do not interrupt.
    assert run([V] * 9 + [S] * 5 + [V] * 9, settings, gated=set(range(30)), barge_in=True) == []


def test_barge_in_is_off_by_default() -> None:
    assert run([V] * 50, gated=set(range(50))) == []


@pytest.mark.parametrize(
    ("text", "complete"),
    [
        ("What is the capital of France?", True),
        ("I'd like to book a table.", None),
        ("I'd like to book a table for two,", False),
        ("and then I want to go to the", False),
        ("so um", False),
        ("Yes", None),
        ("", None),
    ],
)
def test_looks_complete(text: str, complete: bool | None) -> None:
    assert looks_complete(text) is complete


def test_webrtc_vad_tells_speech_from_silence() -> None:
    vad = WebRtcVad(3)
    t = np.arange(160) / 8000
    voiced = (0.3 * 32767 * np.sin(2 * np.pi * 200 * t) * np.sin(2 * np.pi * 3 * t)).astype("<i2")
    assert vad.is_speech(bytes(320), 8000) is False
    hits = sum(vad.is_speech(voiced.tobytes(), 8000) for _ in range(10))
    assert hits >= 5


def test_events_are_plain_data() -> None:
    assert SpeechStarted(1.0) == SpeechStarted(1.0)
    assert Resumed(2.0) != Resumed(3.0)
    assert BargeIn(0.5).t == 0.5


@pytest.mark.parametrize("rate", [8000, 16000])
def test_silero_vad_on_real_speech_silence_and_noise(rate: int) -> None:
    from bot.audio import float_to_pcm, resample
    from bot.conversation.turns import SileroVad
    from bot.engines.tts import PiperTts

    piper = PiperTts(progress=False)
    voice = np.concatenate(list(piper.synthesize("Hello, I would like to book a table.")))
    speech = float_to_pcm(resample(voice, piper.native_rate, rate))
    noise = float_to_pcm(np.random.default_rng(3).standard_normal(rate) * 0.01)  # -40 dBFS
    vad = SileroVad()
    frame = rate // 50 * 2

    def voiced_share(pcm: bytes) -> float:
        frames = [pcm[i : i + frame] for i in range(0, len(pcm) - frame + 1, frame)]
        return sum(vad.is_speech(f, rate) for f in frames) / len(frames)

    assert voiced_share(bytes(rate * 2)) == 0.0
    assert voiced_share(noise) < 0.1
    assert voiced_share(speech) > 0.5


# --- the noise gate, on real signals ---------------------------------------------------------


class AlwaysSpeech:
    """A VAD in babble: every frame sounds like speech to it."""

    def is_speech(self, pcm: bytes, rate: int) -> bool:
        return True


def noise_frames(seconds: float, dbfs: float, seed: int = 1) -> list[bytes]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(seconds * 8000)) * 32768 * 10 ** (dbfs / 20)
    pcm = np.clip(x, -32768, 32767).astype("<i2").tobytes()
    return [pcm[i : i + 320] for i in range(0, len(pcm), 320)]


def test_the_noise_floor_follows_the_background() -> None:
    floor = NoiseFloor()
    for frame in noise_frames(3.0, -40.0):
        floor.update(level_dbfs(frame))
    assert -43.0 < floor.level < -39.0
    for frame in noise_frames(5.0, -25.0):  # a louder room: the floor rises with it
        floor.update(level_dbfs(frame))
    assert -28.0 < floor.level < -24.0


def test_a_turn_ends_in_a_background_the_vad_takes_for_speech() -> None:
    """The caller (15 dB above the room) stops; the VAD never does. The turn still ends after
    the hangover, and the room alone starts no turn."""
    room = noise_frames(12.0, -35.0, seed=2)
    voice = noise_frames(1.5, -20.0, seed=3)
    frames = room[:100] + voice + room[100:]
    for margin, expect_end in ((9.0, True), (0.0, False)):
        det = TurnDetector(AlwaysSpeech(), 8000, TurnSettings(noise_margin_db=margin))
        ends, starts = [], []
        for i, frame in enumerate(frames[:400]):
            for event in det.feed(frame, i * 0.02):
                (ends if isinstance(event, EndOfTurn) else starts).append((i, event))
        if expect_end:
            assert [type(e).__name__ for _, e in starts] == ["SpeechStarted", "Paused"]
            ((at, end),) = ends
            assert end.reason == "hangover" and 100 + 75 + 30 <= at <= 100 + 75 + 36
        else:  # without the gate: one turn that never ends (the old behaviour)
            assert not ends and det.in_speech


def test_quiet_speech_on_a_quiet_line_is_still_heard() -> None:
    det = TurnDetector(AlwaysSpeech(), 8000, TurnSettings())
    frames = [bytes(320)] * 50 + noise_frames(1.0, -50.0) + [bytes(320)] * 50
    events = [e for i, f in enumerate(frames) for e in det.feed(f, i * 0.02)]
    assert any(isinstance(e, SpeechStarted) for e in events)
    assert any(isinstance(e, EndOfTurn) for e in events)
