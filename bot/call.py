"""One call: its tasks, its per-call log, and how it ends.

Theory of operation
-------------------
A :class:`Call` runs three kinds of task in one ``TaskGroup``: the *reader* (caller audio into a
bounded queue, DTMF into the log and to the profile), the *playout clock* (one frame per 20 ms to
Asterisk from the first moment of the call to the last), and the profile's *behaviour* (echo now;
the conversation later). Whatever ends the call — the caller hanging up, a protocol error, the
profile hanging up, a task failing — raises :class:`CallEnded` (or another exception) inside the
group, which cancels every other task of this call and nothing else. The log is closed in
``finally`` with the reason, so every call's log ends with exactly one ``call_end``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from . import clock
from .asterisk import audiosocket as proto
from .asterisk.directory import Directory, Route
from .asterisk.server import CALLER_HUNG_UP, ULAW_FIX, Session, SessionEnded
from .audio import FRAME_SECONDS, Playout, PlayoutBuffer, silence
from .calllog import CallLog, Observer
from .config import EchoProfile, Profile, Settings
from .recording import RECORDING_FILE, Recorder

DEFAULT_RATE: Final = 8000  # AudioSocket() always sends slin 8 kHz; slin16 shows in its first frame
# Asterisk's first audio frame follows the UUID by ~20 ms and tells the call's rate. The playout
# waits this long for it, then starts at DEFAULT_RATE rather than leave the line without RTP.
RATE_WAIT: Final = 0.1
# Asterisk's Hangup and DTMFEnd events (AMI, ARI) trail the AudioSocket stream by ~2 ms: a
# call's log waits up to this long for them before it closes, so they are never lost.
ASTERISK_LAST_WORD: Final = 0.5
# A phone with VAD/DTX sends no RTP while its user is quiet, and Asterisk then sends no frames:
# after this long without one, the caller's silence is filled in, a 20 ms frame at a time, so
# turn-taking still hears the caller stop (Asterisk's frames arrive every 20 ms, < 1 ms jitter).
QUIET_FILL: Final = 0.1
INBOUND_FRAMES: Final = 250  # 5 s of caller audio may wait for the profile; older frames drop first
# Events a behaviour has not taken yet (see Call.events); the oldest drop first: a behaviour
# that takes none (echo) keeps only the newest.
EVENTS_KEPT: Final = 64
# Seconds after the bot's last voiced frame during which the half-duplex gate stays shut: the
# line's echo of our own voice is not the caller.
ECHO_TAIL: Final = 0.25


class CallState(StrEnum):
    """What a call is doing, kept by its behaviour; ``call_end`` records where it ended."""

    CONNECTED = "connected"
    GREETING = "greeting"
    LISTENING = "listening"
    TRANSCRIBING = "transcribing"
    THINKING = "thinking"
    SYNTHESIZING = "synthesizing"
    SPEAKING = "speaking"
    APOLOGIZING = "apologizing"
    TRANSFERRING = "transferring"
    ECHOING = "echoing"
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class Dtmf:
    """The caller pressed a key."""

    digit: str


@dataclass(frozen=True, slots=True)
class BotVoiceStarted:
    """The bot's voice began on the line (the first voiced frame after silence), at ``t``."""

    t: float


CallEvent = Dtmf | BotVoiceStarted


