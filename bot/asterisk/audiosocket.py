"""The AudioSocket protocol, sans-I/O.

Theory of operation
-------------------
AudioSocket (Asterisk's ``res_audiosocket``) carries one call over one TCP connection as a stream
of frames: ``kind`` (1 byte), payload length (uint16, big-endian), payload. Audio payloads are
signed 16-bit little-endian mono PCM; the kind names the sample rate. A real Asterisk 22 always
sends the UUID frame first, then 20 ms audio frames and DTMF frames, and ends the call by closing
the TCP connection without a hangup frame (see docs/audiosocket.md).

Like h11, this module does no I/O: feed it bytes with :meth:`Connection.receive_data` (``b""``
means the peer closed the connection), pull events with :meth:`Connection.next_event` until it
returns :data:`NEED_DATA`, and turn events into bytes with :meth:`Connection.send`. Only whole
frames are parsed, so any split of the byte stream gives the same events. The buffer never holds
more than the bytes fed and not yet parsed, and a frame header announcing more than the kind
allows is rejected before its payload is waited for.

Errors say who broke what: :class:`RemoteProtocolError` when the peer sent something invalid,
:class:`LocalProtocolError` when we tried to send something the peer would reject (Asterisk hangs
up the call on any frame from the server but hangup and audio). After a remote error the
connection stays in :attr:`State.ERROR` and parses nothing more.
"""

from __future__ import annotations

import enum
import struct
import uuid as uuid_mod
from dataclasses import dataclass
from typing import Final

__all__ = [
    "AUDIO_KINDS",
    "DTMF_DIGITS",
    "MAX_AUDIO_SECONDS",
    "NEED_DATA",
    "RATE_TO_KIND",
    "SAMPLE_RATES",
    "Audio",
    "AudioSocketError",
    "Closed",
    "Connection",
    "Dtmf",
    "Error",
    "Event",
    "Hangup",
    "Kind",
    "LocalProtocolError",
    "NeedData",
    "RemoteProtocolError",
    "Role",
    "State",
    "Uuid",
    "encode_frame",
]

HEADER: Final = struct.Struct(">BH")


class Kind(enum.IntEnum):
    """Frame kinds, named as in Asterisk's include/asterisk/res_audiosocket.h."""

    HANGUP = 0x00
    UUID = 0x01
    DTMF = 0x03
    SLIN = 0x10
    SLIN12 = 0x11
    SLIN16 = 0x12
    SLIN24 = 0x13
    SLIN32 = 0x14
    SLIN44 = 0x15
    SLIN48 = 0x16
    SLIN96 = 0x17
    SLIN192 = 0x18
    ERROR = 0xFF


SAMPLE_RATES: Final[dict[Kind, int]] = {
    Kind.SLIN: 8000,
    Kind.SLIN12: 12000,
    Kind.SLIN16: 16000,
    Kind.SLIN24: 24000,
    Kind.SLIN32: 32000,
    Kind.SLIN44: 44100,
    Kind.SLIN48: 48000,
    Kind.SLIN96: 96000,
    Kind.SLIN192: 192000,
}
RATE_TO_KIND: Final[dict[int, Kind]] = {rate: kind for kind, rate in SAMPLE_RATES.items()}
AUDIO_KINDS: Final = frozenset(SAMPLE_RATES)

# Asterisk drops an audio frame longer than about 1.01 s at 8 kHz ("Out of buffer space"), so one
# second is the most a frame may carry in either direction; the uint16 length caps higher rates.
MAX_AUDIO_SECONDS: Final = 1.0
DTMF_DIGITS: Final = frozenset("0123456789*#ABCD")
# Asterisk's own error codes are one byte; a longer, application-specific payload is allowed.
MAX_ERROR_PAYLOAD: Final = 255


def max_audio_payload(rate: int) -> int:
    return min(0xFFFF, int(rate * 2 * MAX_AUDIO_SECONDS))


class AudioSocketError(Exception):
    """Root of this module's errors."""


class LocalProtocolError(AudioSocketError):
    """We tried to send something the peer would reject, or used the connection wrongly."""


class RemoteProtocolError(AudioSocketError):
    """The peer sent bytes that are not a valid AudioSocket stream."""


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Uuid:
    """The call's identifier; always the first frame Asterisk sends."""

    value: uuid_mod.UUID


@dataclass(frozen=True, slots=True)
class Audio:
    rate: int
    pcm: bytes

    def __post_init__(self) -> None:
        if self.rate not in RATE_TO_KIND:
            raise ValueError(f"no AudioSocket kind carries {self.rate} Hz audio")
        if not self.pcm:
            raise ValueError(
                "audio payload is empty (Asterisk rejects it: 'Invalid message length')"
            )
        if len(self.pcm) % 2:
            raise ValueError(f"audio payload of {len(self.pcm)} bytes is not whole 16-bit samples")
        limit = max_audio_payload(self.rate)
        if len(self.pcm) > limit:
            raise ValueError(
                f"audio payload of {len(self.pcm)} bytes exceeds {limit} bytes "
                f"({MAX_AUDIO_SECONDS:g} s at {self.rate} Hz)"
            )

    @property
    def kind(self) -> Kind:
        return RATE_TO_KIND[self.rate]

    @property
    def samples(self) -> int:
        return len(self.pcm) // 2

    @property
    def duration(self) -> float:
        return self.samples / self.rate


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str

    def __post_init__(self) -> None:
        if self.digit not in DTMF_DIGITS:
            raise ValueError(f"{self.digit!r} is not a DTMF digit (0-9 * # A-D)")


