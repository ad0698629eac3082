"""A caller simulator that behaves like Asterisk on AudioSocket, and measures the bot from outside.

It does what a real Asterisk 22 does (docs/audiosocket.md): connects, sends the UUID at
once, then one 20 ms audio frame every 20 ms on an absolute schedule for the whole call (silence
between the caller's turns), DTMF as separate 0x03 frames, and hangs up by closing the socket,
never with a 0x00 frame. It never buffers or paces what the bot sends: each frame is timestamped
the moment it is read.

A script is a list of turns (PCM at the call's rate). The caller waits for a greeting, speaks a
turn, waits until the bot has answered and gone quiet, then speaks the next (or, when its
``again`` hook returns a clip, says that first: the turn again, as a caller the bot asked to
repeat does). For each turn it reports the response latency seen from its side: from the moment
the last voiced frame of the turn left (the end of the caller's speech) to the first non-silent
frame that came back.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import socket
import statistics
import uuid as uuid_mod
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import numpy as np

from .. import clock
from ..asterisk import audiosocket as proto
from ..audio import FRAME_SECONDS, frame_bytes, is_silent, silence

READ_SIZE: Final = 65536


@dataclass(frozen=True, slots=True)
class DtmfAt:
    digit: str
    at: float  # seconds after the UUID was sent

    @classmethod
    def parse(cls, text: str) -> DtmfAt:
        """``"1@2.5"``: digit 1 at 2.5 s."""
        digit, sep, at = text.partition("@")
        if not sep:
            raise ValueError(f"DTMF {text!r}: expected DIGIT@SECONDS, e.g. 1@2.5")
        proto.Dtmf(digit)  # validates the digit
        try:
            seconds = float(at)
        except ValueError:
            raise ValueError(f"DTMF {text!r}: {at!r} is not a number of seconds") from None
        if seconds < 0:
            raise ValueError(f"DTMF {text!r}: time must not be negative")
        return cls(digit, seconds)


@dataclass(slots=True)
class TurnResult:
    index: int
    speech_start: float  # seconds since the call started
    speech_end: float
    first_frame: int = 0  # the index of the first frame sent that carries the turn
    response_latency_ms: float | None = None  # None: the bot did not answer (a missed answer)
    reply_seconds: float = 0.0
    # Bot frames with sound that arrived while the caller spoke: from the turn's first sound to
    # its last (a pause inside it included, the quiet after its last word not).
    talk_over_frames: int = 0
    longest_gap_ms: float = 0.0  # the longest silence inside the reply (a stall mid-answer)
    again: bool = False  # the script's turn ``index`` said again, after the bot's reply to it


@dataclass(slots=True)
class CallReport:
    uuid: str
    rate: int
    ended_by: str = ""  # "caller" | "bot" | "error: ..."
    hangup_frame: bool = False  # the bot sent 0x00 (rather than only closing the socket)
    duration: float = 0.0
    frames_sent: int = 0
    frames_received: int = 0
    voiced_frames_received: int = 0
    bytes_received: int = 0
    dtmf_sent: list[str] = field(default_factory=list)
    turns: list[TurnResult] = field(default_factory=list)
    rx_interval_ms: dict[str, float] = field(default_factory=dict)
    rx_frame_sizes: list[int] = field(default_factory=list)
    max_frames_in_20ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def interval_stats(times: list[float]) -> dict[str, float]:
    """p50/p99/max/mean of the gaps between consecutive arrival times, in ms."""
    gaps = [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False)]
    if not gaps:
        return {}
    ordered = sorted(gaps)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    return {
        "count": float(len(gaps)),
        "mean": round(statistics.fmean(gaps), 3),
        "p50": round(pct(50), 3),
        "p99": round(pct(99), 3),
        "max": round(ordered[-1], 3),
    }


def max_in_window(times: list[float], window: float) -> int:
    """The most arrivals inside any interval of ``window`` seconds (a burst detector)."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# A wait shorter than this is over: the clock's own rounding (a wait of 1e-13 s cannot pass on a
