"""`voicebot bench quality`: its lines (noise at a set SNR), its scoring, and one real call."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bot.audio import float_to_pcm
from bot.engines.stt import WhisperStt
from bot.tools import bench_quality, noise
from bot.tools.bench_quality import (
    ASKS,
    Ask,
    _answer,
    _asked_again,
    _facts_right,
    _repeats,
    _turns_heard,
    _with_again,
)
from bot.tools.scenarios import ESPEAK_VOICES, FLITE_VOICES, KOKORO_VOICES, Voices, phone_band
from bot.tools.simulator import TurnResult


def band_power(x: np.ndarray, lo: float, hi: float) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / 8000)
    return float(spectrum[(freqs >= lo) & (freqs < hi)].sum())


def test_pink_noise_has_equal_power_per_octave_inside_the_phone_band() -> None:
    x = noise.pink(10.0, seed=1)
    octaves = [band_power(x, f, 2 * f) for f in (400, 800, 1600)]
    assert max(octaves) / min(octaves) < 1.6  # within 2 dB
    assert band_power(x, 0, 290) == pytest.approx(0, abs=1e-6 * sum(octaves))


def test_a_background_is_scaled_to_the_snr_under_the_callers_speech() -> None:
    t = np.arange(16000) / 8000
    speech = [np.concatenate([np.zeros(4000), 0.2 * np.sin(2 * np.pi * 300 * t)])]
    rms = noise.voiced_rms(speech)  # the silent half does not count
    assert rms == pytest.approx(0.2 / np.sqrt(2), rel=0.01)
    for made in (noise.pink(3.0, 2), noise.babble([speech[0], speech[0][::-1]], 3.0, 3)):
        quiet = noise.at_snr(made, rms, 10.0)
        level = float(np.sqrt(np.mean(quiet.astype(np.float64) ** 2)))
        assert 20 * np.log10(rms / level) == pytest.approx(10.0, abs=0.01)
    tv = noise.tv(speech[0], 3.0, seed=4)
    assert len(tv) == 24000 and np.sqrt(np.mean(tv**2)) == pytest.approx(1.0)


def test_a_reply_is_scored_on_the_facts_it_holds() -> None:
    hours, address, number = ASKS[0], ASKS[1], ASKS[3]
    assert _facts_right(hours, "On Saturday we are open from 10 am to 4 pm.")
    assert not _facts_right(hours, "On Saturday we open at 10 am.")  # the closing time is missing
    assert not _facts_right(hours, "We open at 104.")  # a fact is a whole word
    assert _facts_right(address, "We are at 42 Harbour Road, by the station.")
    assert _facts_right(number, "Your customer number is 4 7 1 1.")
    assert _facts_right(number, "Your customer number is four seven one one.")
    assert _facts_right(Ask("How are you?"), "Fine, thanks.")  # no facts asked


def test_a_reply_that_says_the_callers_words_back_is_a_repeat() -> None:
    heard = "I would like to cancel my subscription, please."
    assert _repeats(heard, "I would like to cancel my subscription, please.")
    assert not _repeats(heard, "Of course, I can help you cancel it.")
    assert not _repeats("Thanks, bye.", "Thanks, bye!")  # a short goodbye may be said back


def test_each_caller_turn_is_scored_on_what_the_bot_logged_while_it_was_the_callers() -> None:
    def turn(t: float, heard: str) -> dict[str, object]:
        return {"t": t, "event": "turn", "transcript": heard, "reply": "ok"}

    events = [
        {"t": 0.0, "event": "greeting"},
        turn(6.0, "what are your hours"),
        {"t": 9.0, "event": "reply_ahead_dropped", "transcript": "my"},
        turn(10.0, "my number is"),  # the bot split the second turn at a pause
        turn(11.5, "4711"),
        turn(20.0, "bye"),
    ]
    heard = _turns_heard(events, [4.0, 9.5, 15.0])
    assert [[e["transcript"] for e in turns] for turns in heard] == [
        ["what are your hours"],
        ["my number is", "4711"],
        ["bye"],
    ]
    assert _turns_heard(events[:2], [4.0, 9.5]) == [[events[1]], []]  # a turn never heard


def test_a_question_said_again_counts_right_if_its_second_answer_is() -> None:
    hours = ASKS[0]
    heard = TurnResult(index=0, speech_start=4.0, speech_end=6.0, response_latency_ms=700.0)
    asked = {"t": 7.0, "transcript": "What are your opening our wrong?", "misheard": -1.1}
    first = _answer(hours, heard, [{**asked, "reply": "Sorry, could you say it again?"}], False)
    assert first["asked_again"] and not first["facts_right"]
    said_again = TurnResult(
        index=0, speech_start=9.0, speech_end=11.5, response_latency_ms=800.0, again=True
    )
    right = {"t": 12.0, "transcript": hours.text, "reply": "Saturday 10 am to 4 pm."}
    second = _answer(hours, said_again, [right], False)
    row = {**first, **_with_again(first, second)}
    assert row["facts_right"] and not row["facts_first_try"] and row["said_again"]
    assert row["heard_again"] == hours.text and row["latency_again_ms"] == 800.0
    alone = {**first, **_with_again(first, None)}
    assert not alone["facts_right"] and not alone["said_again"]


def test_the_caller_hears_it_was_asked_again_from_the_log_as_the_call_writes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_quality, "LOG_WAIT_S", 0.0)
    folder = tmp_path / "20261207-101500-c0ffee"
    folder.mkdir()
    events = [
        {"t": 7.0, "event": "turn", "transcript": "and also the unsung game", "misheard": -1.2},
        {"t": 12.0, "event": "turn", "transcript": "what are your hours", "reply": "10 to 4."},
    ]
    lines = [json.dumps(e) + "\n" for e in events]
    (folder / "events.jsonl").write_text("".join(lines) + '{"t": 20.0, "event": "tu')  # half

    def turn(start: float) -> TurnResult:
        return TurnResult(index=0, speech_start=start, speech_end=start + 2.0)

    assert asyncio.run(_asked_again(tmp_path, "c0ffee", turn(4.0)))
    assert not asyncio.run(_asked_again(tmp_path, "c0ffee", turn(9.0)))  # answered since
    assert not asyncio.run(_asked_again(tmp_path, "c0ffee", turn(14.0)))  # nothing logged yet
    assert not asyncio.run(_asked_again(tmp_path, "another-call", turn(4.0)))


def test_the_phone_band_keeps_speech_frequencies_and_a_pause_stays_quiet() -> None:
    t = np.arange(8000) / 8000
    burst = np.concatenate([np.zeros(8000), 0.5 * np.sin(2 * np.pi * 1000 * t), np.zeros(8000)])
    out = phone_band(burst, 8000)
    level = float(np.sqrt(np.mean(out[10000:14000] ** 2)))
    assert level == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
    # Quiet 30 ms away from the sound, on both sides (a brick wall left -45 dBFS everywhere).
    for quiet in (out[:7760], out[16240:]):
        assert np.max(np.abs(quiet)) < 10 ** (-80 / 20)
    for hz in (100, 3800):
        tone = phone_band(0.5 * np.sin(2 * np.pi * hz * t), 8000)[2000:6000]
        assert np.sqrt(np.mean(tone**2)) < 0.5 * 10 ** (-40 / 20)


def every_caller_voice() -> Voices:
    """The caller voices, espeak-ng's and flite's included (CI must have them; elsewhere the
    test is skipped without them)."""
    voices = Voices()
    if voices.espeak is None or voices.flite is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have every caller voice: apt-get install espeak-ng flite")
        pytest.skip("espeak-ng or flite is not installed")
    return voices


def test_the_caller_voices_are_every_engine_s_taking_turns_and_flite_is_heard() -> None:
    voices = every_caller_voice()
    names = voices.available("jm_kumo")
    assert "kokoro:jm_kumo" not in names  # never the bot's own voice
    assert len(names) == 1 + len(ESPEAK_VOICES) + len(FLITE_VOICES) + len(KOKORO_VOICES) - 1
    assert len({name.partition(":")[0] for name in names[:4]}) == 4  # four voices, four engines
    stt = WhisperStt(progress=False)
    for name in ("flite:slt", "flite:awb"):
        x = voices.say("What is the capital of France?", name)
        assert 1.0 < len(x) / 8000 < 4.0
        heard = stt.transcribe(float_to_pcm(x), 8000).text.lower()
        assert "capital" in heard and "france" in heard, (name, heard)


def test_a_caller_asked_to_say_it_again_says_it_slower() -> None:
    voices = every_caller_voice()
    text = "Can I talk to a person, please?"
    for name in ("piper", "espeak:en-us", "flite:slt"):
        # Piper draws its phoneme lengths at random (0.94-1.03 between two plain takes), so
        # each side is three takes; its pauses do not stretch, so slower is ~1.18, not 1.25.
        again = sum(len(voices.say(text, name, slower=True)) for _ in range(3))
        again /= sum(len(voices.say(text, name)) for _ in range(3))
        assert 1.1 < again < 1.4, (name, again)


def test_bench_quality_places_a_real_call_and_scores_it() -> None:
    """A real call on the clean line, to a bot that doubts every word it hears: it asks each
    question again, and the bench's caller says each once more, slower, and is heard."""
    clean = [c for c in bench_quality.CONDITIONS if c.name == "clean"]
    doubts = {"VOICEBOT_PROFILES_ASSISTANT_MISHEARD_BELOW": "0"}
    result = bench_quality.run(clean, env=doubts, progress=False)
    json.dumps(result)  # what --json prints
    questions = [
        t for t in result["turns"] if t["said"] not in {a.text for a in ASKS if a.transfer}
    ]
    assert len(questions) == len(ASKS) - 1
    for turn in questions:
        assert turn["asked_again"] and turn["said_again"], turn
        assert turn["latency_again_ms"] is not None and turn["heard_again"].strip(), turn
    row = result["conditions"]["clean"]
    assert row["asked_again"] == len(questions) and row["facts_first_try"] <= row["facts_right"]
    assert row["turns"] == len(ASKS) and row["answered"] >= len(ASKS) - 1
    assert row["repeats"] == 0 and row["empty"] == 0
    assert row["wer"] <= row["offline_wer"] + 0.1  # the pipeline loses no words
    assert row["fact_questions"] == sum(bool(a.facts) for a in ASKS)
    assert all(t["voice"] != "kokoro:jm_kumo" for t in result["turns"])  # never the bot's voice
    assert sum(v["turns"] for v in result["voices"].values()) == len(ASKS)
    assert result["voices"]["piper"]["turns"] >= 1  # the voices go round from Piper's
    table = bench_quality.render(result)
    assert table.splitlines()[2].startswith("clean") and "overall" in table
    assert "caller voice" in table and "\npiper " in table


def test_an_unknown_condition_is_named_before_anything_loads() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bot", "bench", "quality", "--conditions", "clean,cafe"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--conditions: unknown cafe (known: clean, ulaw," in done.stdout


def test_stage_times_skip_a_turn_answered_by_a_prompt() -> None:
    from bot.tools.bench_calls import stage_times

    answered = {"event": "turn", "marks_ms": {"speech_end": 0.0, "endpoint": 640.0}}
    asked_again = {"event": "turn", "transcript": "and also the unsung game.", "misheard": -1.2}
    stages = stage_times([answered, asked_again, answered])
    assert stages["endpoint"] == [640.0, 640.0]
    assert "speech_end" not in stages  # every time counts from it
