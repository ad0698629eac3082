"""The asyncio side of AudioSocket: a listening socket, one :class:`Session` per connection.

The server owns the TCP connection and the byte-level protocol (through the sans-I/O
:mod:`.audiosocket`); what a call *does* belongs to the handler it is given, which receives a
:class:`Session` once the connection has sent its UUID. Every way a connection can end is turned
into a one-line reason on the session (``caller hung up``, ``protocol error: ...``, ...), and
nothing that happens on one connection can reach another: each runs in its own task and every
exception stops at that task's boundary, logged with the call's UUID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid as uuid_mod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from .. import clock
from ..audio import ulaw_to_pcm
from ..calllog import CallLogger
from ..config import ServerSettings, default
from . import audiosocket as proto

log = logging.getLogger(__name__)

READ_SIZE: Final = 65536
# Audio we write waits in the kernel and in asyncio's transport buffer. Real-time audio gains
# nothing from a deep queue (Asterisk reads as it plays), and a shallow one means a peer that
# stopped reading blocks our writes within ~1-2 s, so the write timeout notices it.
SEND_BUFFER: Final = 16384  # SO_SNDBUF (Linux doubles it): ~1 s of slin16
TRANSPORT_HIGH_WATER: Final = 4096  # drain() waits above this
# Timeouts use `asyncio.timeout()`, never `asyncio.wait_for()`: on Python 3.11 wait_for swallows a
# cancellation that arrives just as the awaited thing completes (CPython gh-86296), which left a
# call's playout task running after its call had ended.

CALLER_HUNG_UP: Final = "caller hung up"
# After our 0x00, how long we keep reading (and dropping) what Asterisk still sends before we
# close anyway: Asterisk closes within milliseconds of a hangup frame.
LINGER: Final = 1.0
# Asterisk's slin 8 kHz frame is 320 bytes; 160 under the same kind is G.711 u-law from a
# Dial(AudioSocket/host:port/uuid) without c(slin): one byte a sample (docs/audiosocket.md).
ULAW_FRAME: Final = 160
# What the bot sends is labelled slin and Asterisk takes it as slin whatever the channel's codec
# (res_audiosocket maps the kind to the format), so only the caller's side needs decoding.
ULAW_FIX: Final = (
    "Asterisk sends 160-byte frames labelled slin 8 kHz: G.711 u-law from a "
    "Dial(AudioSocket/...) without a codec option; the bot decodes them as u-law, but add "
    "c(slin) or c(slin16) to the Dial() (asterisk/extensions.conf)"
)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """``[server]``'s timeouts, as the server takes them (``from_settings``)."""

    # A new connection must send its UUID within this.
    uuid: float = default(ServerSettings, "uuid_timeout")
    # Neither side sent a frame for this long: the line is dead. A phone that sends nothing in
    # silence (VAD/DTX) leaves Asterisk's side quiet, so our own frames count too, as they do
    # for Asterisk's AudioSocket app (which gives up after 2 s of neither side sending).
    idle: float = default(ServerSettings, "idle_timeout")
    # A peer that stops reading must not hold our writer forever.
    write: float = default(ServerSettings, "write_timeout")

    @classmethod
    def from_settings(cls, s: ServerSettings) -> Timeouts:
        return cls(uuid=s.uuid_timeout, idle=s.idle_timeout, write=s.write_timeout)


class SessionEnded(Exception):
    """The session can no longer send: the peer is gone or stopped reading."""