# clock that does not move by itself, as a test's virtual one).
QUIET_EPSILON: Final = 1e-6
# Opens the line to the bot: a reader and a writer, as asyncio.open_connection returns them.
Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class CallerSimulator:
    """One simulated call. Create, then ``await run()`` for a :class:`CallReport`."""

    def __init__(
        self,
        host: str,
        port: int,
        turns: list[bytes] | None = None,
        *,
        rate: int = 8000,
        call_uuid: uuid_mod.UUID | None = None,
        dtmf: list[DtmfAt] | None = None,
        greeting_wait: float = 1.0,
        quiet: float = 0.8,
        answer_timeout: float = 15.0,
        duration: float | None = None,
        record: bool = True,
        skip_rx_stats_first: float = 0.5,
        background: bytes = b"",
        again: Callable[[TurnResult], Awaitable[bytes | None]] | None = None,
        connect: Connect | None = None,
    ) -> None:
        if rate not in (8000, 16000):
            raise ValueError(f"Asterisk sends slin at 8000 or slin16 at 16000 Hz, not {rate}")
        self.host, self.port = host, port
        self.rate = rate
        self.uuid = call_uuid or uuid_mod.uuid4()
        self.turns = [t[: len(t) // 2 * 2] for t in (turns or [])]
        self.dtmf = sorted(dtmf or [], key=lambda d: d.at)
        self.greeting_wait = greeting_wait
        self.quiet = quiet
        self.answer_timeout = answer_timeout
        self.duration = duration  # hang up after this many seconds whatever the script says
        self.record = record
        self.skip_rx_stats_first = skip_rx_stats_first
        # A room's noise under the whole call (PCM at ``rate``, looped), turns included; a
        # turn's speech end is still its own speech's (the noise is not the caller talking).
        self.background = np.frombuffer(background[: len(background) // 2 * 2], "<i2")
        self._background_at = 0
        # Asked after each turn's reply: what to say again before the next turn (None: nothing).
        self.again = again
        # How the line to the bot is opened (default: TCP to host:port).
        self.connect = connect or (lambda: asyncio.open_connection(self.host, self.port))
        self.report = CallReport(uuid=str(self.uuid), rate=rate)
        self.received = bytearray()  # everything the bot sent, frames concatenated
        self.rx_times: list[float] = []  # arrival of every audio frame, seconds since start
        self.sent_audio = bytearray()  # everything we sent, for alignment checks
        self._conn = proto.Connection(proto.Role.CLIENT)
        self._t0 = 0.0
        self._speaking: bytearray = bytearray()  # audio of the turn being spoken, not yet sent
        self._first_voiced_tx: float | None = None
        self._last_voiced_tx: float | None = None
        self._last_voiced_rx: float | None = None
        self.voiced_rx_times: list[float] = []  # arrival of every frame with sound in it
        self._voiced_rx = asyncio.Event()
        self._turn_done = asyncio.Event()
        self._bot_hung_up = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None

    def now(self) -> float:
        return clock.now() - self._t0

    async def run(self) -> CallReport:
        reader, writer = await self.connect()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writer = writer
        self._t0 = clock.now()
        writer.write(self._conn.send(proto.Uuid(self.uuid)))
        report = self.report
        try:
            async with asyncio.TaskGroup() as tg:
                sender = tg.create_task(self._send_frames(writer), name="sim-sender")
                receiver = tg.create_task(self._receive(reader), name="sim-receiver")
                script = tg.create_task(self._script(), name="sim-script")
                ended = await self._first(script, receiver)
                report.ended_by = ended
                sender.cancel()
                receiver.cancel()
                script.cancel()
        except* (ConnectionError, OSError) as group:
            report.ended_by = f"error: {group.exceptions[0]}"
        except* proto.RemoteProtocolError as group:
            report.ended_by = f"error: bot broke the protocol: {group.exceptions[0]}"
        finally:
            # Asterisk ends a call by closing the TCP connection; it never sends 0x00.
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
        report.duration = round(self.now(), 3)
        report.frames_received = len(self.rx_times)
        report.bytes_received = len(self.received)
        stats_from = self.skip_rx_stats_first
        steady = [t for t in self.rx_times if t >= stats_from]
        report.rx_interval_ms = interval_stats(steady)
        report.max_frames_in_20ms = max_in_window(steady, FRAME_SECONDS)
        return report

    async def _first(self, script: asyncio.Task[None], receiver: asyncio.Task[None]) -> str:
        waiters: set[asyncio.Future[Any]] = {script, receiver}
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return "bot" if receiver in done or self._bot_hung_up.is_set() else "caller"

    # --- the three tasks ---------------------------------------------------------------------

    async def _send_frames(self, writer: asyncio.StreamWriter) -> None:
        """One frame per 20 ms from an absolute schedule, like Asterisk's channel timing."""
        size = frame_bytes(self.rate)
        quiet = silence(self.rate)
        dtmf = list(self.dtmf)
        due = clock.now()
        while True:
            now = self.now()
            while dtmf and dtmf[0].at <= now:
                digit = dtmf.pop(0).digit
                writer.write(self._conn.send(proto.Dtmf(digit)))
                self.report.dtmf_sent.append(digit)
            if self._speaking:
                frame = bytes(self._speaking[:size])
                del self._speaking[:size]
                frame += bytes(size - len(frame))
                if not is_silent(frame):
                    if self._first_voiced_tx is None:
                        self._first_voiced_tx = now
                    self._last_voiced_tx = now
                if not self._speaking:
                    self._turn_done.set()
            else:
                frame = quiet
            if len(self.background):
                frame = self._with_background(frame)
            writer.write(self._conn.send(proto.Audio(self.rate, frame)))
            self.sent_audio += frame
            self.report.frames_sent += 1
            await writer.drain()
            due += FRAME_SECONDS
            await asyncio.sleep(max(0.0, due - clock.now()))

    def _with_background(self, frame: bytes) -> bytes:
        n = len(frame) // 2
        at = self._background_at
        noise = self.background[(at + np.arange(n)) % len(self.background)].astype(np.int32)
        self._background_at = (at + n) % len(self.background)
        mixed = np.frombuffer(frame, "<i2").astype(np.int32) + noise
        return bytes(np.clip(mixed, -32768, 32767).astype("<i2").tobytes())

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        conn = self._conn
        while True:
            data = await reader.read(READ_SIZE)
            t = self.now()
            conn.receive_data(data)
            for event in conn.events():
                if isinstance(event, proto.Audio):
                    self.rx_times.append(t)
                    if len(self.report.rx_frame_sizes) < 1000:
                        self.report.rx_frame_sizes.append(len(event.pcm))
                    if self.record:
                        self.received += event.pcm
                    if not is_silent(event.pcm):
                        self.report.voiced_frames_received += 1
                        self.voiced_rx_times.append(t)
                        self._last_voiced_rx = t
                        self._voiced_rx.set()
                elif isinstance(event, proto.Hangup):
                    self.report.hangup_frame = True
                    self._bot_hung_up.set()
                    return
                elif isinstance(event, proto.Closed):
                    return

    async def _script(self) -> None:
        if self.turns and self.greeting_wait > 0:
            await self._wait_for_reply(self.greeting_wait)
        for index, pcm in enumerate(self.turns):
            result = await self._turn(index, pcm)
            if self.again is not None and (repeat := await self.again(result)) is not None:
                await self._turn(index, repeat[: len(repeat) // 2 * 2], again=True)
        if self.duration is not None:
            remaining = self.duration - self.now()
            if remaining > 0:
                await asyncio.sleep(remaining)
        elif self.dtmf:
            # Stay on the line until the last digit has gone out.
            await asyncio.sleep(max(0.0, self.dtmf[-1].at - self.now()) + 3 * FRAME_SECONDS)

    async def _turn(self, index: int, pcm: bytes, *, again: bool = False) -> TurnResult:
        """Says ``pcm``, then waits for the bot's reply and measures it."""
        result = await self._speak(index, pcm, again)
        latency_from = result.speech_end
        start = await self._wait_for_reply(self.answer_timeout, after=latency_from)
        if start is not None:
            result.response_latency_ms = round((start - latency_from) * 1000, 1)
            end = self._last_voiced_rx or start
            result.reply_seconds = round(max(0.0, end - start + FRAME_SECONDS), 3)
            lo = bisect.bisect_left(self.voiced_rx_times, start)
            hi = bisect.bisect_right(self.voiced_rx_times, end)
            times = self.voiced_rx_times[lo:hi]
            gaps = [b - a - FRAME_SECONDS for a, b in zip(times, times[1:], strict=False)]
            result.longest_gap_ms = round(max(gaps, default=0.0) * 1000, 1)
        return result

    async def _speak(self, index: int, pcm: bytes, again: bool) -> TurnResult:
        self._turn_done.clear()
        self._first_voiced_tx = self._last_voiced_tx = None
        result = TurnResult(
            index=index,
            speech_start=round(self.now(), 3),
            speech_end=0.0,
            first_frame=self.report.frames_sent,
            again=again,
        )
        self.report.turns.append(result)
        self._speaking += pcm
        await self._turn_done.wait()
        end = self._last_voiced_tx if self._last_voiced_tx is not None else self.now()
        result.speech_end = round(end, 4)
        if self._first_voiced_tx is not None:
            lo = bisect.bisect_left(self.voiced_rx_times, self._first_voiced_tx)
            hi = bisect.bisect_right(self.voiced_rx_times, end + FRAME_SECONDS)
            result.talk_over_frames = hi - lo
        return result

    async def _wait_for_reply(self, within: float, *, after: float | None = None) -> float | None:
        """Waits for bot audio (voiced, after ``after``), then for ``quiet`` seconds of silence.

        Returns when the reply started, or None if none came within ``within`` seconds.
        """
        deadline = self.now() + within
        start: float | None = None
        if after is not None and self._last_voiced_rx is not None and self._last_voiced_rx > after:
            start = self._first_voiced_after(after)
        while start is None:
            self._voiced_rx.clear()
            remaining = deadline - self.now()
            if remaining <= 0:
                return None
            try:
                async with asyncio.timeout(remaining):
                    await self._voiced_rx.wait()
            except TimeoutError:
                return None
            if after is None or (self._last_voiced_rx or 0) > after:
                start = self._first_voiced_after(after) if after is not None else self.now()
        # The reply lasts until the bot has been quiet for `quiet` seconds.
        while True:
            last = self._last_voiced_rx or start
            wait = last + self.quiet - self.now()
            if wait <= QUIET_EPSILON:
                return start
            self._voiced_rx.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._voiced_rx.wait()

    def _first_voiced_after(self, after: float) -> float:
        i = bisect.bisect_right(self.voiced_rx_times, after)
        return self.voiced_rx_times[i] if i < len(self.voiced_rx_times) else self.now()
