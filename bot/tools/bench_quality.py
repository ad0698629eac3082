"""`voicebot bench quality`: does the bot understand the caller and answer right?

One simulated call per condition (clean, u-law, pink noise, babble, a TV, at 20 and 10 dB SNR),
each from another caller voice (never the bot's own), asks the shipped example business
(``bot/knowledge/example.md``) what its callers ask: opening hours, the address, a price, a
customer number spoken digit by digit (to be read back), Sunday opening, small talk, goodbye,
and a person to talk to. Per condition and overall it reports:

- answered turns (a reply heard, or the hand-over for the person),
- turns asked again (the bot doubted what it heard, or had no answer, and asked the caller to
  say it again): the caller then says it once more, slower, as callers do,
- facts right (every fact the question needs is in the reply, to the question or to it said
  again), and facts right the first time it was asked,
- replies that repeat the caller's words, and empty replies,
- word error rate of the bot's own transcripts, next to the same STT model on the same audio
  (what was sent, noise included) transcribed whole, offline, after the calls,
- response latency p50/p95 and talk-overs, as ``voicebot bench calls`` measures them.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from ..audio import float_to_pcm, frame_bytes, pcm_to_ulaw, ulaw_to_pcm
from ..calllog import list_calls, read_call
from ..wording import word_errors, words
from . import noise
from .bench_calls import summary
from .scenarios import Voices
from .simulator import CallerSimulator, CallReport, TurnResult
from .subserver import serving


@dataclass(frozen=True, slots=True)
class Ask:
    text: str
    # Facts the reply must hold: each a tuple of alternatives (words, in order), one of which.
    facts: tuple[tuple[str, ...], ...] = ()
    transfer: bool = False  # a person is asked for: the hand-over is the answer


ASKS: Final = (
    Ask("Hi, what are your opening hours on Saturday?", (("10",), ("4",))),
    Ask("And where exactly is your shop?", (("42",), ("harbour", "harbor"))),
    Ask("How much does a basic service cost?", (("45",),)),
    Ask(
        "My customer number is four seven one one. Can you check on my repair?",
        (("4711", "4 7 1 1"),),
    ),
    Ask("Are you also open on Sundays?", (("closed", "not open", "no"),)),
    Ask("Great. And how are you doing today?"),
    Ask("Can I talk to a person, please?", transfer=True),
)


@dataclass(frozen=True, slots=True)
class Condition:
    name: str
    background: str = ""  # a kind of noise.KINDS, or none
    snr_db: float = 0.0
    ulaw: bool = False


CONDITIONS: Final = (
    Condition("clean"),
    Condition("ulaw", ulaw=True),
    Condition("pink 20 dB", "pink", 20),
    Condition("pink 10 dB", "pink", 10),
    Condition("babble 20 dB", "babble", 20),
    Condition("babble 10 dB", "babble", 10),
    Condition("tv 20 dB", "tv", 20),
    Condition("tv 10 dB", "tv", 10),
)
# How long a caller who heard the bot's reply waits for the bot's log to hold that turn.
LOG_WAIT_S: Final = 1.0
BACKGROUND_S: Final = 23.0  # a noise loop this long (it repeats under a longer call)
# Other people's words, for babble and the TV's talker.
CHATTER: Final = (
    "I told him we would meet at the station after lunch, but he never came.",
    "The soup here is really good, you should try it next time.",
    "She has been working on that project for almost three years now.",
    "Did you see the match last night? What a finish.",
    "We are thinking about moving to the coast next spring.",
    "The weather forecast says it will clear up by the afternoon.",
)


@dataclass(slots=True)
class Call:
    condition: Condition
    voices: list[str]  # the caller voice of each turn
    turns: list[bytes]  # as spoken (u-law'd for a u-law line), 8 kHz PCM
    again: list[bytes]  # each turn as said again when the bot asks: the same voice, slower
    background: bytes


def prepare(conditions: list[Condition], bot_voice: str, say: Any = print) -> list[Call]:
    """Each condition's call; its turns go round every caller voice (never the bot's), so every
    condition hears the same voices and differs only in the line."""
    voices = Voices()
    names = voices.available(bot_voice)
    calls = []
    for i, condition in enumerate(conditions):
        said = [names[(i + k) % len(names)] for k in range(len(ASKS))]
        say(f"  {condition.name}: voices {', '.join(said)}")
        speech, again = (
            [
                _with_quiet(voices.say(a.text, v, slower=slower))
                for a, v in zip(ASKS, said, strict=True)
            ]
            for slower in (False, True)
        )
        background = np.zeros(0, np.float32)
        if condition.background:
            made = _background(condition.background, voices, names, seed=i)
            background = noise.at_snr(made, noise.voiced_rms(speech), condition.snr_db)
        line = [_line(condition, x) for x in speech], [_line(condition, x) for x in again]
        calls.append(Call(condition, said, *line, float_to_pcm(background)))
    return calls


def _line(condition: Condition, x: np.ndarray) -> bytes:
    """``x`` as the bot gets it over ``condition``'s line (G.711 u-law, or linear)."""
    pcm = float_to_pcm(x)
    return ulaw_to_pcm(pcm_to_ulaw(pcm)) if condition.ulaw else pcm