@dataclass(frozen=True, slots=True)
class Hangup:
    """A 0x00 frame: the sender ends the call."""


@dataclass(frozen=True, slots=True)
class Error:
    """A 0xFF frame. Asterisk's codes: 0x01 hangup, 0x02 frame forwarding, 0x04 memory."""

    payload: bytes = b""

    def __post_init__(self) -> None:
        if len(self.payload) > MAX_ERROR_PAYLOAD:
            raise ValueError(
                f"error payload of {len(self.payload)} bytes exceeds {MAX_ERROR_PAYLOAD}"
            )

    @property
    def code(self) -> int | None:
        return self.payload[0] if self.payload else None


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed the TCP connection (for Asterisk: the caller hung up)."""


class NeedData:
    """Sentinel type of :data:`NEED_DATA`."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

Event = Uuid | Audio | Dtmf | Hangup | Error | Closed


def encode_frame(kind: int, payload: bytes = b"") -> bytes:
    """Raw frame bytes, with no checks beyond the length field's range (for tests and fuzzing)."""
    if len(payload) > 0xFFFF:
        raise ValueError(f"payload of {len(payload)} bytes does not fit the uint16 length field")
    return HEADER.pack(kind, len(payload)) + payload


def _encode(event: Event) -> bytes:
    if isinstance(event, Audio):
        return encode_frame(event.kind, event.pcm)
    if isinstance(event, Uuid):
        return encode_frame(Kind.UUID, event.value.bytes)
    if isinstance(event, Dtmf):
        return encode_frame(Kind.DTMF, event.digit.encode("ascii"))
    if isinstance(event, Hangup):
        return encode_frame(Kind.HANGUP)
    if isinstance(event, Error):
        return encode_frame(Kind.ERROR, event.payload)
    raise LocalProtocolError(f"{type(event).__name__} is not a frame and cannot be sent")


# --- connection ---------------------------------------------------------------------------------


class Role(enum.Enum):
    SERVER = "server"  # we are the bot; the peer is Asterisk
    CLIENT = "client"  # we are Asterisk (the caller simulator); the peer is the bot


class State(enum.Enum):
    AWAIT_UUID = "await-uuid"  # nothing but a UUID may come (the server) or go (the client)
    OPEN = "open"
    CLOSED = "closed"  # the peer closed the connection or sent a hangup frame
    ERROR = "error"


