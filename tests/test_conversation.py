"""The conversation with engine doubles at the engine boundary, through the real server and
the caller simulator: speculative STT, streaming reply, gate, barge-in, holds, greeting,
transfers, hang-ups.

Calls run on virtual time (tests/virtual.py: one clock for the simulator, the call, the turn
detector, the reply and the playout; a memory line; the doubles inline), so their timing is
exact and a call takes milliseconds. The few that need engine threads (an engine waiting on
another, a worker stopped by a hang-up) run in real time over TCP (``setup(threads=True)``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import threading
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bot import clock
from bot.app import handler
from bot.asterisk import audiosocket as proto
from bot.asterisk.directory import Directory, TransferFailed
from bot.asterisk.server import AudioSocketServer, Handler
from bot.audio import FRAME_MS, is_silent
from bot.calllog import list_calls, read_call
from bot.config import AssistantProfile, Settings
from bot.conversation.assets import Assets
from bot.conversation.assistant import Assistant
from bot.conversation.clauses import KEEP_BEFORE_FIRST_MS, ClauseSplitter, ClauseTrimmer
from bot.conversation.records import MARKS
from bot.conversation.reply import FIRST_AUDIO_DUE_S, FLOOR_HOLD_S, LATER_AUDIO_LEAD_S
from bot.conversation.threads import iterate_in_thread
from bot.engines import EngineError
from bot.engines.stack import load_llm
from bot.tools.simulator import CallerSimulator, DtmfAt

from . import virtual
from .conftest import make_settings, running_server, wait_until
from .fakes import FakeEngines, FakeLlm, FakeTts, ScriptedVad

VOICED = b"\x01\x40" * 160  # first byte 1: the scripted VAD's speech; loud for the simulator
QUIET = bytes(320)


def speech(seconds: float) -> bytes:
    return VOICED * round(seconds / 0.02)


def pause(seconds: float) -> bytes:
    return QUIET * round(seconds / 0.02)


def setup(
    calls_dir: Path, *, threads: bool = False, **env: str
) -> tuple[Settings, FakeEngines, Assets]:
    """The assistant profile on engine doubles. Its calls run on virtual time with the doubles
    inline (tests/virtual.py), or, with ``threads``, in real time with the doubles in worker
    threads as the engines run: for what only threads show (an engine waiting on another)."""
    defaults = {
        "VOICEBOT_SERVER_PROFILE": "assistant",
        "VOICEBOT_PROFILES_ASSISTANT_GREETING": "",
        # The scripted frames carry no level: no noise gate (tests/test_turns.py tests it).
        "VOICEBOT_TURNS_NOISE_MARGIN_DB": "0",
    }
    settings = make_settings(calls_dir, **{**defaults, **env})
    engines = FakeEngines()
    executor: Executor = ThreadPoolExecutor(8)
    if not threads:
        executor = inline = virtual.InlineExecutor()
        engines.stt.spend = engines.tts.spend = inline.spend
        engines.stt.wait = engines.llm.wait = engines.tts.wait = inline.spend_until
        # The reply pauses an uncontended LLM for its first clause: inline, that would stop
        # the loop, so the doubles say it is contended (the pause is tested with threads).
        engines.llm.contended = True
    assets = Assets(settings, engines, executor, vad=ScriptedVad)
    return settings, engines, assets


def call_events(calls_dir: Path) -> list[dict[str, Any]]:
    [folder] = list(list_calls(calls_dir))
    return read_call(folder).events


def run_call(
    settings: Settings,
    assets: Assets,
    turns: list[bytes],
    *,
    directory: Directory | None = None,
    **kw: Any,
) -> CallerSimulator:
    """One call from the caller simulator: on virtual time over a memory line, or (engine
    doubles in threads) in real time over TCP."""
    handle = handler(settings, assets, directory=directory)
    if isinstance(assets.executor, virtual.InlineExecutor):
        return virtual.run(lambda: _call_in_memory(handle, turns, **kw))

    async def main() -> CallerSimulator:
        async with running_server(settings, handle) as server:
            sim = CallerSimulator("127.0.0.1", server.address[1], turns, **kw)
            await sim.run()
            await wait_until(lambda: not server.sessions)
            return sim

    return asyncio.run(main())


@contextlib.asynccontextmanager
async def in_memory(handle: Handler) -> AsyncIterator[tuple[AudioSocketServer, virtual.Connect]]:
    """A server without a socket, and how to dial it (a memory line each time)."""
    server = AudioSocketServer(handle)
    try:
        yield server, virtual.dial(server.on_connect)
        await wait_until(lambda: not server.sessions)
    finally:
        await server.close(grace=2.0)


async def _call_in_memory(handle: Handler, turns: list[bytes], **kw: Any) -> CallerSimulator:
    async with in_memory(handle) as (_server, connect):
        sim = CallerSimulator("", 0, turns, connect=connect, **kw)
        await sim.run()
    return sim


# --- pieces -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "clauses"),
    [
        (["Sure", ",", " I can", " help."], ["Sure,", "I can help."]),
        (
            ["Certainly!", " A great", " book is", " this one."],
            ["Certainly!", "A great book is this one."],
        ),
        (
            ["The moon", " is the", " largest thing", " in the", " sky."],
            ["The moon is the largest", "thing in the sky."],
        ),
        (["Yes."], ["Yes."]),
        (["It is", " 5 p.m.", " now"], ["It is 5 p.m.", "now"]),
    ],
)
def test_clause_splitter(pieces: list[str], clauses: list[str]) -> None:
    splitter = ClauseSplitter()
    out = [c for p in pieces for c in splitter.feed(p)]
    rest = splitter.flush()
    assert out + ([rest] if rest else []) == clauses


def test_iterate_in_thread_streams_and_stops_the_worker_when_cancelled() -> None:
    stopped = threading.Event()

    def endless() -> Iterator[int]:
        i = 0
        try:
            while True:
                time.sleep(0.001)
                yield i
                i += 1
        finally:
            stopped.set()

    async def main() -> list[int]:
        got: list[int] = []
        with ThreadPoolExecutor(2) as ex:

            async def consume() -> None:
                async with contextlib.aclosing(iterate_in_thread(ex, endless)) as items:
                    async for item in items:
                        got.append(item)
                        if len(got) == 5:
                            raise asyncio.CancelledError

            with pytest.raises(asyncio.CancelledError):
                await consume()
        return got

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]
    assert stopped.is_set()


def test_iterate_in_thread_raises_the_workers_error() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise ValueError("engine broke")

    async def main() -> None:
        with ThreadPoolExecutor(1) as ex, pytest.raises(ValueError, match="engine broke"):
            async with contextlib.aclosing(iterate_in_thread(ex, broken)) as items:
                async for _ in items:
                    pass

    asyncio.run(main())


# --- whole turns --------------------------------------------------------------------------------


def test_a_turn_is_transcribed_speculatively_answered_and_logged_with_every_mark(
    calls_dir: Path,
) -> None:
    settings, engines, assets = setup(calls_dir)
    sim = run_call(settings, assets, [pause(0.1) + speech(0.8)], greeting_wait=0, quiet=0.5)
    [result] = sim.report.turns
    assert result.response_latency_ms is not None and result.talk_over_frames == 0
    # On virtual time, exactly: the reply (under way since the pause) is heard at the endpoint,
    # the hangover after the last word, within two frames (the one that completes the
    # hangover, the playout's next tick): the doubles take no time.
    hangover = settings.turns.hangover_ms
    assert hangover <= result.response_latency_ms <= hangover + 2 * FRAME_MS
    events = call_events(calls_dir)
    [turn] = [e for e in events if e["event"] == "turn"]
    assert turn["stt_speculative"] is True and len(engines.stt.calls) == 1
    assert turn["transcript"] == f"I spoke for {engines.stt.calls[0]:.1f} seconds"
    assert turn["reply"] == "Sure, here is the answer you wanted."
    assert engines.tts.texts == ["Sure,", "here is the answer you wanted."]
    # The call over, its conversation's sequence in the LLM is the first a new call takes.
    assert engines.llm.forgotten == [engines.llm.prepared[-1]] and len(engines.llm.prepared) == 1
    marks = turn["marks_ms"]
    assert set(marks) == set(MARKS)  # every mark, in pipeline order:
    assert marks["speech_end"] == 0.0 and marks["endpoint"] >= 400
    # the speculative transcript was ready before the endpoint was decided, and the reply was
    # prepared during the hangover: its audio waited for the endpoint
    ordered = ["stt_done", "llm_first_token", "first_clause", "tts_first_audio", "endpoint"]
    assert [marks[m] for m in ordered] == sorted(marks[m] for m in ordered)
    assert marks["endpoint"] <= marks["first_frame_out"] <= marks["endpoint"] + 100
    assert not [e for e in events if e["event"] == "reply_ahead_dropped"]
    # per clause: words, text complete, first audio, silence heard before it
    first, second = turn["clauses"]
    assert first[0] == 1 and second[0] == 6
    assert first[1] == pytest.approx(marks["first_clause"], abs=1)
    assert first[2] == pytest.approx(marks["tts_first_audio"], abs=1)
    assert first[3] == 0 and second[3] >= 0
    assert first[1] <= second[1] <= second[2] and first[2] <= second[2]


def test_without_reply_ahead_the_reply_starts_at_the_endpoint(calls_dir: Path) -> None:
    settings, engines, assets = setup(calls_dir, VOICEBOT_TURNS_REPLY_AHEAD="false")
    run_call(settings, assets, [pause(0.1) + speech(0.8)], greeting_wait=0, quiet=0.5)
    [turn] = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    marks = turn["marks_ms"]
    assert marks["stt_done"] <= marks["endpoint"]
    ordered = ["endpoint", "llm_first_token", "first_clause", "tts_first_audio", "first_frame_out"]
    assert [marks[m] for m in ordered] == sorted(marks[m] for m in ordered)


def test_a_later_clause_is_due_when_the_audio_before_it_runs_out(calls_dir: Path) -> None:
    """The TTS serves the clause due soonest: the first one soon after the caller stopped,
    a later one only shortly before the audio already queued for its call has played."""
    settings, engines, assets = setup(calls_dir)
    engines.tts.seconds["Sure,"] = 3.0
    sim = run_call(settings, assets, [pause(0.1) + speech(0.8)], greeting_wait=0, quiet=0.5)
    assert sim.report.turns[0].response_latency_ms is not None
    (first, first_due, first_asked), (_, later_due, _) = engines.tts.dues[:2]
    assert first == "Sure," and first_due is not None and later_due is not None
    assert first_due <= first_asked + FIRST_AUDIO_DUE_S  # the caller already waits
    # The first clause's 3 s of audio were queued after it was asked for.
    assert later_due >= first_asked + 3.0 - LATER_AUDIO_LEAD_S > first_due


def test_the_first_audio_goes_out_while_the_tts_is_still_synthesizing_the_clause(
    calls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, engines, assets = setup(calls_dir, threads=True)
    heard = engines.tts.streaming = threading.Event()
    first_heard = Assistant._bot_heard

    def on_voice_start(self: Assistant, t: float) -> None:
        first_heard(self, t)
        heard.set()

    monkeypatch.setattr(Assistant, "_bot_heard", on_voice_start)
    sim = run_call(settings, assets, [pause(0.1) + speech(0.8)], greeting_wait=0, quiet=0.5)
    [result] = sim.report.turns
    # The TTS held the rest of the first clause until its first half was on the wire.
    assert engines.tts.heard_first[0] is True
    assert result.response_latency_ms is not None and result.talk_over_frames == 0
    [turn] = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    assert turn["reply"] == "Sure, here is the answer you wanted." and not turn["interrupted"]
    marks = turn["marks_ms"]
    assert marks["first_clause"] <= marks["tts_first_audio"] <= marks["first_frame_out"]


def test_the_llm_decodes_nothing_while_the_first_clause_is_synthesized(calls_dir: Path) -> None:
    """The worker pauses itself once its pieces complete the first clause: it does not decode
    one more token alongside the TTS (told by the event loop, it did)."""
    settings, engines, assets = setup(calls_dir, threads=True)
    past_first = threading.Event()  # the LLM was asked for a token after the first clause

    class WatchedLlm(FakeLlm):
        def stream(self, messages: list[dict[str, str]], **kw: Any) -> Iterator[str]:
            pieces = super().stream(messages, **kw)
            for i in itertools.count():
                if i == 2:  # "Sure," is complete once " here" began
                    past_first.set()
                piece = next(pieces, None)
                if piece is None:
                    return
                yield piece

    overlapped: list[bool] = []

    class WatchedTts(FakeTts):
        def synthesize(
            self, text: str, voice: str | None = None, *, due: float | None = None
        ) -> Iterator[np.ndarray]:
            if text == "Sure,":  # waits for a decode that must not come
                overlapped.append(past_first.wait(0.5))
            yield from super().synthesize(text, voice)

    engines.llm = WatchedLlm()
    engines.tts = WatchedTts()
    run_call(settings, assets, [pause(0.1) + speech(0.8)], greeting_wait=0, quiet=0.5)
    assert overlapped == [False]
    [turn] = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    assert turn["reply"] == "Sure, here is the answer you wanted."
    assert engines.tts.texts[0] == "Sure,"


def test_speech_after_a_pause_discards_the_speculative_transcript(calls_dir: Path) -> None:
    settings, engines, assets = setup(calls_dir)
    run_call(settings, assets, [speech(0.6) + pause(0.3) + speech(0.6)], greeting_wait=0, quiet=0.5)
    [turn] = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    # Two transcriptions: the speculation at the pause (0.6 s of speech + pre-roll) and the
    # whole turn; the answer was to the whole turn.
    # The speculation at the first pause (0.6 s of speech and its pre-roll) was thrown away.
    assert len(engines.stt.calls) >= 2 and min(engines.stt.calls) < 1.0
    assert max(engines.stt.calls) > 1.4
    assert turn["transcript"] == f"I spoke for {max(engines.stt.calls):.1f} seconds"


def test_no_reply_ahead_while_another_calls_reply_is_being_worked_on(calls_dir: Path) -> None:
    settings, engines, assets = setup(calls_dir)
    with assets.activity.replying():  # another call's answer holds the engines
        run_call(settings, assets, [pause(0.1) + speech(0.8)], greeting_wait=0, quiet=0.5)
        assert assets.activity.replies == 1  # this call's own reply counted itself in and out
    [turn] = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    marks = turn["marks_ms"]
    assert marks["endpoint"] <= marks["llm_first_token"]  # the reply waited for the endpoint


def test_a_reply_started_at_a_pause_is_dropped_when_the_caller_goes_on(calls_dir: Path) -> None:
    settings, engines, assets = setup(calls_dir)
    sim = run_call(
        settings, assets, [speech(0.6) + pause(0.35) + speech(0.6)], greeting_wait=0, quiet=0.5
    )
    events = call_events(calls_dir)
    [dropped] = [e for e in events if e["event"] == "reply_ahead_dropped"]
    [turn] = [e for e in events if e["event"] == "turn"]
    partial = f"I spoke for {min(engines.stt.calls):.1f} seconds"
    assert dropped["transcript"] == partial  # it answered the words before the pause ...
    assert turn["transcript"] == f"I spoke for {max(engines.stt.calls):.1f} seconds"
    assert turn["index"] == 1  # ... was never a turn of its own ...
    # ... and never reached the caller or the conversation's history.
    [result] = sim.report.turns
    assert result.talk_over_frames == 0
    last_prompt = engines.llm.prompts[-1]
    assert [m["content"] for m in last_prompt if m["role"] == "user"] == [turn["transcript"]]
    assert not [m for m in last_prompt if m["role"] == "assistant"]


def a_question_then_a_breath(settings: Settings, assets: Assets, calls_dir: Path) -> dict[str, Any]:
    """The caller's question, a 450 ms breath, more words: the bot's first response was
    never heard and nothing was said over the caller, who heard a response to both parts;
    returns the logged turn of that response."""
    turn = speech(0.8) + pause(0.45) + speech(0.5)
    sim = run_call(settings, assets, [turn], greeting_wait=0, quiet=0.8)
    [result] = sim.report.turns
    assert result.talk_over_frames == 0 and result.response_latency_ms is not None
    cut, responded = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    assert cut["interrupted"] and "first_frame_out" not in cut["marks_ms"]  # never heard
    return responded


def test_a_caller_who_breathes_after_question_like_words_is_not_answered_into(
    calls_dir: Path,
) -> None:
    """ "Could you recommend a good book, ... please?": the words before the breath read as a
    question, so the turn ends after the short hangover and the answer is under way; it is
    not heard before ``min_response_ms``, and the caller going on at 450 ms is heard first."""
    settings, engines, assets = setup(calls_dir)
    engines.stt.text = "Could you recommend a good book?"
    answered = a_question_then_a_breath(settings, assets, calls_dir)
    assert answered["transcript"] == " ".join([engines.stt.text] * 2)  # both parts, one turn
    # Without a breath, the answer is heard min_response_ms after the question (the doubles
    # take no time: the short hangover ended the turn well before).
    settings, engines, assets = setup(calls_dir / "2")
    engines.stt.text = "Could you recommend a good book?"
    sim = run_call(settings, assets, [speech(0.8)], greeting_wait=0, quiet=0.8)
    [result] = sim.report.turns
    assert result.response_latency_ms is not None
    floor = settings.turns.min_response_ms
    assert floor <= result.response_latency_ms <= floor + 2 * FRAME_MS
    [answered] = [e for e in call_events(calls_dir / "2") if e["event"] == "turn"]
    assert answered["marks_ms"]["endpoint"] <= settings.turns.hangover_complete_ms


def test_a_click_too_short_to_be_a_turn_does_not_lose_the_answer_it_cut_off(
    calls_dir: Path,
) -> None:
    """A sound under ``min_speech_ms`` after the question (a click, a cough, a phone's DTX
    burst) cancels the answer under way, then turns out to be no turn: the question is
    answered all the same (it went unanswered, and the caller waited in silence)."""
    settings, engines, assets = setup(calls_dir)
    engines.stt.text = "Could you recommend a good book?"
    turn = speech(0.8) + pause(0.45) + speech(0.12)
    sim = run_call(settings, assets, [turn], greeting_wait=0, quiet=0.8)
    [result] = sim.report.turns
    assert result.response_latency_ms is not None and result.talk_over_frames == 0
    events = call_events(calls_dir)
    assert [e["reason"] for e in events if e["event"] == "turn_discarded"] == [
        "120 ms of speech is under 200 ms"
    ]
    cut, answered = [e for e in events if e["event"] == "turn"]
    assert cut["interrupted"] and "first_frame_out" not in cut["marks_ms"]  # never heard
    assert answered["transcript"] == engines.stt.text and not answered["interrupted"]
    assert "first_frame_out" in answered["marks_ms"]


def test_a_voice_that_never_stops_is_answered_at_max_utterance_and_not_taken_back(
    calls_dir: Path,
) -> None:
    """A TV, or a monologue: the turn ends at ``max_utterance_s`` so it gets an answer, and the
    voice going on neither cancels that answer nor folds it into the next turn (it did, again
    and again: a TV under a caller got no answer for 40 s)."""
    settings, engines, assets = setup(calls_dir, VOICEBOT_TURNS_MAX_UTTERANCE_S="3")
    run_call(settings, assets, [speech(5.0)], greeting_wait=0, quiet=1.0)
    cut, rest = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    assert cut["max_length"] is True and not cut["interrupted"]
    assert "first_frame_out" in cut["marks_ms"]  # the caller heard the answer
    assert cut["transcript"] == "I spoke for 3.0 seconds"
    assert rest["transcript"].startswith("I spoke for 2.") and "max_length" not in rest


def test_the_gate_ignores_the_caller_while_the_bot_speaks(calls_dir: Path) -> None:
    settings, engines, assets = setup(calls_dir)
    engines.llm.words = ("word " * 40).split()  # about 2.4 s of bot audio
    engines.llm.words[-1] = "end."
    # The caller talks over the answer (0.7 s after finishing), then stays quiet.
    run_call(settings, assets, [speech(0.6) + pause(1.2) + speech(0.8)], greeting_wait=0, quiet=1.0)
    turns = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    assert len(turns) == 1 and turns[0]["interrupted"] is False


def test_a_clause_ready_as_the_caller_starts_talking_in_a_pause_waits_and_is_dropped(
    calls_dir: Path,
) -> None:
    """The caller took a stall mid-answer for its end and speaks: the next clause, ready just
    as the caller's first voiced frame arrives, is not played over it (without the hold it
    was, and the caller's turn, gated out, was never answered)."""
    settings, engines, assets = setup(calls_dir)
    heard = asyncio.Event()  # the server saw the caller's first frame of the second turn
    marked = VOICED[:1] + b"\x02" + VOICED[2:]

    class MarkingVad(ScriptedVad):
        def is_speech(self, pcm: bytes, rate: int) -> bool:
            if pcm[:2] == marked[:2]:
                heard.set()
            return super().is_speech(pcm, rate)

    assets.vad = MarkingVad
    engines.tts.seconds["Sure,"] = 0.4
    engines.tts.holds["here is the answer you wanted."] = heard
    second = marked * round(0.8 / 0.02)
    sim = run_call(settings, assets, [speech(0.6), second], greeting_wait=0, quiet=1.0)
    first, answered = sim.report.turns
    assert first.talk_over_frames == 0 and answered.talk_over_frames == 0
    assert answered.response_latency_ms is not None
    turns = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    assert len(turns) == 2  # the whole second turn was heard (0.8 s and the pre-roll)
    assert float(turns[1]["transcript"].split()[3]) >= 0.8
    assert turns[0]["interrupted"] is True and turns[0]["reply"].startswith("Sure,")