class Session:
    """One call's AudioSocket connection, after its UUID arrived.

    :meth:`receive` yields caller audio and DTMF and returns None once the call is over, with
    :attr:`end_reason` saying why. :meth:`send_audio` writes one frame; :meth:`hangup` sends the
    0x00 frame and closes. Counters are kept for the per-call log.
    """

    def __init__(
        self,
        conn: proto.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer: str,
        timeouts: Timeouts,
    ) -> None:
        assert conn.uuid is not None
        self.uuid: uuid_mod.UUID = conn.uuid
        self.peer = peer
        self.log = CallLogger(log, {"call": str(self.uuid)})
        self._conn = conn
        self._reader = reader
        self._writer = writer
        self._timeouts = timeouts
        self.end_reason: str | None = None
        self.error: str | None = None  # the protocol error, when that is what ended the call
        self.frames_in = 0
        self.frames_out = 0
        self.dtmf_in = 0
        # True once the first audio frame showed G.711 u-law under the slin kind (see ULAW_FIX):
        # the caller's frames are decoded on the way in.
        self.ulaw: bool | None = None
        self._last_out = clock.now()
        self._closed = False

    @property
    def rate(self) -> int | None:
        """The call's sample rate, known from the first audio frame Asterisk sends."""
        return self._conn.peer_rate

    @property
    def ended(self) -> bool:
        return self.end_reason is not None

    def _end(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason

    async def receive(self) -> proto.Audio | proto.Dtmf | None:
        """The next caller audio or DTMF frame; None when the call is over (see end_reason)."""
        while not self.ended:
            try:
                event = self._conn.next_event()
            except proto.RemoteProtocolError as exc:
                self.error = str(exc)
                self.log.warning("protocol error from %s: %s; ending the call", self.peer, exc)
                self._end(f"protocol error: {exc}")
                return None
            if isinstance(event, proto.NeedData):
                await self._fill()
                continue
            if isinstance(event, proto.Audio):
                self.frames_in += 1
                return self._decoded(event)
            if isinstance(event, proto.Dtmf):
                self.dtmf_in += 1
                return event
            if isinstance(event, proto.Closed):
                self._end(CALLER_HUNG_UP)
            elif isinstance(event, proto.Hangup):
                self._end("Asterisk sent a hangup frame")
            elif isinstance(event, proto.Error):
                code = "none" if event.code is None else f"0x{event.code:02x}"
                self._end(f"Asterisk sent an error frame (code {code})")
            # A Uuid cannot come here: the connection rejects a second one.
        return None

    def _decoded(self, event: proto.Audio) -> proto.Audio:
        if self.ulaw is None and event.rate == 8000:
            self.ulaw = len(event.pcm) == ULAW_FRAME
            if self.ulaw:
                self.log.warning("%s", ULAW_FIX)
        if self.ulaw:
            return proto.Audio(event.rate, ulaw_to_pcm(event.pcm))
        return event

    async def _fill(self) -> None:
        idle = self._timeouts.idle
        last_in = clock.now()
        while True:
            left = max(last_in, self._last_out) + idle - clock.now()
            if left <= 0:
                self._end(f"no frame from Asterisk for {idle:g} s, none sent to it either")
                return
            try:
                async with asyncio.timeout(left):
                    data = await self._reader.read(READ_SIZE)
                break
            except TimeoutError:
                continue  # our own frames kept the line alive meanwhile: wait on
            except (ConnectionError, OSError) as exc:
                # A peer that closes with our audio still unread in its socket sends a reset
                # instead of a FIN: the caller hung up all the same.
                self.log.debug("read failed: %r", exc)
                self._end(CALLER_HUNG_UP)
                return
        self._conn.receive_data(data)

    async def send_audio(self, pcm: bytes) -> None:
        rate = self.rate or 8000
        await self._write(self._conn.send(proto.Audio(rate, pcm)))
        self.frames_out += 1
        self._last_out = clock.now()

    async def _write(self, data: bytes) -> None:
        if self._closed:
            raise SessionEnded("connection already closed")
        if self._writer.is_closing():
            # Not closed by us: an earlier write met a reset (asyncio closes the transport and
            # drain() may not say so). The caller is gone, even if the reader has not seen it.
            self._end(CALLER_HUNG_UP)
            raise SessionEnded(self.end_reason)
        self._writer.write(data)
        try:
            async with asyncio.timeout(self._timeouts.write):
                await self._writer.drain()
        except TimeoutError:
            self._end(f"Asterisk stopped reading (write blocked {self._timeouts.write:g} s)")
            raise SessionEnded(self.end_reason) from None
        except (ConnectionError, OSError) as exc:
            self.log.debug("write failed: %r", exc)
            self._end(CALLER_HUNG_UP)
            raise SessionEnded(self.end_reason) from exc

    async def hangup(self, reason: str) -> None:
        """End the call from our side: a 0x00 frame, then close (the dialplan continues)."""
        self._end(reason)
        if not self._closed and not self._writer.is_closing():
            with contextlib.suppress(SessionEnded, proto.LocalProtocolError):
                await self._write(self._conn.send(proto.Hangup()))
                await self._linger()
        await self.close()

    async def release(self) -> None:
        """End the call from our side without a 0x00 (Asterisk moved the caller elsewhere and a
        hangup frame could race the move): half-close and linger, so the peer, whose frames
        are still in flight, sees a FIN and not a reset."""
        if not self._closed and not self._writer.is_closing():
            await self._linger()
        await self.close()

    async def _linger(self) -> None:
        """Half-closes, then drops what the peer still sends until it closes too (at most
        ``LINGER``). Closing a socket that has unread data sends a reset instead of a FIN, and
        the peer's writes after our close meet one: it would see an error, not our 0x00."""
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            if self._writer.can_write_eof():
                self._writer.write_eof()
            async with asyncio.timeout(LINGER):
                while await self._reader.read(READ_SIZE):
                    pass

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            async with asyncio.timeout(self._timeouts.write):
                await self._writer.wait_closed()


Handler = Callable[[Session], Awaitable[None]]


NO_BYTES: Final = "peer closed the connection without sending anything"


class AudioSocketServer:
    """Accepts AudioSocket connections and runs ``handler`` for each once its UUID arrived."""

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 9092,
        timeouts: Timeouts | None = None,
    ) -> None:
        self._handler = handler
        self.host = host
        self.port = port
        self.timeouts = timeouts or Timeouts()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.sessions: set[Session] = set()
        self.connections = 0
        self.rejected = 0  # connections that never became a call (no or bad UUID)

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server is not listening")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self.on_connect, self.host, self.port, reuse_address=True, limit=READ_SIZE
        )
        log.info("AudioSocket server listening on %s:%d", *self.address)

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting; give calls in progress ``grace`` seconds to end, then end them."""
        if self._server is not None:
            self._server.close()
        if self._tasks and grace > 0:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def end_calls(self) -> None:
        """Ends every call in progress now (each still hangs up and closes its log)."""
        for task in list(self._tasks):
            task.cancel()

    def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A new connection (asyncio's server calls it; a test's in-memory line may too)."""
        task = asyncio.create_task(
            self._serve(reader, writer), name=f"audiosocket-{self.connections}"
        )
        self.connections += 1
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # 20 ms frames must leave as they are written, not wait for Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        writer.transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER)
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "unknown"
        conn = proto.Connection(proto.Role.SERVER)
        try:
            why = await self._await_uuid(conn, reader, peer)
        except BaseException:
            writer.close()
            raise
        if why is not None:
            self.rejected += 1
            # A health check connects and closes without a byte: not worth a warning.
            level = logging.DEBUG if why == NO_BYTES else logging.WARNING
            log.log(level, "connection from %s closed before a call started: %s", peer, why)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            return
        session = Session(conn, reader, writer, peer=peer, timeouts=self.timeouts)
        self.sessions.add(session)
        try:
            await self._handler(session)
        except asyncio.CancelledError:
            session._end("server shutting down")
            raise
        except Exception:
            session.log.exception("call handler failed")
            session._end("internal error")
        finally:
            self.sessions.discard(session)
            await session.close()

    async def _await_uuid(
        self, conn: proto.Connection, reader: asyncio.StreamReader, peer: str
    ) -> str | None:
        """Reads until the UUID frame; returns why the connection is no call, or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.uuid
        conn_bytes = 0
        while True:
            try:
                event = conn.next_event()
            except proto.RemoteProtocolError as exc:
                return f"protocol error: {exc}"
            if isinstance(event, proto.Uuid):
                return None
            if isinstance(event, proto.Closed):
                return NO_BYTES if conn_bytes == 0 else "peer closed the connection before the UUID"
            remaining = deadline - loop.time()
            if remaining <= 0:
                return f"no UUID frame within {self.timeouts.uuid:g} s"
            try:
                async with asyncio.timeout(remaining):
                    data = await reader.read(READ_SIZE)
            except TimeoutError:
                return f"no UUID frame within {self.timeouts.uuid:g} s"
            except (ConnectionError, OSError) as exc:
                return f"connection error before the UUID: {exc}"
            conn_bytes += len(data)
            conn.receive_data(data)
