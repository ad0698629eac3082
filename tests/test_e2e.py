"""A whole call through `voicebot serve` with the real default models and the caller simulator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from bot.audio import float_to_pcm
from bot.calllog import list_calls, read_call
from bot.conversation.records import MARKS
from bot.engines.stt import WhisperStt
from bot.engines.tts import PiperTts
from bot.tools.scenarios import phone_band
from bot.tools.simulator import CallerSimulator
from bot.tools.subserver import serving


def test_a_caller_asks_a_question_and_hears_a_spoken_answer(tmp_path: Path) -> None:
    piper = PiperTts(progress=False)  # the caller: a voice other than the bot's
    question = phone_band(
        np.concatenate(list(piper.synthesize("What is the capital of France?"))), piper.native_rate
    )
    # `voicebot serve` in its own process; it says ready only once every engine is warm.
    with serving("assistant", {"VOICEBOT_CALLS_DIR": str(tmp_path / "calls")}) as port:
        sim = CallerSimulator(
            "127.0.0.1",
            port,
            [float_to_pcm(question)],
            greeting_wait=5.0,
            quiet=1.5,
            answer_timeout=20.0,
        )
        report = asyncio.run(sim.run())
    assert report.ended_by == "caller"
    [turn] = report.turns
    assert turn.response_latency_ms is not None and turn.talk_over_frames == 0
    # What the bot said after the question transcribes back to words.
    frame = 320
    first = next(i for i, t in enumerate(sim.rx_times) if t > turn.speech_end)
    answer = bytes(sim.received[first * frame :])
    heard = WhisperStt(progress=False).transcribe(answer, 8000).text
    assert len(heard.split()) >= 2, heard
    events = read_call(next(list_calls(tmp_path / "calls"))).events
    [logged] = [e for e in events if e["event"] == "turn"]
    assert "capital" in logged["transcript"].lower() and logged["reply"]
    marks = logged["marks_ms"]
    assert set(marks) == set(MARKS) and marks["speech_end"] == 0
    order = ["endpoint", "llm_first_token", "first_clause", "tts_first_audio", "first_frame_out"]
    assert [marks[m] for m in order] == sorted(marks[m] for m in order)
    assert [e["event"] for e in events][:3] == ["call_start", "audio_format", "greeting"]