class CallEnded(Exception):
    """Raised inside a call's task group to end the call; ``reason`` goes to the log."""

    def __init__(self, reason: str, *, by_bot: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.by_bot = by_bot  # True: we end it, so Asterisk gets a hangup frame


Behaviour = Callable[["Call"], Awaitable[None]]


class Call:
    def __init__(
        self,
        session: Session,
        profile_name: str,
        profile: Profile,
        settings: Settings,
        *,
        behaviour: Behaviour,
        directory: Directory | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.session = session
        self.directory = directory
        # What ARI/AMI know about the call (bot/asterisk/directory.py).
        self.route: Route | None = None
        self.profile_name = profile_name
        self.profile = profile
        self.settings = settings
        self.log = session.log
        self.calllog = CallLog(Path(settings.calls.dir), str(session.uuid), observer=observer)
        self.buffer = PlayoutBuffer(session.rate or DEFAULT_RATE, settings.playout.buffer_seconds)
        self.recorder: Recorder | None = None  # from the first caller frame (its rate)
        self._t0 = clock.now()
        self.playout = Playout(
            self.buffer,
            self._send_frame,
            lead_frames=settings.playout.lead_frames,
            rate_source=lambda: session.rate,
        )
        self._events: collections.deque[CallEvent] = collections.deque(maxlen=EVENTS_KEPT)
        self.playout.on_voice_start = lambda t: self._events.append(BotVoiceStarted(t))
        self._behaviour = behaviour
        # Overflow policy: the oldest caller audio is dropped (and counted) so the newest,
        # which decides what the caller meant, is never lost behind a stalled consumer.
        self._inbound: collections.deque[tuple[float, proto.Audio]] = collections.deque(
            maxlen=INBOUND_FRAMES
        )
        self._inbound_ready = asyncio.Event()
        self._rate_known = asyncio.Event()
        self.inbound_dropped = 0
        self.inbound_filled = 0  # silent frames standing in for a quiet phone's (QUIET_FILL)
        self._last_in: float | None = None
        self._filling = False
        self.dtmf: list[str] = []
        self.end_reason: str | None = None
        self.moved = False  # released to the dialplan (a transfer): no hang-up to wait for
        self._asterisk_hangup = False
        self._asterisk_dtmf = 0
        self._asterisk_news = asyncio.Event()
        self.state = CallState.CONNECTED

    # --- what a behaviour uses ------------------------------------------------------------------

    @property
    def rate(self) -> int:
        return self.session.rate or self.buffer.rate

    async def audio_rate(self) -> int:
        """The call's sample rate: the first frame's, or DEFAULT_RATE if none came within
        RATE_WAIT (a phone that sends nothing in silence must still hear the bot at once)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RATE_WAIT):
                await self._rate_known.wait()
        return self.rate

    async def next_audio(self) -> proto.Audio:
        """The next 20 ms of caller audio, in order."""
        return (await self.next_audio_timed())[1]

    async def next_audio_timed(self) -> tuple[float, proto.Audio]:
        """The next 20 ms of caller audio with its arrival time (``clock.now()``). Once
        the caller's frames have started, a gap longer than QUIET_FILL is filled with silence,
        stamped 20 ms apart, until frames come again."""
        while not self._inbound:
            self._inbound_ready.clear()
            if self._last_in is None:
                await self._inbound_ready.wait()
                continue
            due = self._last_in + (FRAME_SECONDS if self._filling else QUIET_FILL)
            try:
                async with asyncio.timeout(max(0.0, due - clock.now())):
                    await self._inbound_ready.wait()
            except TimeoutError:
                self._last_in, self._filling = due, True
                self.inbound_filled += 1
                return due, proto.Audio(self.rate, silence(self.rate))
        t, audio = self._inbound.popleft()
        self._last_in, self._filling = t, False
        return t, audio

    async def play(self, pcm: bytes) -> None:
        """Queue audio at the call's rate; waits while the playout buffer is full."""
        await self.buffer.write(pcm)

    async def drain(self) -> None:
        """Waits until everything queued has been played."""
        await self.playout.drain()

    def interrupt(self) -> float:
        """Drops the audio queued and not yet played; returns how many seconds of it."""
        return self.buffer.clear() / 2 / self.rate

    def since_start(self, t: float) -> float:
        """Seconds from the call's start to ``t`` (clock time): where ``t`` is in call.wav."""
        return t - self._t0

    @property
    def playing(self) -> bool:
        """Bot audio is queued and not yet played."""
        return self.buffer.pending_bytes > 0

    def gated(self, now: float) -> bool:
        """The half-duplex gate: the bot's voice is on the line, or was less than
        ``ECHO_TAIL`` before ``now``: what the caller's side sends now is mostly its echo."""
        last = self.playout.stats.last_voiced_at
        return self.playout.speaking or (last is not None and now - last < ECHO_TAIL)

    def events(self) -> list[CallEvent]:
        """What happened on the call since the last look (DTMF, the bot's voice starting), in
        order."""
        out = list(self._events)
        self._events.clear()
        return out

    def hangup(self, reason: str) -> None:
        """End the call from the bot's side (raises; call it from a behaviour)."""
        raise CallEnded(reason, by_bot=True)

    def release(self, reason: str) -> None:
        """End the call's AudioSocket without a hangup frame: Asterisk moved the caller
        elsewhere (a transfer), and a 0x00 could race the move (raises)."""
        self.moved = True
        raise CallEnded(reason, by_bot=False)

    def asterisk_event(self, name: str, fields: dict[str, Any]) -> None:
        """An event about this call from ARI or AMI (bot/asterisk/directory.py): into the log."""
        self.calllog.event(name, **fields)
        if name == "asterisk_hangup":
            self._asterisk_hangup = True
        elif name == "asterisk_dtmf":
            self._asterisk_dtmf += 1
        self._asterisk_news.set()

    async def _await_asterisk(self) -> None:
        """Waits (at most ASTERISK_LAST_WORD) until a link that watches this call's channel has
        reported each DTMF digit and, unless the caller was moved elsewhere, the hang-up."""
        if self.route is None or self.route.control is None:
            return

        def heard() -> bool:
            return self._asterisk_dtmf >= len(self.dtmf) and (self.moved or self._asterisk_hangup)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ASTERISK_LAST_WORD):
                while not heard():
                    self._asterisk_news.clear()
                    await self._asterisk_news.wait()

    # --- running ---------------------------------------------------------------------------------

    async def run(self) -> str:
        """Runs until the call ends; returns the reason (also in the log)."""
        s = self.session
        self.calllog.event(
            "call_start",
            uuid=str(s.uuid),
            peer=s.peer,
            profile=self.profile_name,
            profile_kind=self.profile.kind,
        )
        self.log.info("call from %s, profile %s", s.peer, self.profile_name)
        if self.directory is not None:  # ARI/AMI events about this call join its log from here
            self.route = self.directory.attach(str(s.uuid), self.asterisk_event)
        by_bot = False
        error: str | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(), name=f"{s.uuid}-reader")
                tg.create_task(self._play(), name=f"{s.uuid}-playout")
                tg.create_task(self._behave(), name=f"{s.uuid}-behaviour")
        except* CallEnded as group:
            ended = group.exceptions[0]
            assert isinstance(ended, CallEnded)
            self.end_reason, by_bot = ended.reason, ended.by_bot
        except* Exception as group:
            exc: BaseException = group
            while isinstance(exc, BaseExceptionGroup):  # the root cause, not its wrappers
                exc = exc.exceptions[0]
            error = f"{type(exc).__name__}: {exc}"
            self.log.error("call failed: %s", error, exc_info=exc)
            self.end_reason, by_bot = f"internal error: {error}", True
        finally:
            if self.end_reason is None:  # cancelled from outside: the server is shutting down
                self.end_reason, by_bot = "server shutting down", True
            with contextlib.suppress(Exception):
                if by_bot:
                    await asyncio.shield(s.hangup(self.end_reason))
                else:
                    await asyncio.shield(s.release())
            try:
                await self._await_asterisk()
            finally:
                self._close_log(error)
        return self.end_reason

    def _close_log(self, error: str | None) -> None:
        s = self.session
        stats = self.playout.stats
        recorded = {}
        if self.recorder is not None:
            self.recorder.close()
            if self.recorder.data_bytes:  # (a closed recorder is no longer "recording")
                recorded = {
                    "recording": RECORDING_FILE,
                    "recording_s": round(self.recorder.seconds, 2),
                }
        self.calllog.close(
            self.end_reason or "unknown",
            frames_in=s.frames_in,
            frames_out=s.frames_out,
            dtmf=len(self.dtmf),
            inbound_dropped=self.inbound_dropped,
            inbound_filled=self.inbound_filled,
            playout_reanchors=stats.reanchors,
            playout_max_late_ms=round(stats.max_late * 1000, 1),
            rate=self.rate,
            state=self.state,
            duration=round(self.calllog.elapsed(), 3),
            **({"protocol_error": s.error} if s.error else {}),
            **({"error": error} if error else {}),
            **recorded,
        )
        self.log.info(
            "call ended: %s (%d frames in, %d out)", self.end_reason, s.frames_in, s.frames_out
        )

    async def _read(self) -> None:
        s = self.session
        while (event := await s.receive()) is not None:
            if isinstance(event, proto.Audio):
                now = clock.now()
                if not self._rate_known.is_set():
                    self._rate_known.set()
                    self._log_format(event)
                    self._start_recording(event.rate)
                if self.recorder is not None:
                    self.recorder.caller(now, event.pcm, event.rate)
                if len(self._inbound) == self._inbound.maxlen:
                    self.inbound_dropped += 1
                self._inbound.append((now, event))
                self._inbound_ready.set()
            else:
                self.dtmf.append(event.digit)
                self.calllog.event("dtmf", digit=event.digit)
                self.log.info("DTMF %s", event.digit)
                self._events.append(Dtmf(event.digit))
        if s.error:
            self.calllog.event("error", kind="protocol", message=s.error)
        raise CallEnded(s.end_reason or CALLER_HUNG_UP)

    def _log_format(self, first: proto.Audio) -> None:
        ulaw = bool(self.session.ulaw)
        self.calllog.event(
            "audio_format",
            rate=first.rate,
            frame_bytes=len(first.pcm) // 2 if ulaw else len(first.pcm),
            encoding="ulaw" if ulaw else "slin",
        )
        if ulaw:
            self.calllog.event("warning", message=ULAW_FIX)

    def _start_recording(self, rate: int) -> None:
        if not self.settings.calls.record:
            return
        self.recorder = Recorder(
            self.calllog.folder / RECORDING_FILE,
            rate,
            self._t0,
            lead_frames=self.settings.playout.lead_frames,
            on_error=self._recording_failed,
        )

    def _recording_failed(self, why: str) -> None:
        self.log.warning("%s", why)
        if not self.calllog.closed:
            self.calllog.event("warning", message=why)

    async def _send_frame(self, frame: bytes) -> None:
        if self.recorder is not None:
            self.recorder.bot(clock.now(), frame, self.buffer.rate)
        await self.session.send_audio(frame)

    async def _play(self) -> None:
        # A frame at the wrong rate is noise to Asterisk: learn the rate before the first one.
        # (A rate learnt later converts what is buffered: PlayoutBuffer.set_rate.)
        await self.audio_rate()
        try:
            await self.playout.run()
        except SessionEnded as exc:
            raise CallEnded(self.session.end_reason or str(exc)) from exc

    async def _behave(self) -> None:
        await self._behaviour(self)
        # A behaviour that returns has nothing more to say: let what it queued play, then hang up.
        await self.playout.drain()
        raise CallEnded(f"profile {self.profile_name} finished", by_bot=True)


# --- behaviours ---------------------------------------------------------------------------------


async def echo(call: Call) -> None:
    """Asterisk's Echo(), delayed: the caller hears themselves ``delay_ms`` later."""
    profile = call.profile
    assert isinstance(profile, EchoProfile)
    call.state = CallState.ECHOING
    first = await call.next_audio()
    # The delay line starts with the first caller frame; the playout clock then drains it at the
    # same 20 ms rate that caller frames arrive, so the delay holds for the whole call.
    await call.play(silence(first.rate, profile.delay_ms / 1000))
    await call.play(first.pcm)
    while True:
        frame = await call.next_audio()
        await call.play(frame.pcm)