def test_a_flickering_noise_holds_the_next_clause_only_briefly(calls_dir: Path) -> None:
    """Noise that the VAD calls voiced every other frame never becomes a turn: the clause it
    holds goes out after FLOOR_HOLD_S, and the whole answer is heard."""
    settings, engines, assets = setup(calls_dir)
    noisy = asyncio.Event()  # the noise has reached the server

    class NoticingVad(ScriptedVad):
        def is_speech(self, pcm: bytes, rate: int) -> bool:
            voiced = super().is_speech(pcm, rate)
            if voiced and engines.tts.texts:  # after the first clause: the noise
                noisy.set()
            return voiced

    assets.vad = NoticingVad
    engines.tts.seconds["Sure,"] = 0.4
    engines.tts.holds["here is the answer you wanted."] = noisy
    flicker = (VOICED + QUIET) * 100  # 4 s of noise, no two voiced frames in a row
    sim = run_call(
        settings,
        assets,
        [speech(0.6) + pause(1.5) + flicker],
        greeting_wait=0,
        quiet=1.0,
        answer_timeout=1.0,
    )
    [turn] = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    assert turn["interrupted"] is False
    assert turn["reply"] == "Sure, here is the answer you wanted."
    # The first clause played before the noise; the second waited FLOOR_HOLD_S into it (not
    # to its end, 4 s later).
    noise = sim.report.turns[0].speech_start + 0.6 + 1.5
    assert any(t < noise for t in sim.voiced_rx_times)
    resumed = min(t for t in sim.voiced_rx_times if t > noise)
    assert noise + FLOOR_HOLD_S <= resumed <= noise + FLOOR_HOLD_S + 3 * FRAME_MS / 1000