def _with_quiet(x: np.ndarray) -> np.ndarray:
    """A little silence around the speech, as a phone line has."""
    return np.concatenate([np.zeros(800, np.float32), x, np.zeros(800, np.float32)])


def _background(kind: str, voices: Voices, others: list[str], seed: int) -> Any:
    if kind == "pink":
        return noise.pink(BACKGROUND_S, seed)
    if kind == "babble":
        talkers = [voices.say(text, others[k % len(others)]) for k, text in enumerate(CHATTER)]
        return noise.babble(talkers, BACKGROUND_S, seed)
    talker = np.concatenate([voices.say(text, others[seed % len(others)]) for text in CHATTER])
    return noise.tv(talker, BACKGROUND_S, seed)


async def _place(port: int, calls: list[Call], concurrency: int, logs: Path, say: Any) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)

    async def one(call: Call) -> tuple[CallReport, CallerSimulator]:
        async with sem:
            call_uuid = uuid.uuid4()

            async def again(turn: TurnResult) -> bytes | None:
                asked = not turn.again and await _asked_again(logs, str(call_uuid), turn)
                return call.again[turn.index] if asked else None

            sim = CallerSimulator(
                "127.0.0.1",
                port,
                call.turns,
                call_uuid=call_uuid,
                greeting_wait=4.0,
                quiet=1.2,
                answer_timeout=12.0,
                record=False,
                background=call.background,
                again=again,
            )
            report = await sim.run()
            heard = sum(t.response_latency_ms is not None for t in report.turns if not t.again)
            said_again = sum(t.again for t in report.turns)
            answered = f"{heard}/{len(call.turns)} turns answered"
            say(f"  {call.condition.name}: {answered}, {said_again} said again")
            return report, sim

    return list(await asyncio.gather(*(one(c) for c in calls)))


async def _asked_again(logs: Path, call_uuid: str, turn: TurnResult) -> bool:
    """Whether the bot asked the caller to say ``turn`` again: its call log, read as the call
    goes on, has a turn logged since the caller began this one that it asked again. The log
    holds a turn once its reply has played; a caller waits a little for it (``LOG_WAIT_S``)."""
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        logged = await asyncio.to_thread(_turns_logged, logs, call_uuid, turn.speech_start)
        if logged or time.monotonic() >= deadline:
            return any(_asks_again(e) for e in logged)
        await asyncio.sleep(0.05)


def _turns_logged(logs: Path, call_uuid: str, since: float) -> list[dict[str, Any]]:
    """The turns in a call's log (still being written: complete lines) from ``since`` on."""
    folder = next(logs.glob(f"*-{call_uuid}"), None)
    events = read_call(folder).events if folder is not None else []
    return [e for e in events if e["event"] == "turn" and e["t"] >= since]


def _asks_again(turn: dict[str, Any]) -> bool:
    """A logged turn whose reply asked the caller to say it again."""
    return "misheard" in turn or bool(turn.get("unanswered"))