class Connection:
    """One AudioSocket connection from one side's point of view.

    ``Role.SERVER`` parses what Asterisk sends and refuses to send what Asterisk would hang up
    on. ``Role.CLIENT`` is Asterisk's side, for the caller simulator: it must send the UUID
    first and never sends a frame Asterisk itself does not send.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.AWAIT_UUID
        self.uuid: uuid_mod.UUID | None = None
        self.peer_rate: int | None = None  # the rate of the peer's first audio frame
        self._buf = bytearray()
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._sent_uuid = False
        self._sent_hangup = False
        self.bytes_received = 0
        self.frames_received = 0
        self.frames_sent = 0

    # receiving

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed the connection."""
        if self._eof:
            if data:
                raise LocalProtocolError("received data after end of stream")
            return
        if data:
            self._buf += data
            self.bytes_received += len(data)
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData:
        """The next complete event, :data:`NEED_DATA`, or a :class:`RemoteProtocolError`."""
        if self._error is not None:
            raise RemoteProtocolError(f"connection is in ERROR after: {self._error}")
        if self.state is State.CLOSED:
            return Closed()
        try:
            event = self._parse()
        except RemoteProtocolError as exc:
            self.state = State.ERROR
            self._error = exc
            raise
        if isinstance(event, NeedData):
            return event
        self.frames_received += 1 if not isinstance(event, Closed) else 0
        if isinstance(event, Closed | Hangup):
            self.state = State.CLOSED
        return event

    def events(self) -> list[Event]:
        """Every complete event buffered now (a convenience over :meth:`next_event`)."""
        out: list[Event] = []
        while True:
            event = self.next_event()
            if isinstance(event, NeedData):
                return out
            out.append(event)
            if isinstance(event, Closed | Hangup):
                return out

    def _parse(self) -> Event | NeedData:
        buf = self._buf
        if len(buf) < HEADER.size:
            if self._eof:
                if buf:
                    raise RemoteProtocolError(
                        f"stream ended inside a frame header ({len(buf)} of {HEADER.size} bytes)"
                    )
                return Closed()
            return NEED_DATA
        raw_kind, length = HEADER.unpack_from(buf)
        try:
            kind = Kind(raw_kind)
        except ValueError:
            raise RemoteProtocolError(
                f"unknown frame kind 0x{raw_kind:02x} (length {length})"
            ) from None
        self._check_header(kind, length)
        end = HEADER.size + length
        if len(buf) < end:
            if self._eof:
                raise RemoteProtocolError(
                    f"stream ended inside a {kind.name} frame "
                    f"({len(buf) - HEADER.size} of {length} payload bytes)"
                )
            return NEED_DATA
        payload = bytes(buf[HEADER.size : end])
        del buf[:end]
        return self._event(kind, payload)

    def _check_header(self, kind: Kind, length: int) -> None:
        """Reject a frame on its header alone, before waiting for a payload it announces."""
        if self.state is State.AWAIT_UUID and kind is not Kind.UUID:
            if self.role is Role.SERVER:
                raise RemoteProtocolError(f"{kind.name} frame before the UUID frame")
            raise RemoteProtocolError(f"{kind.name} frame from the server before our UUID")
        if kind is Kind.UUID:
            if self.role is Role.CLIENT:
                raise RemoteProtocolError("UUID frame from the server")
            if self.state is not State.AWAIT_UUID:
                raise RemoteProtocolError("second UUID frame")
            if length != 16:
                raise RemoteProtocolError(f"UUID frame of {length} bytes (expected 16)")
        elif kind is Kind.DTMF:
            if length != 1:
                raise RemoteProtocolError(f"DTMF frame of {length} bytes (expected 1)")
        elif kind is Kind.HANGUP:
            if length:
                raise RemoteProtocolError(f"hangup frame with a {length}-byte payload")
        elif kind is Kind.ERROR:
            if length > MAX_ERROR_PAYLOAD:
                raise RemoteProtocolError(
                    f"error frame of {length} bytes exceeds {MAX_ERROR_PAYLOAD}"
                )
        else:
            rate = SAMPLE_RATES[kind]
            if length == 0:
                raise RemoteProtocolError(f"empty {kind.name} audio frame")
            limit = max_audio_payload(rate)
            if length > limit:
                raise RemoteProtocolError(
                    f"{kind.name} audio frame of {length} bytes exceeds {limit} "
                    f"({MAX_AUDIO_SECONDS:g} s at {rate} Hz)"
                )
            if length % 2:
                raise RemoteProtocolError(
                    f"{kind.name} audio frame of {length} bytes is not whole 16-bit samples"
                )
            if self.peer_rate is not None and rate != self.peer_rate:
                raise RemoteProtocolError(
                    f"audio rate changed mid-call from {self.peer_rate} to {rate} Hz"
                )

    def _event(self, kind: Kind, payload: bytes) -> Event:
        if kind is Kind.UUID:
            self.uuid = uuid_mod.UUID(bytes=payload)
            self.state = State.OPEN
            return Uuid(self.uuid)
        if kind is Kind.DTMF:
            digit = payload.decode("latin-1")
            if digit not in DTMF_DIGITS:
                raise RemoteProtocolError(f"DTMF frame carries {payload!r}, not a DTMF digit")
            if self.role is Role.CLIENT:
                # Asterisk hangs up on a DTMF frame from the server; a bot that sends one is broken.
                raise RemoteProtocolError("DTMF frame from the server (Asterisk would hang up)")
            return Dtmf(digit)
        if kind is Kind.HANGUP:
            return Hangup()
        if kind is Kind.ERROR:
            if self.role is Role.CLIENT:
                raise RemoteProtocolError("error frame from the server (Asterisk would hang up)")
            return Error(payload)
        rate = SAMPLE_RATES[kind]
        if self.peer_rate is None:
            self.peer_rate = rate
        return Audio(rate, payload)

    # sending

    def send(self, event: Event) -> bytes:
        """The bytes for ``event``; :class:`LocalProtocolError` if the peer would reject it."""
        if self._sent_hangup:
            raise LocalProtocolError("cannot send after a hangup frame")
        if self.role is Role.SERVER:
            if not isinstance(event, Audio | Hangup):
                # docs/audiosocket.md: anything else makes Asterisk log "Received AudioSocket
                # message other than hangup or audio" and hang up the call.
                raise LocalProtocolError(
                    f"Asterisk hangs up on a {type(event).__name__} frame from the server; "
                    "only audio and hangup may be sent"
                )
            if (
                isinstance(event, Audio)
                and self.peer_rate is not None
                and event.rate != self.peer_rate
            ):
                raise LocalProtocolError(
                    f"sending {event.rate} Hz audio on a {self.peer_rate} Hz call"
                )
        else:
            if isinstance(event, Closed):
                raise LocalProtocolError("Closed is not a frame; close the socket instead")
            if not self._sent_uuid and not isinstance(event, Uuid):
                raise LocalProtocolError(f"{type(event).__name__} sent before the UUID frame")
            if self._sent_uuid and isinstance(event, Uuid):
                raise LocalProtocolError("UUID already sent")
            if isinstance(event, Uuid):
                self._sent_uuid = True
                self.uuid = event.value
                if self.state is State.AWAIT_UUID:
                    self.state = State.OPEN
        data = _encode(event)
        if isinstance(event, Hangup):
            self._sent_hangup = True
        self.frames_sent += 1
        return data
