"""The assistant: one call's conversation, a state machine over the turn detector's events.

Theory of operation
-------------------
The assistant reads caller frames from the call, feeds the :class:`~.turns.TurnDetector`, and
reacts to its events:

- ``Paused``: transcribe the utterance so far *speculatively*, while the caller may still go on.
  The transcript also tells the detector whether the words form a complete turn (adaptive
  hangover) and starts the reply *ahead*: LLM and TTS run during the hangover, and the audio
  waits for the endpoint. ``Resumed`` makes the speculation and the reply ahead stale: both are
  dropped, and the reply never joins the dialogue's history.
- ``EndOfTurn``: let the reply ahead out if no voiced frame came after its pause; else use the
  speculative transcript if no voiced frame came after it, or transcribe now; then start the
  :class:`~.reply.Reply` as one task.
- ``SpeechStarted`` while a reply is under way: the caller went on. A reply not yet heard is
  cancelled and its words are answered together with what the caller says next.
- ``BargeIn`` (optional): the reply is cancelled, its unplayed audio dropped, and the caller's
  words are kept as the next turn.

The half-duplex gate is closed while the call plays the bot's voice, plus an echo tail
(:meth:`~bot.call.Call.gated`). A caller who asks for a person, or presses 0, is handed to the
profile's transfer extension. Every turn is logged with its transcript, reply and latency marks
in ms from ``speech_end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Final

from .. import clock
from ..asterisk.directory import TransferFailed
from ..call import BotVoiceStarted, Call, CallState, Dtmf
from ..config import AssistantProfile
from ..engines.base import Transcript
from ..wording import join_digits
from .assets import Assets
from .dialogue import Dialogue
from .records import Turn
from .reply import Reply
from .turns import (
    BargeIn,
    Discarded,
    EndOfTurn,
    Paused,
    Resumed,
    SpeechStarted,
    TurnDetector,
    TurnEvent,
    looks_complete,
)

# A caller asking for a person ("can I talk to a human", "operator, please").
WANTS_PERSON: Final = re.compile(
    r"\b(operator|receptionist|human being|real person|representative|"
    r"(speak|talk|put me through|transfer me|connect me)\b.{0,30}\b"
    r"(human|person|someone|somebody|colleague|agent|staff))\b",
    re.IGNORECASE,
)
TRANSFER_DIGIT: Final = "0"


class Assistant:
    """One call's conversation (profile kind ``assistant``)."""

    def __init__(self, call: Call, assets: Assets) -> None:
        profile = call.profile
        assert isinstance(profile, AssistantProfile)
        self.call = call
        self.profile = profile
        self.assets = assets
        self.dialogue = Dialogue(
            assets.llm_for(call.profile_name),
            system_prompt=assets.instructions[call.profile_name],
            max_tokens=assets.settings.models.llm_max_tokens,
        )
        self._speculation: tuple[int, asyncio.Task[tuple[Transcript, float]]] | None = None
        self._reply: asyncio.Task[None] | None = None
        # A reply started at a pause, before the endpoint (voiced frames then, its turn).
        self._ahead_turn: tuple[int, Turn] | None = None
        self._turn: Turn | None = None
        self._turns = 0
        self._unheard_words = ""  # words of a turn whose reply was cut off before it was heard
        # Clear while the caller's voice is heard outside our own speech: the reply holds its
        # next clause, so a pause mid-answer the caller took for its end does not become both
        # talking at once.
        self._caller_quiet = asyncio.Event()
        self._caller_quiet.set()
        self._transfer_asked: str | None = None  # why the caller wants a person
        # A spoken request is handed over no sooner than min_response_ms after the caller's
        # last word, and not while they are talking ("a person, ... please").
        self._transfer_after = 0.0

    # --- the call's loop ---------------------------------------------------------------------

    async def run(self) -> None:
        await self._greet()
        first_t, first = await self.call.next_audio_timed()
        detector = TurnDetector(
            self.assets.new_vad(),
            first.rate,
            self.assets.settings.turns,
            barge_in=self.profile.barge_in,
        )
        frame: tuple[float, bytes] | None = (first_t, first.pcm)
        try:
            while True:
                if frame is None:
                    t, audio = await self.call.next_audio_timed()
                    frame = (t, audio.pcm)
                await self._frame(*frame, detector)
                frame = None
        finally:
            await self._cancel_reply()
            if self._speculation is not None:
                self._speculation[1].cancel()
            self.dialogue.close()  # its sequence in the LLM is free to take first

    async def _greet(self) -> None:
        call = self.call
        greeting = self.assets.prompt(f"greeting:{call.profile_name}", await call.audio_rate())
        if greeting:
            call.state = CallState.GREETING
            await call.play(greeting)
            call.calllog.event("greeting", text=self.profile.greeting)
        call.state = CallState.LISTENING

    async def _frame(self, t: float, pcm: bytes, detector: TurnDetector) -> None:
        self._take_call_events()
        asked = self._transfer_asked
        if asked is not None and t >= self._transfer_after and not detector.hearing(t):
            await self._transfer(asked)
        await self._raise_reply_failure()
        for event in detector.feed(pcm, t, gated=self.call.gated(t)):
            await self._on_event(event, detector)
        if detector.hearing(t):
            self._caller_quiet.clear()
        else:
            self._caller_quiet.set()

    def _take_call_events(self) -> None:
        for event in self.call.events():
            if isinstance(event, Dtmf) and event.digit == TRANSFER_DIGIT:
                self._transfer_asked = f"DTMF {event.digit}"
            elif isinstance(event, BotVoiceStarted):
                self._bot_heard(event.t)

    def _bot_heard(self, t: float) -> None:
        if self._turn is not None:
            self._turn.mark("first_frame_out", t)

    async def _raise_reply_failure(self) -> None:
        """An engine failed mid-reply: apologize, then end the call with the error."""
        reply = self._reply
        if reply is not None and reply.done() and not reply.cancelled():
            failure = reply.exception()
            if failure is not None:
                await self._apologize(failure)
                raise failure

    # --- the turn detector's events ----------------------------------------------------------

    async def _on_event(self, event: TurnEvent, detector: TurnDetector) -> None:
        if isinstance(event, BargeIn):
            await self._barged_in()
        elif isinstance(event, SpeechStarted):
            await self._speech_started()
        elif isinstance(event, Paused):
            self._speculate(event, detector)
        elif isinstance(event, Resumed):
            await self._resumed()
        elif isinstance(event, Discarded):
            await self._discarded(event)
        elif isinstance(event, EndOfTurn):
            await self._end_of_turn(event)

    async def _barged_in(self) -> None:
        dropped = self.call.interrupt()
        await self._cancel_reply(interrupted=True)
        self.call.state = CallState.LISTENING
        self.call.calllog.event("barge_in", dropped_ms=round(dropped * 1000))

    async def _speech_started(self) -> None:
        # A voice that never stops (a monologue, a TV) was cut at max_utterance_s so that it
        # gets an answer: the voice going on does not take that answer back.
        turn = self._turn
        if self._reply is None or self._reply.done() or (turn is not None and turn.max_length):
            return
        if turn is not None and "first_frame_out" not in turn.marks:
            # The caller went on before hearing anything: fold both into one turn.
            self._unheard_words = f"{self._unheard_words} {turn.transcript}".strip()
        await self._cancel_reply()
        self.call.state = CallState.LISTENING

    async def _resumed(self) -> None:
        if self._speculation is not None:
            self._speculation[1].cancel()
            self._speculation = None
        await self._drop_reply_ahead()

    async def _discarded(self, event: Discarded) -> None:
        await self._drop_reply_ahead()
        self.call.calllog.event("turn_discarded", reason=event.reason)
        if self._unheard_words and (self._reply is None or self._reply.done()):
            self._answer_unheard(event.t)

    # --- hearing -----------------------------------------------------------------------------

    async def _transcribe(self, audio: bytes) -> tuple[Transcript, float]:
        loop = asyncio.get_running_loop()
        stt = self.assets.engines.stt
        heard = await loop.run_in_executor(
            self.assets.executor, stt.transcribe, audio, self.call.rate
        )
        return heard, clock.now()

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

    async def _heard(self, end: EndOfTurn, turn: Turn) -> Transcript:
        """The turn's words: the speculative transcript if no voiced frame came after it."""
        spec, self._speculation = self._speculation, None
        if spec is not None and spec[0] == end.voiced_frames:
            transcript, done_t = await spec[1]
            turn.stt_speculative = True
        else:
            if spec is not None:
                spec[1].cancel()
            transcript, done_t = await self._transcribe(end.audio)
        turn.mark("stt_done", done_t)
        return transcript

    def _misheard(self, heard: Transcript) -> bool:
        """Whisper itself doubts these words: answering them would answer what the caller most
        likely did not say."""
        sure = heard.confidence is None or heard.confidence >= self.profile.misheard_below
        return bool(self.profile.say_again) and not sure

    def _wants_person(self, text: str) -> bool:
        asked = self.profile.transfer_extension and WANTS_PERSON.search(text)
        return bool(asked) or self._transfer_asked is not None

    # --- the end of a turn -------------------------------------------------------------------

    async def _end_of_turn(self, end: EndOfTurn) -> None:
        if self._let_reply_ahead_out(end):
            return
        await self._drop_reply_ahead()
        self.call.state = CallState.TRANSCRIBING
        self._turns += 1
        turn = Turn(self._turns, max_length=end.reason == "max length")
        turn.mark("speech_end", end.speech_end)
        turn.mark("endpoint", end.t)
        transcript = await self._heard(end, turn)
        text = join_digits(f"{self._unheard_words} {transcript.text}".strip())
        self._unheard_words = ""
        turn.transcript = text
        if not re.search(r"\w", text):
            self.call.calllog.event(
                "turn_discarded",
                reason="no words recognised",
                audio_s=round(transcript.audio_seconds, 2),
            )
            self.call.state = CallState.LISTENING
            return
        await self._cancel_reply()
        if self._wants_person(text):
            # Asked for a person (in this turn or the one before): no answer, the hand-over.
            self.call.calllog.event("turn", index=turn.index, transcript=text, reply="")
            self._transfer_asked = self._transfer_asked or "asked for a person"
            min_response = self.assets.settings.turns.min_response_ms / 1000
            self._transfer_after = end.speech_end + min_response
            return
        if self._misheard(transcript):
            turn.misheard = round(transcript.confidence or 0.0, 2)
        self._start_reply(turn)

    def _let_reply_ahead_out(self, end: EndOfTurn) -> bool:
        """No voiced frame since the pause: the reply started then is the answer."""
        ahead, reply = self._ahead_turn, self._reply
        if ahead is None or ahead[0] != end.voiced_frames or reply is None:
            return False
        self._ahead_turn = self._speculation = None
        turn = ahead[1]
        self._turns = turn.index
        turn.max_length = end.reason == "max length"
        turn.mark("speech_end", end.speech_end)
        turn.mark("endpoint", end.t)
        self._unheard_words = ""
        self._turn = turn
        if not reply.done() and "tts_first_audio" not in turn.marks:
            synthesizing = "first_clause" in turn.marks
            self.call.state = CallState.SYNTHESIZING if synthesizing else CallState.THINKING
        turn.ended.set()
        return True

    # --- replies -----------------------------------------------------------------------------

    def _start_reply_ahead(self, voiced_frames: int, transcript: Transcript, done_t: float) -> None:
        """Starts the reply to the words so far while the caller pauses: if the pause becomes
        the endpoint, the answer is already on its way (its audio waits for the endpoint); if
        the caller goes on, it is dropped, and never joins the conversation's history."""
        text = join_digits(f"{self._unheard_words} {transcript.text}".strip())
        if (
            not self.assets.settings.turns.reply_ahead
            or not re.search(r"\w", text)
            or self._wants_person(text)
            or self._misheard(transcript)
            or (self._reply is not None and not self._reply.done())
            or self.assets.activity.replies > 0
        ):
            return
        turn = Turn(self._turns + 1, transcript=text, stt_speculative=True)
        turn.mark("stt_done", done_t)
        self._ahead_turn = (voiced_frames, turn)
        self._reply = self._reply_task(turn, "reply-ahead")

    async def _drop_reply_ahead(self) -> None:
        ahead, self._ahead_turn = self._ahead_turn, None
        if ahead is not None and not ahead[1].ended.is_set():
            await self._cancel_reply()

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
        self._reply = self._reply_task(turn, "reply")

    def _reply_task(self, turn: Turn, kind: str) -> asyncio.Task[None]:
        reply = Reply(turn, self.call, self.assets, self.dialogue, self._caller_quiet)
        return asyncio.create_task(
            reply.run(), name=f"{self.call.session.uuid}-{kind}-{turn.index}"
        )

    async def _cancel_reply(self, *, interrupted: bool = False) -> None:
        task, self._reply = self._reply, None
        if task is None or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if interrupted and self._turn is not None:
            self._turn.interrupted = True

    # --- apology and hand-over ---------------------------------------------------------------

    async def _apologize(self, failure: BaseException) -> None:
        """A short prompt synthesized at start-up, so it plays even when the TTS is broken."""
        call = self.call
        call.state = CallState.APOLOGIZING
        while isinstance(failure, BaseExceptionGroup):  # the root cause, not its wrappers
            failure = failure.exceptions[0]
        call.calllog.event("apology", error=f"{type(failure).__name__}: {failure}")
        call.interrupt()
        await call.play(self.assets.prompt("apology", call.rate))
        await call.drain()

    async def _transfer(self, why: str) -> None:
        """Hands the caller to the profile's transfer extension (ends the call if it works)."""
        self._transfer_asked = None
        call, profile = self.call, self.profile
        route = call.route
        control = route.control if route is not None else None
        if not profile.transfer_extension:
            call.calllog.event("transfer_unavailable", why=why, reason="no transfer_extension")
            return
        if route is None or control is None:
            call.calllog.event(
                "transfer_unavailable", why=why, reason="no ARI or AMI link knows this call"
            )
            return
        await self._cancel_reply(interrupted=True)
        call.interrupt()
        target = f"{profile.transfer_extension}@{profile.transfer_context}"
        call.state = CallState.TRANSFERRING
        call.calllog.event("transfer", why=why, to=target, via=control.name)
        await call.play(self.assets.prompt(f"transfer:{call.profile_name}", call.rate))
        await call.drain()
        try:
            await control.transfer(route, profile.transfer_context, profile.transfer_extension)
        except TransferFailed as exc:
            call.calllog.event("transfer_failed", to=target, error=str(exc))
            call.state = CallState.LISTENING
            call.log.warning("transfer to %s failed: %s", target, exc)
            return
        call.release(f"transferred to {target}")