def test_barge_in_stops_the_bot_and_keeps_the_callers_words(calls_dir: Path) -> None:
    settings, engines, assets = setup(calls_dir, VOICEBOT_PROFILES_ASSISTANT_BARGE_IN="true")
    engines.llm.words = ("word " * 60).split()  # 3.6 s of bot audio
    sim = run_call(
        settings, assets, [speech(0.6) + pause(1.5) + speech(0.8)], greeting_wait=0, quiet=1.0
    )
    events = call_events(calls_dir)
    barge = [e for e in events if e["event"] == "barge_in"]
    turns = [e for e in events if e["event"] == "turn"]
    assert len(barge) == 1 and barge[0]["dropped_ms"] > 500
    assert turns[0]["interrupted"] is True
    # The caller's words over the bot became the next turn (0.8 s, from its first 200 ms on).
    assert len(turns) == 2
    heard_s = float(turns[1]["transcript"].split()[3])
    assert 0.8 <= heard_s <= 1.1
    # The bot went quiet within ~200 ms of sustained speech plus the playout's small lead, and
    # stayed quiet until it answered the new turn (after its end and the hangover).
    talks_over = sim.report.turns[0].speech_start + 0.6 + 1.5
    heard = [t for t in sim.voiced_rx_times if talks_over + 0.35 < t < talks_over + 1.2]
    assert heard == []
    assert any(talks_over - 1.0 < t < talks_over + 0.2 for t in sim.voiced_rx_times)


