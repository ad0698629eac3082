"""The conversation: listen, understand, think and speak, streaming at every stage.

Theory of operation
-------------------
The behaviour reads caller frames from the call, feeds the :class:`~bot.turns.TurnDetector`,
and reacts to its events:

- ``Paused``: transcribe the utterance so far *speculatively*, while the caller may still go on.
  The transcript also tells the detector whether the words form a complete turn (adaptive
  hangover) and starts the reply *ahead*: LLM and TTS run during the hangover, and the audio
  waits for the endpoint. ``Resumed`` makes the speculation and the
  reply ahead stale: both are dropped, and the reply never joins the dialogue's history.
- ``EndOfTurn``: let the reply ahead out if no voiced frame came after its pause; else use the
  speculative transcript if no voiced frame came after it, or transcribe now; then start the
  reply as one task.
- The reply task streams LLM tokens (in a worker thread) into a clause splitter; each clause
  goes to TTS as soon as it is complete (the first one short), and audio chunks go to the
  playout buffer as they are synthesized (Kokoro ONNX yields a clause in several windows),
  while the LLM goes on.
- The half-duplex gate is closed while the playout clock is actually writing the bot's audio,
  plus an echo tail; barge-in (optional) cancels the reply task, drops unplayed audio and keeps
  the caller's words as the next turn.

Every turn is logged with its transcript, reply and latency marks in ms from ``speech_end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from ..asterisk.directory import TransferFailed
from ..audio import leading_silence, resample_pcm, trailing_silence
from ..call import Call
from ..config import AssistantProfile, Settings
from ..engines import EngineError
from ..engines.llm import Dialogue, Usage
from ..engines.stack import Engines
from ..engines.stt import Transcript
from ..engines.tts import speak
from ..wording import join_digits, spoken_codes
from .turns import (
    BargeIn,
    Discarded,
    EndOfTurn,
    Paused,
    Resumed,
    SileroVad,
    SpeechStarted,
    TurnDetector,
    TurnSettings,
    Vad,
    WebRtcVad,
    looks_complete,
)

log = logging.getLogger(__name__)

ECHO_TAIL: Final = (
    0.25  # seconds after the bot's last voiced frame during which the gate stays shut
)
MARKS: Final = (
    "speech_end",
    "endpoint",
    "stt_done",
    "llm_first_token",
    "first_clause",
    "tts_first_audio",
    "first_frame_out",
)
T = TypeVar("T")
MIN_REPLY_WORDS: Final = 6
# A caller asking for a person ("can I talk to a human", "operator, please").
WANTS_PERSON: Final = re.compile(
    r"\b(operator|receptionist|human being|real person|representative|"
    r"(speak|talk|put me through|transfer me|connect me)\b.{0,30}\b"
    r"(human|person|someone|somebody|colleague|agent|staff))\b",
    re.IGNORECASE,
)
TRANSFER_DIGIT: Final = "0"
SENTENCE_END: Final = re.compile(r"[.!?][\"')]*\s*$")


# --- clause splitting ---------------------------------------------------------------------------

_CUT_FIRST: Final = re.compile(r"[,;:.!?](?=\s)|[.!?]$")
_CUT_LATER: Final = re.compile(r"[.!?;:](?=\s)|[.!?]$")


class ClauseSplitter:
    """Cuts a token stream into clauses for TTS: the first one short, later ones sentences.

    The first clause ends at the first ``, ; : . ! ?`` (after ``first_min_words`` words), or at a
    word boundary once it has ``first_max_words`` words: the sooner it is complete, the sooner the
    caller hears something, and TTS time grows with its length. The second may be twice as long
    (it is synthesized while the first plays, so it must be ready before the first ends). Later
    clauses end at sentence punctuation, or at a comma once they reach ``max_words``.
    """

    def __init__(
        self, first_min_words: int = 1, first_max_words: int = 5, max_words: int = 12
    ) -> None:
        self.first_min_words = first_min_words
        self.first_max_words = first_max_words
        self.max_words = max_words
        self._buf = ""
        self._clauses = 0

    def feed(self, piece: str) -> list[str]:
        self._buf += piece
        out: list[str] = []
        while True:
            cut = self._find_cut()
            if cut is None:
                return out
            clause, self._buf = self._buf[:cut].strip(), self._buf[cut:]
            if clause:
                out.append(clause)
                self._clauses += 1

    def flush(self) -> str | None:
        clause, self._buf = self._buf.strip(), ""
        return clause or None

    def _find_cut(self) -> int | None:
        short = self._clauses < 2  # the first two clauses are kept short
        limit = self.first_max_words * (self._clauses + 1)
        pattern = _CUT_FIRST if short else _CUT_LATER
        for m in pattern.finditer(self._buf):
            if short and len(self._buf[: m.end()].split()) < self.first_min_words:
                continue
            return m.end()
        words = self._buf.split()
        if short and len(words) > limit:
            # Cut after `limit` whole words (a word is whole once the next one began).
            end = 0
            for word in words[:limit]:
                end = self._buf.index(word, end) + len(word)
            return end
        if not short and len(words) > self.max_words:
            comma = self._buf.rfind(", ")
            if comma > 0:
                return comma + 1
        return None


# --- clause audio -------------------------------------------------------------------------------

# TTS wraps every clause in silence (Kokoro: ~0.3 s before, ~0.4 s after). Between clauses that
# is a stall the caller hears, before the first it is latency. Keep a natural pause only.
KEEP_BEFORE_MS: Final = 40
# Before the answer's first sound: one 5 ms step of the onset search (below -45 dBFS), so that
# the first 20 ms frame out already sounds (20 ms kept made it a silent frame: 20 ms later).
KEEP_BEFORE_FIRST_MS: Final = 5
KEEP_AFTER_SENTENCE_MS: Final = 220
KEEP_AFTER_CLAUSE_MS: Final = 120


class ClauseTrimmer:
    """One clause's audio, piece by piece as the TTS streams it, without the silence the TTS
    put around it, less a natural pause.

    Nothing audible is held back: silence before the first sound is dropped (but the last
    ``KEEP_BEFORE_MS``), and silence at the end of each piece waits for the next one, which
    either goes on speaking (the silence was a pause inside the clause and is played) or the
    clause ends (:meth:`end` returns the pause after it, exactly ``KEEP_AFTER_*_MS`` long).
    """

    def __init__(self, rate: int, text: str, *, first: bool) -> None:
        self.rate = rate
        keep_before = KEEP_BEFORE_FIRST_MS if first else KEEP_BEFORE_MS
        keep_after = KEEP_AFTER_SENTENCE_MS if SENTENCE_END.search(text) else KEEP_AFTER_CLAUSE_MS
        self._before = 2 * round(rate * keep_before / 1000)
        self._after = 2 * round(rate * keep_after / 1000)
        self._heard = False
        self._silence = b""  # held back: before the first sound, or after the latest

    @property
    def heard(self) -> bool:
        """Whether anything audible came yet."""
        return self._heard

    def feed(self, pcm: bytes) -> bytes:
        """The part of ``pcm`` to play now."""
        pcm = self._silence + pcm
        if not self._heard:
            silent = leading_silence(pcm, self.rate, keep_ms=0)
            if silent >= len(pcm) - 2 * (self.rate // 200):  # nothing audible yet
                self._silence = pcm[len(pcm) - min(len(pcm), self._before) :]
                return b""
            self._heard = True
            pcm = pcm[max(0, silent - self._before) :]
        cut = len(pcm) - trailing_silence(pcm, self.rate, keep_ms=0)
        self._silence = pcm[cut:]
        return pcm[:cut]

    def end(self) -> bytes:
        """The pause after the clause (nothing if the clause was silent)."""
        if not self._heard:
            return b""
        pause = self._silence[: self._after]
        return pause + bytes(self._after - len(pause))


# --- running blocking generators in threads -----------------------------------------------------


async def iterate_in_thread(
    executor: ThreadPoolExecutor, make: Callable[[], Iterator[T]]
) -> AsyncGenerator[T, None]:
    """Yields the items of a blocking generator run in ``executor``.

    Consume it inside ``contextlib.aclosing()``: an async generator left by an exception in the
    loop body is only closed later by the event loop, and until then the worker runs on.
    Closing it (or cancelling the consumer) stops the worker after its current item.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def post(kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def run() -> None:
        try:
            for item in make():
                if stop.is_set():
                    break
                post("item", item)
        except BaseException as exc:  # handed to the awaiting side, which re-raises it
            post("error", exc)
        else:
            post("done", None)

    future = loop.run_in_executor(executor, run)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        # The worker stops after its current item. Not waited for: a hang-up must not wait on
        # an engine in the middle of a step (the engine's own lock keeps the next user out).
        stop.set()
        future.add_done_callback(lambda f: f.exception())


# --- sharing the TTS between calls --------------------------------------------------------------

# When a clause's audio is due (the TTS serves the one due soonest, model run by model run): a
# first clause this long after its speech end (the caller waits for it), a later one this long
# before the audio queued for its call runs out (what it may wait, plus its own synthesis).
FIRST_AUDIO_DUE_S: Final = 0.8
LATER_AUDIO_LEAD_S: Final = 1.0
# The longest a clause waits for a caller heard in a pause of ours to become a turn or stop.
FLOOR_HOLD_S: Final = 0.6


# --- per-process assets -------------------------------------------------------------------------


class Assets:
    """Engines and prompt audio shared by every call of the process."""

    def __init__(self, settings: Settings, engines: Engines, executor: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.engines = engines
        self.executor = executor
        # ("greeting:PROFILE" | "transfer:PROFILE" | "say_again:PROFILE" | "busy", rate) -> PCM
        self.prompts: dict[tuple[str, int], bytes] = {}
        self.llms: dict[str, Any] = {}  # profile -> its own LLM ([profiles.NAME] llm)
        # profile -> its system prompt with its facts (read once, at start-up)
        self.instructions: dict[str, str] = {
            name: profile.instructions()
            for name, profile in settings.profiles.items()
            if isinstance(profile, AssistantProfile)
        }
        # Replies of any call whose LLM or TTS work is not done: a call replies ahead of the
        # caller's endpoint only while there is none (guesswork must not slow a real answer).
        self.replies_working = 0

    def llm_for(self, profile: str) -> Any:
        return self.llms.get(profile, self.engines.llm)

    def prompt(self, key: str, rate: int) -> bytes:
        return self.prompts.get((key, rate), b"")

    def prepare(self) -> None:
        """Checks each profile's voice, loads per-profile LLMs, and synthesizes the prompts
        (greetings, transfer hand-overs, the busy message) at 8 and 16 kHz, once, at start."""
        tts = self.engines.tts
        loaded: dict[str, Any] = {}
        for name, profile in self.settings.profiles.items():
            if not isinstance(profile, AssistantProfile):
                continue
            if profile.voice:
                try:
                    tts.check_voice(profile.voice)
                except EngineError as exc:
                    raise EngineError(f"profiles.{name}.voice: {exc}") from exc
            if profile.llm:
                if profile.llm not in loaded:
                    loaded[profile.llm] = self._load_llm(name, profile.llm)
                self.llms[name] = loaded[profile.llm]
            self._synthesize(f"greeting:{name}", profile.greeting, profile.voice)
            if profile.transfer_extension:
                self._synthesize(f"transfer:{name}", profile.transfer_message, profile.voice)
            self._synthesize(f"say_again:{name}", profile.say_again, profile.voice)
        self._synthesize("busy", self.settings.limits.busy_message, "")
        self._synthesize("apology", self.settings.limits.apology_message, "")
        # The first call's prompt starts with its profile's system prompt: have it evaluated.
        default = self.settings.profiles.get(self.settings.server.profile)
        if isinstance(default, AssistantProfile):
            self.llm_for(self.settings.server.profile).warm_up(
                self.instructions[self.settings.server.profile]
            )

    def _load_llm(self, name: str, model: str) -> Any:
        from ..engines.llm import LlamaLlm
        from ..engines.stack import options

        llm_options = dataclasses.replace(options(self.settings.models)[1], model=model)
        try:
            llm = LlamaLlm(llm_options)
            llm.warm_up()
        except EngineError as exc:
            raise EngineError(f"profiles.{name}.llm: {exc}") from exc
        return llm

    def _synthesize(self, key: str, text: str, voice: str) -> None:
        if not text:
            return
        pcm = b"".join(speak(self.engines.tts, text, 16000, voice or None))
        self.prompts[(key, 16000)] = pcm
        self.prompts[(key, 8000)] = resample_pcm(pcm, 16000, 8000)

    def vad(self) -> Vad:
        return (
            SileroVad()
            if self.settings.turns.vad == "silero"
            else WebRtcVad(self.settings.turns.vad_mode)
        )


# --- the behaviour ------------------------------------------------------------------------------


@dataclass(slots=True)
class ClauseTiming:
    words: int
    ready: float  # monotonic: the clause's text was complete
    first_audio: float | None = None
    silence: float = 0.0  # seconds the caller heard nothing before it (0 for the first)


@dataclass
class Turn:
    index: int
    marks: dict[str, float] = field(default_factory=dict)  # monotonic times
    transcript: str = ""
    reply: str = ""
    stt_speculative: bool = False
    interrupted: bool = False
    # Whisper's doubt of the words (mean token log-probability) when too low to answer them.
    misheard: float | None = None
    unanswered: bool = False  # the model said nothing: the caller was asked to say it again
    # Ended at max_utterance_s, the voice going on: it is answered all the same.
    max_length: bool = False
    clauses: list[ClauseTiming] = field(default_factory=list)
    # Set once the turn has ended: a reply started ahead of the endpoint waits for it.
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def mark(self, name: str, t: float | None = None) -> None:
        self.marks.setdefault(name, time.monotonic() if t is None else t)

    def relative_clauses(self) -> list[list[int]]:
        """Per clause: [words, text complete, first audio (ms after speech_end), silence before
        it that the caller heard (ms; 0 for the first clause)]: where a stall came from."""
        base = self.marks.get("speech_end", 0.0)
        out = []
        for c in self.clauses:
            row = [c.words, round((c.ready - base) * 1000)]
            if c.first_audio is not None:
                row += [round((c.first_audio - base) * 1000), round(c.silence * 1000)]
            out.append(row)
        return out

    def relative_ms(self) -> dict[str, float]:
        base = self.marks.get("speech_end")
        if base is None:
            return {}
        return {
            k: round((v - base) * 1000, 1)
            for k, v in sorted(self.marks.items(), key=lambda kv: kv[1])
        }


class Assistant:
    """One call's conversation (profile kind ``assistant``)."""

    def __init__(self, call: Call, assets: Assets) -> None:
        profile = call.profile
        assert isinstance(profile, AssistantProfile)
        self.call = call
        self.profile = profile
        self.assets = assets
        self.engines = assets.engines
        self.llm = assets.llm_for(call.profile_name)
        self.dialogue = Dialogue(
            self.llm,
            system_prompt=assets.instructions[call.profile_name],
            max_tokens=assets.settings.models.llm_max_tokens,
        )
        t = assets.settings.turns
        self.turn_settings = TurnSettings(
            onset_ms=t.onset_ms,
            pre_roll_ms=t.pre_roll_ms,
            pause_ms=t.pause_ms,
            hangover_ms=t.hangover_ms,
            hangover_complete_ms=t.hangover_complete_ms,
            hangover_incomplete_ms=t.hangover_incomplete_ms,
            min_speech_ms=t.min_speech_ms,
            max_utterance_s=t.max_utterance_s,
            barge_in=profile.barge_in,
            barge_in_ms=t.barge_in_ms,
            noise_margin_db=t.noise_margin_db,
        )
        self._speculation: tuple[int, asyncio.Task[tuple[Transcript, float]]] | None = None
        self._reply: asyncio.Task[None] | None = None
        # A reply started at a pause, before the endpoint (voiced frames then, its turn).
        self._ahead_turn: tuple[int, Turn] | None = None
        self._turn: Turn | None = None
        self._turns = 0
        self._unheard_words = ""  # words of a turn whose reply was cut off before it was heard
        # Clear while the caller's voice is heard outside our own speech: the reply holds its
        # next clause (see _respond's play), so a pause mid-answer the caller took for its end
        # does not become both talking at once.
        self._caller_quiet = asyncio.Event()
        self._caller_quiet.set()
        self._transfer_asked: str | None = None  # why the caller wants a person
        # A spoken request is handed over no sooner than min_response_ms after the caller's
        # last word, and not while they are talking ("a person, ... please").
        self._transfer_after = 0.0
        call.playout.on_voice_start = self._on_voice_start
        call.on_dtmf = self._on_dtmf

    def _on_dtmf(self, digit: str) -> None:
        if digit == TRANSFER_DIGIT:
            self._transfer_asked = f"DTMF {digit}"

    def _on_voice_start(self, t: float) -> None:
        if self._turn is not None and "first_frame_out" not in self._turn.marks:
            self._turn.mark("first_frame_out", t)

    def _gated(self, now: float) -> bool:
        p = self.call.playout
        last = p.stats.last_voiced_at
        return p.speaking or (last is not None and now - last < ECHO_TAIL)

    async def run(self) -> None:
        call = self.call
        greeting = self.assets.prompt(f"greeting:{call.profile_name}", await call.audio_rate())
        if greeting:
            call.state = "greeting"
            await call.play(greeting)
            call.calllog.event("greeting", text=self.profile.greeting)
        call.state = "listening"
        first_t, first = await call.next_audio_timed()
        detector = TurnDetector(self.assets.vad(), first.rate, self.turn_settings)
        frame: tuple[float, Any] | None = (first_t, first)
        try:
            while True:
                t, audio = frame if frame is not None else await call.next_audio_timed()
                frame = None
                if (
                    self._transfer_asked is not None
                    and t >= self._transfer_after
                    and not detector.hearing(t)
                ):
                    await self._transfer(self._transfer_asked)
                reply = self._reply
                # An engine failed mid-reply: apologize, then end the call with the error.
                if reply is not None and reply.done() and not reply.cancelled():
                    failure = reply.exception()
                    if failure is not None:
                        await self._apologize(failure)
                        raise failure
                for event in detector.feed(audio.pcm, t, gated=self._gated(t)):
                    await self._on_event(event, detector)
                if detector.hearing(t):
                    self._caller_quiet.clear()
                else:
                    self._caller_quiet.set()
        finally:
            await self._cancel_reply()
            if self._speculation is not None:
                self._speculation[1].cancel()
            self.dialogue.close()  # its sequence in the LLM is free to take first

    async def _on_event(self, event: Any, detector: TurnDetector) -> None:
        if isinstance(event, BargeIn):
            dropped = self.call.buffer.clear()
            await self._cancel_reply(interrupted=True)
            self.call.state = "listening"
            self.call.calllog.event(
                "barge_in", dropped_ms=round(dropped / 2 / self.call.rate * 1000)
            )
        elif isinstance(event, SpeechStarted):
            # A voice that never stops (a monologue, a TV) was cut at max_utterance_s so that it
            # gets an answer: the voice going on does not take that answer back.
            monologue = self._turn is not None and self._turn.max_length
            if self._reply is not None and not self._reply.done() and not monologue:
                heard = self._turn is not None and "first_frame_out" in self._turn.marks
                if not heard and self._turn is not None:
                    # The caller went on before hearing anything: fold both into one turn.
                    self._unheard_words = f"{self._unheard_words} {self._turn.transcript}".strip()
                await self._cancel_reply()
                self.call.state = "listening"
        elif isinstance(event, Paused):
            self._speculate(event, detector)
        elif isinstance(event, Resumed):
            if self._speculation is not None:
                self._speculation[1].cancel()
                self._speculation = None
            await self._drop_reply_ahead()
        elif isinstance(event, Discarded):
            await self._drop_reply_ahead()
            self.call.calllog.event("turn_discarded", reason=event.reason)
            if self._unheard_words and (self._reply is None or self._reply.done()):
                self._answer_unheard(event.t)
        elif isinstance(event, EndOfTurn):
            await self._end_of_turn(event)

    async def _transcribe(self, audio: bytes) -> tuple[Transcript, float]:
        loop = asyncio.get_running_loop()
        heard = await loop.run_in_executor(
            self.assets.executor, self.engines.stt.transcribe, audio, self.call.rate
        )
        return heard, time.monotonic()

    def _speculate(self, paused: Paused, detector: TurnDetector) -> None:
        if self._speculation is not None:
            self._speculation[1].cancel()
        task = asyncio.create_task(
            self._transcribe(paused.audio), name=f"{self.call.session.uuid}-stt-speculative"
        )

        def hint(done: asyncio.Task[tuple[Transcript, float]]) -> None:
            if not done.cancelled() and done.exception() is None and detector.in_speech:
                detector.hint_complete(looks_complete(done.result()[0].text))
                if self._speculation == (paused.voiced_frames, done):
                    self._start_reply_ahead(paused.voiced_frames, *done.result())

        task.add_done_callback(hint)
        self._speculation = (paused.voiced_frames, task)

    def _start_reply_ahead(self, voiced_frames: int, transcript: Transcript, done_t: float) -> None:
        """Starts the reply to the words so far while the caller pauses: if the pause becomes
        the endpoint, the answer is already on its way (its audio waits for the endpoint);
        if the caller goes on, it is dropped, and never joins the conversation's history."""
        text = join_digits(f"{self._unheard_words} {transcript.text}".strip())
        if (
            not self.assets.settings.turns.reply_ahead
            or not re.search(r"\w", text)
            or (self.profile.transfer_extension and WANTS_PERSON.search(text))
            or self._transfer_asked is not None
            or self._misheard(transcript)
            or (self._reply is not None and not self._reply.done())
            or self.assets.replies_working > 0
        ):
            return
        turn = Turn(self._turns + 1, transcript=text, stt_speculative=True)
        turn.mark("stt_done", done_t)
        self._ahead_turn = (voiced_frames, turn)
        self._reply = asyncio.create_task(
            self._respond(turn), name=f"{self.call.session.uuid}-reply-ahead-{turn.index}"
        )

    async def _drop_reply_ahead(self) -> None:
        ahead, self._ahead_turn = self._ahead_turn, None
        if ahead is not None and not ahead[1].ended.is_set():
            await self._cancel_reply()

    async def _end_of_turn(self, end: EndOfTurn) -> None:
        ahead = self._ahead_turn
        reply = self._reply
        if ahead is not None and ahead[0] == end.voiced_frames and reply is not None:
            # No voiced frame since the pause: the reply started then is the answer.
            self._ahead_turn = self._speculation = None
            turn = ahead[1]
            self._turns = turn.index
            turn.max_length = end.reason == "max length"
            turn.mark("speech_end", end.speech_end)
            turn.mark("endpoint", end.t)
            self._unheard_words = ""
            self._turn = turn
            if not reply.done() and "tts_first_audio" not in turn.marks:
                self.call.state = "synthesizing" if "first_clause" in turn.marks else "thinking"
            turn.ended.set()
            return
        await self._drop_reply_ahead()
        self.call.state = "transcribing"
        self._turns += 1
        turn = Turn(self._turns, max_length=end.reason == "max length")
        turn.mark("speech_end", end.speech_end)
        turn.mark("endpoint", end.t)
        spec = self._speculation
        self._speculation = None
        if spec is not None and spec[0] == end.voiced_frames:
            # No voiced frame since the pause: the speculative transcript covers the turn.
            transcript, done_t = await spec[1]
            turn.stt_speculative = True
            turn.mark("stt_done", done_t)
        else:
            if spec is not None:
                spec[1].cancel()
            transcript, done_t = await self._transcribe(end.audio)
            turn.mark("stt_done", done_t)
        text = join_digits(f"{self._unheard_words} {transcript.text}".strip())
        self._unheard_words = ""
        turn.transcript = text
        if not text or not re.search(r"\w", text):
            self.call.calllog.event(
                "turn_discarded",
                reason="no words recognised",
                audio_s=round(transcript.audio_seconds, 2),
            )
            self.call.state = "listening"
            return
        await self._cancel_reply()
        wants_person = self.profile.transfer_extension and WANTS_PERSON.search(text)
        if wants_person or self._transfer_asked is not None:
            # Asked for a person (in this turn or the one before): no answer, the hand-over.
            self.call.calllog.event("turn", index=turn.index, transcript=text, reply="")
            self._transfer_asked = self._transfer_asked or "asked for a person"
            min_response = self.assets.settings.turns.min_response_ms / 1000
            self._transfer_after = end.speech_end + min_response
            return
        if self._misheard(transcript):
            turn.misheard = round(transcript.confidence or 0.0, 2)
        self._start_reply(turn)

    def _answer_unheard(self, t: float) -> None:
        """What cut the last answer off before it was heard was too short to be a turn (a
        click, a cough, a phone's DTX burst): the words that answer was for are answered now."""
        cut = self._turn
        self._turns += 1
        turn = Turn(self._turns, misheard=cut.misheard if cut is not None else None)
        turn.mark("speech_end", t)
        turn.mark("endpoint", t)
        turn.transcript, self._unheard_words = self._unheard_words, ""
        self._start_reply(turn)

    def _start_reply(self, turn: Turn) -> None:
        self._turn = turn
        turn.ended.set()
        self._reply = asyncio.create_task(
            self._respond(turn), name=f"{self.call.session.uuid}-reply-{turn.index}"
        )

    def _misheard(self, heard: Transcript) -> bool:
        """Whisper itself doubts these words: answering them would answer what the caller most
        likely did not say."""
        sure = heard.confidence is None or heard.confidence >= self.profile.misheard_below
        return bool(self.profile.say_again) and not sure

    async def _apologize(self, failure: BaseException) -> None:
        """A short prompt synthesized at start-up, so it plays even when the TTS is broken."""
        call = self.call
        call.state = "apologizing"
        while isinstance(failure, BaseExceptionGroup):  # the root cause, not its wrappers
            failure = failure.exceptions[0]
        call.calllog.event("apology", error=f"{type(failure).__name__}: {failure}")
        call.buffer.clear()
        await call.play(self.assets.prompt("apology", call.rate))
        await call.playout.drain()

    async def _transfer(self, why: str) -> None:
        """Hands the caller to the profile's transfer extension (ends the call if it works)."""
        self._transfer_asked = None
        call, profile = self.call, self.profile
        if not profile.transfer_extension:
            call.calllog.event("transfer_unavailable", why=why, reason="no transfer_extension")
            return
        route = call.route
        control = route.control if route is not None else None
        if route is None or control is None:
            call.calllog.event(
                "transfer_unavailable", why=why, reason="no ARI or AMI link knows this call"
            )
            return
        await self._cancel_reply(interrupted=True)
        call.buffer.clear()
        target = f"{profile.transfer_extension}@{profile.transfer_context}"
        call.state = "transferring"
        call.calllog.event("transfer", why=why, to=target, via=control.name)
        await call.play(self.assets.prompt(f"transfer:{call.profile_name}", call.rate))
        await call.playout.drain()
        try:
            await control.transfer(route, profile.transfer_context, profile.transfer_extension)
        except TransferFailed as exc:
            call.calllog.event("transfer_failed", to=target, error=str(exc))
            call.state = "listening"
            call.log.warning("transfer to %s failed: %s", target, exc)
            return
        call.release(f"transferred to {target}")

    async def _cancel_reply(self, *, interrupted: bool = False) -> None:
        task, self._reply = self._reply, None
        if task is None or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if interrupted and self._turn is not None:
            self._turn.interrupted = True

    def _speaker(self, text: str, rate: int, due: float) -> Callable[[], Iterator[bytes]]:
        said = spoken_codes(text)  # a code is read back digit by digit
        return lambda: speak(self.engines.tts, said, rate, self.profile.voice or None, due=due)

    async def _respond(self, turn: Turn) -> None:
        call = self.call
        executor = self.assets.executor
        first_words = self.assets.settings.turns.first_clause_words
        splitter = ClauseSplitter(first_max_words=first_words)
        clauses: asyncio.Queue[tuple[str, float] | None] = asyncio.Queue()  # and when complete
        usage = Usage()
        pieces: list[str] = []
        # On 2 cores the LLM decoding on and the TTS synthesizing the first clause slow each
        # other down; the first clause is what the caller waits for, so the LLM pauses from
        # the first clause until that clause is synthesized (its audio streams out as it is
        # made, and must not fall behind the playout). The worker sees the clause complete
        # itself (the same splitter, fed the same pieces) and pauses before decoding the next
        # token: told by the event loop, it would decode one more token alongside the TTS.
        llm_may_run = threading.Event()
        llm_may_run.set()

        def tokens() -> Iterator[str]:
            llm = self.llm
            text = ""
            first_clause = ClauseSplitter(first_max_words=first_words)
            first_seen = False
            for piece in self.dialogue.reply(turn.transcript, usage=usage, keep=turn.ended.is_set):
                if not first_seen and first_clause.feed(piece):
                    first_seen = True
                    llm_may_run.clear()  # before the piece is out: ``talk`` sets it again
                yield piece
                text += piece
                # A phone answer is short: stop at the end of the first sentence that
                # brings the reply to MIN_REPLY_WORDS (the model and the TTS are freed sooner).
                if SENTENCE_END.search(text) and len(text.split()) >= MIN_REPLY_WORDS:
                    return
                # Pause only a model that would then be idle: beside other calls' replies
                # (decoded in the same steps) the pause frees no core and only delays this one.
                if not llm.contended:
                    llm_may_run.wait(2.0)

        async def think() -> None:
            try:
                async with contextlib.aclosing(iterate_in_thread(executor, tokens)) as stream:
                    async for piece in stream:
                        turn.mark("llm_first_token")
                        pieces.append(piece)
                        for clause in splitter.feed(piece):
                            if "first_clause" not in turn.marks:
                                turn.mark("first_clause")
                                if turn.ended.is_set():
                                    call.state = "synthesizing"
                            clauses.put_nowait((clause, time.monotonic()))
                rest = splitter.flush()
                if rest:
                    turn.mark("first_clause")
                    clauses.put_nowait((rest, time.monotonic()))
            finally:
                clauses.put_nowait(None)

        played: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def talk() -> None:
            """Synthesizes clause after clause; ``play`` sends the audio on as it comes."""
            rate = call.rate
            runs_out = 0.0  # when the audio made so far will have played (about)

            def queue(pcm: bytes) -> None:
                nonlocal runs_out
                runs_out = max(runs_out, time.monotonic()) + len(pcm) / 2 / rate
                played.put_nowait(pcm)

            try:
                while (item := await clauses.get()) is not None:
                    clause, ready = item
                    first = "tts_first_audio" not in turn.marks
                    trimmer = ClauseTrimmer(rate, clause, first=first)
                    timing = ClauseTiming(len(clause.split()), ready)
                    turn.clauses.append(timing)
                    if first:
                        due = turn.marks.get("speech_end", time.monotonic()) + FIRST_AUDIO_DUE_S
                    else:
                        due = runs_out - LATER_AUDIO_LEAD_S
                    audio = iterate_in_thread(executor, self._speaker(clause, rate, due))
                    async with contextlib.aclosing(audio):
                        async for chunk in audio:
                            if pcm := trimmer.feed(chunk):
                                turn.mark("tts_first_audio")
                                if timing.first_audio is None:
                                    timing.first_audio = time.monotonic()
                                    if runs_out:
                                        timing.silence = max(0.0, timing.first_audio - runs_out)
                                queue(pcm)
                    if trimmer.heard:
                        queue(trimmer.end())
                    if not llm_may_run.is_set():
                        await turn.ended.wait()  # a reply ahead goes no further
                        llm_may_run.set()  # the first clause is synthesized
                if not "".join(pieces).strip() and self.profile.say_again:
                    # Words Whisper doubts, or a model with nothing to say but the caller's
                    # words: the caller is asked to say it again, never left in silence.
                    turn.reply, turn.unanswered = self.profile.say_again, turn.misheard is None
                    queue(self.assets.prompt(f"say_again:{call.profile_name}", rate))
            finally:
                played.put_nowait(None)

        async def play() -> None:
            await turn.ended.wait()  # a reply ahead of the endpoint waits for it
            # A question ends its turn after a short hangover, so the answer is under way
            # sooner; it is heard no sooner than min_response_ms after the caller's last word
            # all the same: a caller who only took a breath after question-like words ("Could
            # you recommend a good book, ... please?") is heard going on first (the clause is
            # held, then SpeechStarted folds both parts into one turn).
            earliest = turn.marks["speech_end"] + self.assets.settings.turns.min_response_ms / 1000
            if (wait := earliest - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            while (pcm := await played.get()) is not None:
                # Nothing of ours is playing and the caller's voice began: wait until it
                # stops, or becomes a turn (SpeechStarted cancels this reply); a line whose
                # noise keeps the VAD flickering holds a clause no longer than FLOOR_HOLD_S.
                if not self._caller_quiet.is_set() and not self._gated(time.monotonic()):
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(FLOOR_HOLD_S):
                            await self._caller_quiet.wait()
                call.state = "speaking"
                await call.play(pcm)

        if turn.ended.is_set():
            call.state = "thinking"
        try:
            self.assets.replies_working += 1
            try:
                async with asyncio.TaskGroup() as tg:
                    if turn.misheard is None:
                        tg.create_task(think(), name=f"{call.session.uuid}-think-{turn.index}")
                    else:  # doubted words are not answered, nor kept in the LLM's history
                        clauses.put_nowait(None)
                    tg.create_task(talk(), name=f"{call.session.uuid}-talk-{turn.index}")
                    await play()
            finally:
                self.assets.replies_working -= 1
            await call.playout.drain()
            call.state = "listening"
        finally:
            llm_may_run.set()  # a worker paused between tokens sees the stop at once
            turn.reply = turn.reply or "".join(pieces).strip()
            if turn.ended.is_set():
                call.calllog.event(
                    "turn",
                    index=turn.index,
                    transcript=turn.transcript,
                    reply=turn.reply,
                    stt_speculative=turn.stt_speculative,
                    interrupted=turn.interrupted or asyncio.current_task().cancelling() > 0,  # type: ignore[union-attr]
                    llm_tokens=usage.completion_tokens,
                    llm_wait_ms=round(usage.wait_s * 1000, 1),
                    llm_first_token_ms=round((usage.first_token_s or 0.0) * 1000, 1),
                    marks_ms=turn.relative_ms(),
                    clauses=turn.relative_clauses(),
                    **({"unanswered": True} if turn.unanswered else {}),
                    **({"misheard": turn.misheard} if turn.misheard is not None else {}),
                    **({"max_length": True} if turn.max_length else {}),
                )
            else:  # the caller went on: this reply was never heard
                call.calllog.event(
                    "reply_ahead_dropped",
                    transcript=turn.transcript,
                    reply=turn.reply,
                    llm_tokens=usage.completion_tokens,
                )