def run(
    conditions: list[Condition] | None = None,
    *,
    concurrency: int = 1,
    env: dict[str, str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    from ..config import load
    from ..engines.stack import options
    from ..engines.stt import WhisperStt

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    # The server's environment: the same models (the offline STT, the bot's voice) as it.
    settings = load(environ={**os.environ, **(env or {})})
    stt_options, _, tts_options = options(settings.models)
    conditions = list(conditions or CONDITIONS)
    say(f"bench quality: making {len(conditions)} calls' caller audio ...")
    calls = prepare(conditions, tts_options.voice, say)
    logs = Path(tempfile.mkdtemp(prefix="voicebot-quality-"))
    say("bench quality: starting the server (loading and warming the engines) ...")
    server_env = {
        "VOICEBOT_LIMITS_MAX_CALLS": str(2 * concurrency + 2),
        **(env or {}),
        "VOICEBOT_CALLS_DIR": str(logs),
    }
    start = time.monotonic()
    with serving("assistant", server_env) as port:
        placed = asyncio.run(_place(port, calls, concurrency, logs, say))
    wall = time.monotonic() - start
    say("bench quality: transcribing each turn's audio whole, offline ...")
    stt = WhisperStt(stt_options, progress=False)
    records = [read_call(f) for f in list_calls(logs)]
    logged = {r.start.get("uuid"): r.events for r in records}
    rows = []
    for call, (report, sim) in zip(calls, placed, strict=True):
        events = logged.get(report.uuid, [])
        rows += _score(call, report, sim, events, stt)
    return _result(rows, conditions, wall, logs, concurrency)


def _score(
    call: Call, report: CallReport, sim: CallerSimulator, events: list[dict[str, Any]], stt: Any
) -> list[dict[str, Any]]:
    """One row per question: what was said, heard (in the call and offline), answered; and,
    where the bot asked the caller to say it again, what it heard and answered then."""
    transfer = any(e["event"].startswith("transfer") for e in events)
    heard_in = _turns_heard(events, [r.speech_start for r in report.turns])
    said = list(zip(report.turns, heard_in, strict=True))
    again = {result.index: (result, logged) for result, logged in said if result.again}
    size = frame_bytes(8000)
    rows = []
    firsts = [(result, logged) for result, logged in said if not result.again]
    for ask, voice, pcm, (result, logged) in zip(
        ASKS, call.voices, call.turns, firsts, strict=False
    ):
        sent = sim.sent_audio[result.first_frame * size :][: len(pcm)]
        offline = stt.transcribe(bytes(sent), 8000).text
        first = _answer(ask, result, logged, transfer)
        second = _answer(ask, *again[result.index], transfer) if result.index in again else None
        rows.append(
            {
                "condition": call.condition.name,
                "voice": voice,
                "said": ask.text,
                "offline": offline,
                "facts": len(ask.facts),
                "errors": word_errors(ask.text, first["heard"]),
                "offline_errors": word_errors(ask.text, offline),
                **first,
                **_with_again(first, second),
            }
        )
    return rows


def _answer(
    ask: Ask, result: TurnResult, logged: list[dict[str, Any]], transfer: bool
) -> dict[str, Any]:
    """What the bot heard of one caller turn, and what it answered."""
    replies = [e["reply"] for e in logged]
    reply = " ".join(r for r in replies if r)
    answered = (
        (transfer and bool(logged)) if ask.transfer else result.response_latency_ms is not None
    )
    return {
        "heard": " ".join(e["transcript"] for e in logged),
        "reply": reply,
        "answered": answered,
        "facts_right": _facts_right(ask, reply),
        "asked_again": any(_asks_again(e) for e in logged),
        "repeats": any(_repeats(e["transcript"], e["reply"]) for e in logged),
        "empty": bool(logged) and not ask.transfer and not any(r.strip() for r in replies),
        "latency_ms": result.response_latency_ms,
        "talk_over": result.talk_over_frames > 0,
    }


def _with_again(first: dict[str, Any], second: dict[str, Any] | None) -> dict[str, Any]:
    """A question's outcome over both tries: right if either answer was, and so on."""
    if second is None:
        return {"facts_first_try": first["facts_right"], "said_again": False}
    either = ("answered", "facts_right", "repeats", "empty", "talk_over")
    return {
        **{key: first[key] or second[key] for key in either},
        "facts_first_try": first["facts_right"],
        "said_again": True,
        "heard_again": second["heard"],
        "reply_again": second["reply"],
        "latency_again_ms": second["latency_ms"],
    }


def _turns_heard(events: list[dict[str, Any]], starts: list[float]) -> list[list[dict[str, Any]]]:
    """The bot's logged turns of each caller turn: those logged from when the caller began it
    until the next began (a turn the bot split in two is both parts, in order)."""
    ends = [*starts[1:], float("inf")]
    turns = [e for e in events if e["event"] == "turn"]
    return [
        [e for e in turns if start <= e["t"] < end] for start, end in zip(starts, ends, strict=True)
    ]


def _facts_right(ask: Ask, reply: str) -> bool:
    said = " " + " ".join(words(reply)) + " "
    return all(any(f" {' '.join(words(alt))} " in said for alt in alts) for alts in ask.facts)


def _repeats(heard: str, reply: str) -> bool:
    caller = words(heard)
    return len(caller) >= 3 and words(reply)[: min(4, len(caller))] == caller[:4]


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [
        r[key] for r in rows for key in ("latency_ms", "latency_again_ms") if r.get(key) is not None
    ]
    with_facts = [r for r in rows if r["facts"]]
    errors = sum(r["errors"][0] for r in rows)
    offline = sum(r["offline_errors"][0] for r in rows)
    n_words = sum(r["errors"][1] for r in rows)
    return {
        "turns": len(rows),
        "answered": sum(r["answered"] for r in rows),
        "fact_questions": len(with_facts),
        "facts_right": sum(r["facts_right"] for r in with_facts),
        "facts_first_try": sum(r["facts_first_try"] for r in with_facts),
        "asked_again": sum(r["asked_again"] for r in rows),
        "repeats": sum(r["repeats"] for r in rows),
        "empty": sum(r["empty"] for r in rows),
        "talk_overs": sum(r["talk_over"] for r in rows),
        "wer": round(errors / max(1, n_words), 3),
        "offline_wer": round(offline / max(1, n_words), 3),
        "latency_ms": summary(latencies),
    }


def _result(
    rows: list[dict[str, Any]],
    conditions: list[Condition],
    wall: float,
    logs: Path,
    concurrency: int,
) -> dict[str, Any]:
    per = {c.name: _aggregate([r for r in rows if r["condition"] == c.name]) for c in conditions}
    # Whisper hears some caller voices far better than others: the same numbers by voice.
    voices = dict.fromkeys(r["voice"] for r in rows)
    by_voice = {v: _aggregate([r for r in rows if r["voice"] == v]) for v in voices}
    return {
        "concurrency": concurrency,
        "conditions": per,
        "overall": _aggregate(rows),
        "voices": by_voice,
        "wall_s": round(wall, 1),
        "turns": rows,
        "logs": str(logs),
    }


def render(result: dict[str, Any]) -> str:
    """The table by line condition, then the same numbers by caller voice."""
    lines = _table("condition", [*result["conditions"].items(), ("overall", result["overall"])])
    lines += ["", *_table("caller voice", list(result["voices"].items()))]
    lines.append(
        f"concurrency {result['concurrency']}, {result['wall_s']} s; call logs: {result['logs']}"
    )
    return "\n".join(lines)


def _table(what: str, rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    head = (
        f"{what:<22} {'answered':>9} {'facts':>7} {'1st try':>7} {'again':>5} {'repeat':>6} "
        f"{'empty':>5} "
        f"{'WER':>5} {'offline':>7} {'p50 ms':>7} {'p95 ms':>7} {'talk-over':>9}"
    )
    lines = [head, "-" * len(head)]
    for name, a in rows:
        lat = a["latency_ms"]
        lines.append(
            f"{name:<22} {a['answered']:>4}/{a['turns']:<4} "
            f"{a['facts_right']:>3}/{a['fact_questions']:<3} "
            f"{a['facts_first_try']:>3}/{a['fact_questions']:<3} {a['asked_again']:>5} "
            f"{a['repeats']:>6} {a['empty']:>5} "
            f"{a['wer'] * 100:>4.0f}% {a['offline_wer'] * 100:>6.0f}% "
            f"{lat.get('p50', '-'):>7} {lat.get('p95', '-'):>7} {a['talk_overs']:>9}"
        )
    return lines


__all__ = ["ASKS", "CONDITIONS", "Condition", "render", "run"]