def test_greeting_plays_within_300ms_of_connecting(calls_dir: Path) -> None:
    settings, engines, assets = setup(
        calls_dir, VOICEBOT_PROFILES_ASSISTANT_GREETING="Hello there!"
    )
    assets.prepare()
    sim = run_call(settings, assets, [], duration=1.0)
    assert sim.voiced_rx_times and sim.voiced_rx_times[0] < 0.3
    assert any(e["event"] == "greeting" for e in call_events(calls_dir))


def test_greeting_plays_at_once_to_a_phone_that_sends_nothing(calls_dir: Path) -> None:
    """A phone with VAD/DTX sends no RTP in silence, so Asterisk sends no frame: the greeting
    must not wait for one (AudioSocket() is 8 kHz whatever the phone does)."""
    settings, engines, assets = setup(
        calls_dir, VOICEBOT_PROFILES_ASSISTANT_GREETING="Hello there!"
    )
    assets.prepare()

    async def main() -> float:
        async with in_memory(handler(settings, assets)) as (_server, connect):
            reader, writer = await connect()
            sim = proto.Connection(proto.Role.CLIENT)
            started = clock.now()
            writer.write(sim.send(proto.Uuid(uuid_mod.uuid4())))  # and never a frame of audio
            try:
                while True:
                    sim.receive_data(await asyncio.wait_for(reader.read(65536), 2))
                    for event in sim.events():
                        if isinstance(event, proto.Audio) and not is_silent(event.pcm):
                            return clock.now() - started
            finally:
                writer.close()

    # The greeting's first sound: after RATE_WAIT (0.1 s) and the playout's lead.
    assert virtual.run(main) < 0.3
    events = call_events(calls_dir)
    assert [e["event"] for e in events][1] == "greeting"  # before any audio_format


