"""One answer to one turn: LLM tokens -> clauses -> TTS -> the call's playout, streaming.

Theory of operation
-------------------
A :class:`Reply` is one task (barge-in, a caller who goes on, or a hang-up cancels it) running
three stages in one task group, joined by bounded queues:

- ``_think`` streams the LLM's tokens (a worker thread) into a :class:`ClauseSplitter`; each
  clause is queued as soon as it is complete, while the LLM goes on.
- ``_talk`` synthesizes clause after clause (a worker thread; Kokoro yields a clause in
  several windows), trims the TTS's silence around it and queues the audio as it comes.
- ``_play`` waits for the turn's end (a reply started ahead of the endpoint waits for it) and
  for ``min_response_ms`` after the caller's last word, then hands the audio to the call,
  holding a clause while the caller talks in a pause of ours.

On 2 cores the LLM decoding and the TTS synthesizing the first clause slow each other down; the
first clause is what the caller waits for, so the LLM pauses from the first clause until that
clause is synthesized. The LLM's worker sees the clause complete itself (the same splitter, fed
the same pieces) and pauses before decoding the next token: told by the event loop, it would
decode one more token alongside the TTS.

Every reply is logged when it ends: a ``turn`` with its marks, or ``reply_ahead_dropped`` for a
reply started ahead of an endpoint that never came.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Final

from .. import clock
from ..call import Call, CallState
from ..config import AssistantProfile
from ..engines.base import Usage
from ..engines.tts import speak
from ..wording import spoken_codes
from .assets import Assets
from .clauses import SENTENCE_END, ClauseSplitter, ClauseTrimmer
from .dialogue import Dialogue
from .records import ClauseTiming, Turn
from .threads import iterate_in_thread

# A phone answer is short: the reply stops at the end of the first sentence that brings it to
# this many words (the model and the TTS are freed sooner).
MIN_REPLY_WORDS: Final = 6
# When a clause's audio is due (the TTS serves the one due soonest, model run by model run): a
# first clause this long after its speech end (the caller waits for it), a later one this long
# before the audio queued for its call runs out (what it may wait, plus its own synthesis).
FIRST_AUDIO_DUE_S: Final = 0.8
LATER_AUDIO_LEAD_S: Final = 1.0
# The longest a clause waits for a caller heard in a pause of ours to become a turn or stop.
FLOOR_HOLD_S: Final = 0.6
# How long the paused LLM worker sleeps between looks at whether it may go on (a stop, or the
# first clause synthesized, wakes it at once).
LLM_PAUSE_CHECK_S: Final = 2.0
# Queue bounds; overflow policy for both: the producer waits (the LLM's worker runs on into its
# own stream, bounded by max_tokens; the TTS's into the clause it is synthesizing).
CLAUSES_QUEUED: Final = 16
AUDIO_QUEUED: Final = 64


class Reply:
    """One answer: started at a turn's end, or ahead of it at a pause (``turn.ended`` clear)."""

    def __init__(
        self,
        turn: Turn,
        call: Call,
        assets: Assets,
        dialogue: Dialogue,
        caller_quiet: asyncio.Event,
    ) -> None:
        profile = call.profile
        assert isinstance(profile, AssistantProfile)
        self.turn = turn
        self.call = call
        self.profile = profile
        self.assets = assets
        self.dialogue = dialogue
        # Clear while the caller's voice is heard outside our own speech (see _play).
        self.caller_quiet = caller_quiet
        self.usage = Usage()
        self.pieces: list[str] = []
        self._first_words = assets.settings.turns.first_clause_words
        self._clauses: asyncio.Queue[tuple[str, float] | None] = asyncio.Queue(CLAUSES_QUEUED)
        self._audio: asyncio.Queue[bytes | None] = asyncio.Queue(AUDIO_QUEUED)
        self._llm_may_run = threading.Event()
        self._llm_may_run.set()
        self._runs_out = 0.0  # when the audio made so far will have played (about)
        self.underruns = 0  # times the line ran dry between two pieces of this answer

    @property
    def text(self) -> str:
        return "".join(self.pieces).strip()

    async def run(self) -> None:
        turn, call = self.turn, self.call
        if turn.ended.is_set():
            call.state = CallState.THINKING
        try:
            with self.assets.activity.replying():
                async with asyncio.TaskGroup() as tg:
                    name = f"{call.session.uuid}-%s-{turn.index}"
                    if turn.misheard is None:
                        tg.create_task(self._think(), name=name % "think")
                    else:  # doubted words are not answered, nor kept in the LLM's history
                        await self._clauses.put(None)
                    tg.create_task(self._talk(), name=name % "talk")
                    await self._play()
            await call.drain()
            call.state = CallState.LISTENING
        finally:
            self._llm_may_run.set()  # a worker paused between tokens sees the stop at once
            turn.reply = turn.reply or self.text
            task = asyncio.current_task()
            self._log(cancelled=task is not None and task.cancelling() > 0)

    # --- the LLM -----------------------------------------------------------------------------

    def _tokens(self) -> Iterator[str]:
        """The LLM's pieces (runs in a worker thread)."""
        llm = self.dialogue.llm
        text = ""
        first_clause = ClauseSplitter(first_max_words=self._first_words)
        first_seen = False
        turn = self.turn
        for piece in self.dialogue.reply(turn.transcript, usage=self.usage, keep=turn.ended.is_set):
            if not first_seen and first_clause.feed(piece):
                first_seen = True
                self._llm_may_run.clear()  # before the piece is out: ``_talk`` sets it again
            yield piece
            text += piece
            if SENTENCE_END.search(text) and len(text.split()) >= MIN_REPLY_WORDS:
                return
            # Pause only a model that would then be idle: beside other calls' replies (decoded
            # in the same steps) the pause frees no core and only delays this one.
            if not llm.contended:
                self._llm_may_run.wait(LLM_PAUSE_CHECK_S)

    async def _think(self) -> None:
        turn = self.turn
        splitter = ClauseSplitter(first_max_words=self._first_words)
        stream = iterate_in_thread(self.assets.executor, self._tokens)
        async with contextlib.aclosing(stream):
            async for piece in stream:
                turn.mark("llm_first_token")
                self.pieces.append(piece)
                for clause in splitter.feed(piece):
                    await self._clause(clause)
        if rest := splitter.flush():
            await self._clause(rest)
        await self._clauses.put(None)  # (a failure or a cancel ends the whole task group)

    async def _clause(self, clause: str) -> None:
        turn = self.turn
        if "first_clause" not in turn.marks:
            turn.mark("first_clause")
            if turn.ended.is_set():
                self.call.state = CallState.SYNTHESIZING
        await self._clauses.put((clause, clock.now()))

    # --- the TTS -----------------------------------------------------------------------------

    async def _talk(self) -> None:
        """Synthesizes clause after clause; ``_play`` sends the audio on as it comes."""
        while (item := await self._clauses.get()) is not None:
            await self._synthesize(*item)
            if not self._llm_may_run.is_set():
                await self.turn.ended.wait()  # a reply ahead goes no further
                self._llm_may_run.set()  # the first clause is synthesized
        if not self.text and self.profile.say_again:
            # Words Whisper doubts, or a model with nothing to say but the caller's words: the
            # caller is asked to say it again, never left in silence.
            turn = self.turn
            turn.reply, turn.unanswered = self.profile.say_again, turn.misheard is None
            await self._queue_audio(
                self.assets.prompt(f"say_again:{self.call.profile_name}", self.call.rate)
            )
        await self._audio.put(None)

    async def _synthesize(self, clause: str, ready: float) -> None:
        turn, rate = self.turn, self.call.rate
        first = "tts_first_audio" not in turn.marks
        trimmer = ClauseTrimmer(rate, clause, first=first)
        timing = ClauseTiming(len(clause.split()), ready)
        turn.clauses.append(timing)
        if first:
            due = turn.marks.get("speech_end", clock.now()) + FIRST_AUDIO_DUE_S
        else:
            due = self._runs_out - LATER_AUDIO_LEAD_S
        audio = iterate_in_thread(self.assets.executor, self._speaker(clause, rate, due))
        async with contextlib.aclosing(audio):
            async for chunk in audio:
                if pcm := trimmer.feed(chunk):
                    turn.mark("tts_first_audio")
                    if timing.first_audio is None:
                        timing.first_audio = clock.now()
                        if self._runs_out:
                            timing.silence = max(0.0, timing.first_audio - self._runs_out)
                    await self._queue_audio(pcm)
        if trimmer.heard:
            await self._queue_audio(trimmer.end())

    def _speaker(self, text: str, rate: int, due: float) -> Callable[[], Iterator[bytes]]:
        said = spoken_codes(text)  # a code is read back digit by digit
        tts, voice = self.assets.engines.tts, self.profile.voice or None
        return lambda: speak(tts, said, rate, voice, due=due)

    async def _queue_audio(self, pcm: bytes) -> None:
        self._runs_out = max(self._runs_out, clock.now()) + len(pcm) / 2 / self.call.rate
        await self._audio.put(pcm)

    # --- the call ----------------------------------------------------------------------------

    async def _play(self) -> None:
        turn, call = self.turn, self.call
        await turn.ended.wait()  # a reply ahead of the endpoint waits for it
        # A reply complete before the endpoint joins the history now; the LLM prepares the
        # next turn's prompt in a worker, as the reply's own end would have had it do.
        if self.dialogue.keep_held(turn.ended.is_set):
            self.assets.executor.submit(self.dialogue.prepare_next)
        # A question ends its turn after a short hangover, so the answer is under way sooner; it
        # is heard no sooner than min_response_ms after the caller's last word all the same: a
        # caller who only took a breath after question-like words ("Could you recommend a good
        # book, ... please?") is heard going on first (the clause is held, then SpeechStarted
        # folds both parts into one turn).
        earliest = turn.marks["speech_end"] + self.assets.settings.turns.min_response_ms / 1000
        if (wait := earliest - clock.now()) > 0:
            await asyncio.sleep(wait)
        played = False
        while (pcm := await self._audio.get()) is not None:
            if played and not call.playing:
                self.underruns += 1  # the caller heard a gap: this piece came late
            await self._caller_done()
            call.state = CallState.SPEAKING
            await call.play(pcm)
            played = True

    async def _caller_done(self) -> None:
        """Nothing of ours is playing and the caller's voice began: wait until it stops, or
        becomes a turn (SpeechStarted cancels this reply); a line whose noise keeps the VAD
        flickering holds a clause no longer than FLOOR_HOLD_S."""
        if not self.caller_quiet.is_set() and not self.call.gated(clock.now()):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLOOR_HOLD_S):
                    await self.caller_quiet.wait()

    def _log(self, *, cancelled: bool) -> None:
        turn, usage = self.turn, self.usage
        if not turn.ended.is_set():  # the caller went on: this reply was never heard
            self.call.calllog.event(
                "reply_ahead_dropped",
                transcript=turn.transcript,
                reply=turn.reply,
                llm_tokens=usage.completion_tokens,
            )
            return
        speech_end = turn.marks.get("speech_end")
        self.call.calllog.event(
            "turn",
            index=turn.index,
            **(
                {"at_s": round(self.call.since_start(speech_end), 3)}
                if speech_end is not None
                else {}
            ),
            transcript=turn.transcript,
            reply=turn.reply,
            stt_speculative=turn.stt_speculative,
            interrupted=turn.interrupted or cancelled,
            llm_tokens=usage.completion_tokens,
            llm_wait_ms=round(usage.wait_s * 1000, 1),
            llm_first_token_ms=round((usage.first_token_s or 0.0) * 1000, 1),
            marks_ms=turn.relative_ms(),
            clauses=turn.relative_clauses(),
            underruns=self.underruns,
            **({"unanswered": True} if turn.unanswered else {}),
            **({"misheard": turn.misheard} if turn.misheard is not None else {}),
            **({"max_length": True} if turn.max_length else {}),
        )