def test_a_phone_that_stops_sending_after_its_words_is_still_answered(calls_dir: Path) -> None:
    """With VAD/DTX the phone (and so Asterisk) sends nothing once the caller stops talking:
    the quiet is filled in, so the turn still ends and gets its answer."""
    settings, engines, assets = setup(calls_dir)
    assets.prepare()

    async def main() -> bool:
        async with in_memory(handler(settings, assets)) as (_server, connect):
            reader, writer = await connect()
            sim = proto.Connection(proto.Role.CLIENT)
            writer.write(sim.send(proto.Uuid(uuid_mod.uuid4())))
            words = speech(0.8)
            for i in range(0, len(words), 320):  # 20 ms frames, then nothing
                writer.write(sim.send(proto.Audio(8000, words[i : i + 320])))
                await asyncio.sleep(0.02)
            try:
                async with asyncio.timeout(5):
                    while True:
                        sim.receive_data(await reader.read(65536))
                        for event in sim.events():
                            if isinstance(event, proto.Audio) and not is_silent(event.pcm):
                                return True
            finally:
                writer.close()

    assert virtual.run(main)
    events = call_events(calls_dir)
    [turn] = [e for e in events if e["event"] == "turn"]
    assert turn["reply"] == "Sure, here is the answer you wanted."
    assert events[-1]["inbound_filled"] > 0


@pytest.mark.parametrize(
    ("stage", "state"),
    [
        ("listening", "listening"),
        ("stt", "transcribing"),
        ("llm", "thinking"),
        ("tts", "synthesizing"),
        ("playout", "speaking"),
    ],
)
def test_hang_up_in_any_state_ends_every_task_and_closes_the_log(
    calls_dir: Path, stage: str, state: str
) -> None:
    settings, engines, assets = setup(calls_dir, threads=True)
    release = threading.Event()
    if stage == "stt":
        engines.stt.hold = release
    elif stage == "llm":
        engines.llm.hold = release
    elif stage == "tts":
        engines.tts.hold = release
    elif stage == "playout":
        engines.llm.words = ("word " * 80).split()
    turns = [] if stage == "listening" else [speech(0.6)]

    async def main() -> None:
        async with running_server(settings, handler(settings, assets)) as server:
            sim = CallerSimulator(
                "127.0.0.1",
                server.address[1],
                turns,
                greeting_wait=0,
                duration=1.6,
                answer_timeout=0.1,
            )
            await sim.run()  # hangs up at 1.6 s, whatever the bot is doing
            await wait_until(lambda: not server.sessions and not server._tasks)
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert left == []

    try:
        asyncio.run(main())
    finally:
        release.set()
    events = call_events(calls_dir)
    assert events[-1]["event"] == "call_end" and events[-1]["reason"] == "caller hung up"
    assert events[-1]["state"] == state  # the log says where the call ended
    if stage == "llm":
        assert engines.llm.stopped_early.wait(5)  # the worker thread stopped generating


def test_an_engine_failing_mid_reply_ends_only_that_call(calls_dir: Path) -> None:
    settings, engines, assets = setup(calls_dir)

    def broken(text: str, voice: str | None = None, **kw: Any) -> Iterator[np.ndarray]:
        raise RuntimeError("TTS exploded")
        yield np.zeros(1, np.float32)  # pragma: no cover

    engines.tts.synthesize = broken  # type: ignore[method-assign]
    apology = speech(0.5)  # synthesized at start-up, so it plays while the TTS is broken
    assets.prompts[("apology", 8000)] = apology
    sim = run_call(settings, assets, [speech(0.6)], greeting_wait=0, duration=4.0)
    assert sim.report.ended_by == "bot"  # the bot hung up (0x00), it did not go silent
    events = call_events(calls_dir)
    assert [e["error"] for e in events if e["event"] == "apology"] == ["RuntimeError: TTS exploded"]
    assert events[-1]["reason"] == "internal error: RuntimeError: TTS exploded"
    # The caller heard the whole apology (25 voiced frames), then the hang-up.
    assert sim.report.voiced_frames_received == len(apology) // 320


def test_the_reply_stops_at_the_first_full_sentence(calls_dir: Path) -> None:
    settings, engines, assets = setup(calls_dir)
    engines.llm.words = [
        "Sure!",
        "The",
        "capital",
        "of",
        "France",
        "is",
        "Paris.",
        "It",
        "is",
        "lovely",
        "in",
        "spring.",
    ]
    run_call(settings, assets, [speech(0.6)], greeting_wait=0, quiet=0.5)
    [turn] = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    assert turn["reply"] == "Sure! The capital of France is Paris."
    assert engines.llm.stopped_early.is_set()  # generation stopped, the model was freed
    assert engines.tts.texts == ["Sure!", "The capital of France is Paris."]


# --- transfer to a person -----------------------------------------------------------------------


@dataclass
class FakeControl:
    """The ARI/AMI side of a transfer: records the request, or refuses it."""

    name: str = "fake"
    requests: list[tuple[str, str]] = field(default_factory=list)
    refuse: bool = False

    async def transfer(self, route: Any, context: str, extension: str) -> None:
        self.requests.append((context, extension))
        if self.refuse:
            raise TransferFailed("Channel not found")


def transfer_call(
    settings: Settings, assets: Assets, control: FakeControl | None, turns: list[bytes], **kw: Any
) -> CallerSimulator:
    call_uuid = uuid_mod.uuid4()
    directory = Directory()
    if control is not None:
        directory.register(str(call_uuid), channel="PJSIP/16-1", control=control)

    return run_call(settings, assets, turns, directory=directory, call_uuid=call_uuid, **kw)


def test_dtmf_0_says_the_handover_then_asterisk_moves_the_call(calls_dir: Path) -> None:
    settings, _engines, assets = setup(calls_dir)
    handover = speech(0.4)
    assets.prompts[("transfer:assistant", 8000)] = handover
    control = FakeControl()
    sim = transfer_call(settings, assets, control, [], dtmf=[DtmfAt("0", 0.3)], duration=3.0)
    assert control.requests == [("from-voicebot", "operator")]
    events = call_events(calls_dir)
    [transfer] = [e for e in events if e["event"] == "transfer"]
    assert transfer["why"] == "DTMF 0" and transfer["via"] == "fake"
    assert events[-1]["reason"] == "transferred to operator@from-voicebot"
    # The caller heard the whole hand-over, and no hang-up frame raced the move.
    assert sim.report.voiced_frames_received == len(handover) // 320
    assert sim.report.ended_by == "bot" and not sim.report.hangup_frame


def test_words_whisper_doubts_are_asked_again_not_answered(calls_dir: Path) -> None:
    settings, engines, assets = setup(calls_dir)
    assets.prompts[("say_again:assistant", 8000)] = speech(0.4)
    engines.stt.text, engines.stt.confidence = "and also the unsung game.", -1.04
    sim = run_call(settings, assets, [speech(0.8)], greeting_wait=0, quiet=0.5)
    [said] = sim.report.turns
    assert said.response_latency_ms is not None  # the caller heard the question back
    assert engines.llm.prompts == []  # nothing answered, nothing in the history
    [turn] = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    assert turn["transcript"] == "and also the unsung game."
    assert turn["reply"] == "Sorry, I didn't catch that. Could you say it again?"
    assert turn["misheard"] == -1.04


def test_asking_again_waits_like_an_answer_for_a_caller_who_only_took_a_breath(
    calls_dir: Path,
) -> None:
    """Doubted words ending in a breath: the request to say it again is not heard before
    ``min_response_ms`` either, so the caller going on at 450 ms is heard first and both parts
    become one turn (it was played at the endpoint, into the caller's next words)."""
    settings, engines, assets = setup(calls_dir)
    assets.prompts[("say_again:assistant", 8000)] = speech(0.4)
    engines.stt.text, engines.stt.confidence = "Could you recommend a good book?", -1.5
    asked = a_question_then_a_breath(settings, assets, calls_dir)
    assert asked["transcript"] == " ".join([engines.stt.text] * 2) and asked["misheard"] == -1.5
    assert engines.llm.prompts == []


def test_a_model_that_only_repeats_the_caller_asks_the_caller_to_say_it_again(
    calls_dir: Path,
) -> None:
    settings, engines, assets = setup(calls_dir)
    assets.prompts[("say_again:assistant", 8000)] = speech(0.4)
    engines.stt.text = "I'm very exactly as your shop."
    engines.llm.words = engines.stt.text.split(" ")  # every try is an echo: nothing is said
    sim = run_call(settings, assets, [speech(0.8)], greeting_wait=0, quiet=0.5)
    [said] = sim.report.turns
    assert said.response_latency_ms is not None  # the caller was not left in silence
    assert len(engines.llm.prompts) == 2  # the echo was answered again, then given up
    [turn] = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    assert turn["reply"] == "Sorry, I didn't catch that. Could you say it again?"
    assert turn["unanswered"] is True and engines.tts.texts == []


def test_with_say_again_off_doubted_words_are_answered(calls_dir: Path) -> None:
    settings, engines, assets = setup(calls_dir, VOICEBOT_PROFILES_ASSISTANT_SAY_AGAIN="")
    engines.stt.text, engines.stt.confidence = "and also the unsung game.", -1.04
    run_call(settings, assets, [speech(0.8)], greeting_wait=0, quiet=0.5)
    [turn] = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    assert turn["reply"] == "Sure, here is the answer you wanted." and "misheard" not in turn


def test_words_whisper_is_sure_of_are_answered(calls_dir: Path) -> None:
    settings, engines, assets = setup(calls_dir)
    engines.stt.text, engines.stt.confidence = "Are you open on Sundays?", -0.2
    run_call(settings, assets, [speech(0.8)], greeting_wait=0, quiet=0.5)
    [turn] = [e for e in call_events(calls_dir) if e["event"] == "turn"]
    assert turn["reply"] == "Sure, here is the answer you wanted." and "misheard" not in turn


def test_asking_for_a_person_transfers_instead_of_answering(calls_dir: Path) -> None:
    settings, engines, assets = setup(calls_dir)
    engines.stt.text = "Can I talk to a real person, please?"
    control = FakeControl()
    transfer_call(settings, assets, control, [speech(0.6)], greeting_wait=0, duration=3.0)
    assert control.requests == [("from-voicebot", "operator")]
    assert engines.llm.prompts == []  # no reply was generated
    events = call_events(calls_dir)
    assert [e["why"] for e in events if e["event"] == "transfer"] == ["asked for a person"]


def test_the_handover_waits_for_a_caller_who_goes_on_after_asking(calls_dir: Path) -> None:
    """ "Can I talk to a person? ... please": the first words end a turn (a question), but the
    hand-over is heard only once the caller is done, min_response_ms after the last word."""
    settings, engines, assets = setup(calls_dir)
    assets.prompts[("transfer:assistant", 8000)] = speech(0.4)
    engines.stt.text = "Can I talk to a person?"
    control = FakeControl()
    turn = speech(0.6) + pause(0.45) + speech(0.4)
    sim = transfer_call(settings, assets, control, [turn], greeting_wait=0, duration=4.0)
    assert control.requests == [("from-voicebot", "operator")]
    assert engines.llm.prompts == []
    [said] = sim.report.turns
    assert said.talk_over_frames == 0  # the hand-over came after "please", not into it
    assert sim.voiced_rx_times[0] - said.speech_end >= 0.55
    events = call_events(calls_dir)
    assert len([e for e in events if e["event"] == "turn"]) == 2
    assert len([e for e in events if e["event"] == "transfer"]) == 1


def test_a_transfer_nobody_can_make_is_logged_and_the_call_goes_on(calls_dir: Path) -> None:
    settings, _engines, assets = setup(calls_dir)
    transfer_call(settings, assets, None, [], dtmf=[DtmfAt("0", 0.3)], duration=1.5)
    refused = FakeControl(refuse=True)
    transfer_call(settings, assets, refused, [], dtmf=[DtmfAt("0", 0.3)], duration=1.5)
    logs = [read_call(f).events for f in list_calls(calls_dir)]
    [first] = [log for log in logs if any(e["event"] == "transfer_unavailable" for e in log)]
    [second] = [log for log in logs if log is not first]
    assert [e["reason"] for e in first if e["event"] == "transfer_unavailable"] == [
        "no ARI or AMI link knows this call"
    ]
    assert first[-1]["reason"] == "caller hung up"  # the conversation went on
    assert [e["error"] for e in second if e["event"] == "transfer_failed"] == ["Channel not found"]
    assert second[-1]["reason"] == "caller hung up"


# --- per-profile voice and LLM ------------------------------------------------------------------


def test_a_profile_speaks_with_its_own_voice_and_a_wrong_one_stops_start_up(
    calls_dir: Path,
) -> None:
    settings, engines, assets = setup(calls_dir, VOICEBOT_PROFILES_ASSISTANT_VOICE="tone")
    assets.prepare()  # the voice exists: prompts are synthesized with it
    assert set(engines.tts.voices) == {"tone", None}  # profile prompts; the busy/apology ones
    # The LLM evaluated the profile's system prompt and facts, where a call's prompt starts.
    profile = settings.profiles["assistant"]
    assert isinstance(profile, AssistantProfile)
    assert engines.llm.prompts == [[{"role": "system", "content": profile.instructions()}]]
    run_call(settings, assets, [speech(0.6)], greeting_wait=0, quiet=0.5)
    assert engines.tts.voices[-1] == "tone"  # the reply too
    settings, engines, assets = setup(calls_dir, VOICEBOT_PROFILES_ASSISTANT_VOICE="af_nobody")
    with pytest.raises(EngineError, match=r"^profiles.assistant.voice: no voice 'af_nobody'"):
        assets.prepare()


def test_a_profile_llm_that_cannot_load_names_the_profile(calls_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(64))
    settings, _engines, assets = setup(calls_dir, VOICEBOT_PROFILES_ASSISTANT_LLM=str(broken))
    assets.load_llm = functools.partial(load_llm, settings.models)
    with pytest.raises(EngineError, match=r"^profiles.assistant.llm: .*broken.gguf"):
        assets.prepare()
    assert assets.llm_for("assistant") is assets.engines.llm  # nothing half-loaded is used


def _tone(seconds: float, rate: int = 8000) -> bytes:
    n = round(seconds * rate)
    return (0.3 * 32767 * np.sin(2 * np.pi * 300 * np.arange(n) / rate)).astype("<i2").tobytes()


def _ms(pcm: bytes, rate: int = 8000) -> float:
    return len(pcm) / 2 / rate * 1000


def _trimmed(pcm: bytes, text: str, *, first: bool, pieces: int = 1) -> bytes:
    trimmer = ClauseTrimmer(8000, text, first=first)
    size = -(-len(pcm) // pieces) // 2 * 2
    out = b"".join(trimmer.feed(pcm[i : i + size]) for i in range(0, len(pcm), size))
    return out + trimmer.end()


@pytest.mark.parametrize("pieces", [1, 3, 7])
def test_clause_audio_loses_the_tts_padding_but_keeps_a_natural_pause(pieces: int) -> None:
    pcm = bytes(2 * 2400) + _tone(0.5) + bytes(2 * 3200)  # 300 ms, 500 ms, 400 ms
    first = _trimmed(pcm, "Hello.", first=True, pieces=pieces)
    assert _ms(first) == pytest.approx(
        KEEP_BEFORE_FIRST_MS + 500 + 220, abs=11
    )  # silence is found in 5 ms steps
    later = _trimmed(pcm, "and then,", first=False, pieces=pieces)
    assert _ms(later) == pytest.approx(40 + 500 + 120, abs=11)
    assert _trimmed(bytes(1600), "Hm.", first=True, pieces=pieces) == b""


def test_clause_trimmer_plays_sound_at_once_and_keeps_a_pause_inside_the_clause() -> None:
    trimmer = ClauseTrimmer(8000, "Well, yes.", first=True)
    assert trimmer.feed(bytes(2 * 800)) == b""  # 100 ms of padding: nothing to play yet
    assert not trimmer.heard
    now = trimmer.feed(_tone(0.2) + bytes(2 * 1200))  # sound, then 150 ms of pause
    assert trimmer.heard
    assert _ms(now) == pytest.approx(KEEP_BEFORE_FIRST_MS + 200, abs=6)  # not held back
    later = trimmer.feed(_tone(0.1))
    assert _ms(later) == pytest.approx(150 + 100, abs=6)  # the pause inside stays
    # The TTS left no silence at the end: the pause after a sentence is made up.
    assert trimmer.end() == bytes(2 * round(8000 * 0.22))
