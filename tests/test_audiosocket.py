"""The sans-I/O AudioSocket codec: every kind, every split, every error, and garbage."""

from __future__ import annotations

import contextlib
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.asterisk import audiosocket as p
from bot.asterisk.audiosocket import (
    NEED_DATA,
    Audio,
    Closed,
    Connection,
    Dtmf,
    Error,
    Hangup,
    Kind,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    State,
    Uuid,
    encode_frame,
)

UID = uuid.UUID("44 3e eb ee 8e a5 4e b2 a7 7f e6 5b a9 7b 5a ef".replace(" ", ""))
UUID_FRAME = bytes.fromhex("010010") + UID.bytes


def parse_all(
    data: bytes, role: Role = Role.SERVER, chunks: list[int] | None = None
) -> list[p.Event]:
    conn = Connection(role)
    if role is Role.CLIENT:
        conn.send(Uuid(UID))
    events: list[p.Event] = []
    pos = 0
    for size in chunks or [len(data)]:
        if chunk := data[pos : pos + size]:  # b"" would mean end of stream
            conn.receive_data(chunk)
        pos += size
        events += conn.events()
    if data[pos:]:
        conn.receive_data(data[pos:])
    conn.receive_data(b"")
    events += conn.events()
    return events


def test_wire_format_matches_the_asterisk_header_layout() -> None:
    assert encode_frame(Kind.SLIN, b"\x01\x00") == b"\x10\x00\x02\x01\x00"
    assert Connection(Role.SERVER).send(Hangup()) == b"\x00\x00\x00"
    assert Connection(Role.SERVER).send(Audio(16000, b"\x00" * 640))[:3] == b"\x12\x02\x80"


def test_sample_rate_table_covers_every_audio_kind() -> None:
    assert {k.value: r for k, r in p.SAMPLE_RATES.items()} == {
        0x10: 8000,
        0x11: 12000,
        0x12: 16000,
        0x13: 24000,
        0x14: 32000,
        0x15: 44100,
        0x16: 48000,
        0x17: 96000,
        0x18: 192000,
    }


@pytest.mark.parametrize("kind", sorted(p.AUDIO_KINDS))
def test_every_audio_kind_round_trips(kind: Kind) -> None:
    rate = p.SAMPLE_RATES[kind]
    pcm = bytes(range(256)) * (rate // 8000 * 2)  # non-trivial, even length
    frame = Connection(Role.SERVER).send(Audio(rate, pcm))
    assert frame[0] == kind
    events = parse_all(UUID_FRAME + frame)
    assert events == [Uuid(UID), Audio(rate, pcm), Closed()]


def test_uuid_dtmf_error_hangup_round_trip() -> None:
    sim = Connection(Role.CLIENT)
    data = (
        sim.send(Uuid(UID))
        + sim.send(Audio(8000, b"\x01\x02" * 160))
        + sim.send(Dtmf("#"))
        + encode_frame(Kind.ERROR, b"\x02")
        + encode_frame(Kind.HANGUP)
    )
    events = parse_all(data)
    assert events == [
        Uuid(UID),
        Audio(8000, b"\x01\x02" * 160),
        Dtmf("#"),
        Error(b"\x02"),
        Hangup(),
        Closed(),
    ]
    assert isinstance(events[3], Error) and events[3].code == 0x02


def test_state_after_hangup_is_closed_and_parses_nothing_more() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(UUID_FRAME + encode_frame(Kind.HANGUP) + b"\xff\xff")
    assert conn.events() == [Uuid(UID), Hangup()]
    assert conn.state is State.CLOSED
    assert conn.next_event() == Closed()


def test_need_data_until_a_whole_frame_arrived() -> None:
    conn = Connection(Role.SERVER)
    for byte in UUID_FRAME[:-1]:
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is NEED_DATA
    conn.receive_data(UUID_FRAME[-1:])
    assert conn.next_event() == Uuid(UID)
    assert conn.next_event() is NEED_DATA
    assert conn.uuid == UID


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x10\x01\x40" + bytes(320), "SLIN frame before the UUID frame"),
        (b"\x03\x00\x011", "DTMF frame before the UUID frame"),
        (UUID_FRAME + UUID_FRAME, "second UUID frame"),
        (b"\x01\x00\x0f" + bytes(15), "UUID frame of 15 bytes (expected 16)"),
        (UUID_FRAME + b"\x42\x00\x00", "unknown frame kind 0x42 (length 0)"),
        (UUID_FRAME + b"\x10\x00\x00", "empty SLIN audio frame"),
        (
            UUID_FRAME + b"\x10\x00\x03abc",
            "SLIN audio frame of 3 bytes is not whole 16-bit samples",
        ),
        (
            UUID_FRAME + b"\x10\x3f\x00",
            "SLIN audio frame of 16128 bytes exceeds 16000 (1 s at 8000 Hz)",
        ),
        (UUID_FRAME + b"\x03\x00\x02" + b"12", "DTMF frame of 2 bytes (expected 1)"),
        (UUID_FRAME + b"\x03\x00\x01X", "DTMF frame carries b'X', not a DTMF digit"),
        (UUID_FRAME + b"\x00\x00\x01\x00", "hangup frame with a 1-byte payload"),
        (UUID_FRAME + b"\xff\x01\x00" + bytes(256), "error frame of 256 bytes exceeds 255"),
        (
            UUID_FRAME + b"\x10\x00\x02\x00\x00" + b"\x12\x00\x02\x00\x00",
            "audio rate changed mid-call from 8000 to 16000 Hz",
        ),
    ],
)
def test_remote_errors_are_specific(data: bytes, message: str) -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        while conn.next_event() is not NEED_DATA:
            pass
    assert str(info.value) == message
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="connection is in ERROR"):
        conn.next_event()


def test_oversized_length_is_rejected_from_the_header_alone() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(UUID_FRAME + b"\x10\xff\xff")  # 65535 announced, none of it sent
    assert conn.next_event() == Uuid(UID)
    with pytest.raises(RemoteProtocolError, match="exceeds 16000"):
        conn.next_event()


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (b"\x10", "stream ended inside a frame header (1 of 3 bytes)"),
        (
            b"\x10\x01\x40" + bytes(100),
            "stream ended inside a SLIN frame (100 of 320 payload bytes)",
        ),
    ],
)
def test_truncated_stream_at_eof(tail: bytes, message: str) -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(UUID_FRAME + tail)
    assert conn.next_event() == Uuid(UID)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert str(info.value) == message


def test_eof_on_a_frame_boundary_is_a_clean_close() -> None:
    assert parse_all(UUID_FRAME) == [Uuid(UID), Closed()]
    assert parse_all(b"") == [Closed()]


def test_server_refuses_to_send_what_asterisk_hangs_up_on() -> None:
    conn = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError, match="Asterisk hangs up on a Dtmf frame"):
        conn.send(Dtmf("1"))
    with pytest.raises(LocalProtocolError, match="Asterisk hangs up on a Uuid frame"):
        conn.send(Uuid(UID))
    with pytest.raises(LocalProtocolError, match="Asterisk hangs up on a Error frame"):
        conn.send(Error(b"\x01"))


def test_server_sends_at_the_callers_rate_once_known() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(UUID_FRAME + encode_frame(Kind.SLIN16, bytes(640)))
    conn.events()
    assert conn.peer_rate == 16000
    assert conn.send(Audio(16000, bytes(640)))[0] == Kind.SLIN16
    with pytest.raises(LocalProtocolError, match="sending 8000 Hz audio on a 16000 Hz call"):
        conn.send(Audio(8000, bytes(320)))


def test_nothing_is_sent_after_hangup() -> None:
    conn = Connection(Role.SERVER)
    conn.send(Hangup())
    with pytest.raises(LocalProtocolError, match="after a hangup frame"):
        conn.send(Audio(8000, bytes(320)))


def test_client_role_sends_uuid_first_and_rejects_server_dtmf() -> None:
    sim = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="Audio sent before the UUID frame"):
        sim.send(Audio(8000, bytes(320)))
    sim.send(Uuid(UID))
    with pytest.raises(LocalProtocolError, match="UUID already sent"):
        sim.send(Uuid(UID))
    sim.receive_data(encode_frame(Kind.DTMF, b"1"))
    with pytest.raises(RemoteProtocolError, match="DTMF frame from the server"):
        sim.next_event()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Audio(8000, b""), "audio payload is empty"),
        (lambda: Audio(8000, b"abc"), "not whole 16-bit samples"),
        (lambda: Audio(11025, b"ab"), "no AudioSocket kind carries 11025 Hz"),
        (lambda: Audio(8000, bytes(16002)), "exceeds 16000 bytes"),
        (lambda: Dtmf("x"), "not a DTMF digit"),
    ],
)
def test_events_validate_themselves(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


# --- property tests -----------------------------------------------------------------------------

rates = st.sampled_from(sorted(p.RATE_TO_KIND))


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[p.Event]]:
    """A valid stream from Asterisk: UUID, then audio at one rate, DTMF, maybe an error frame."""
    sim = Connection(Role.CLIENT)
    uid = uuid.UUID(bytes=draw(st.binary(min_size=16, max_size=16)))
    rate = draw(rates)
    events: list[p.Event] = [Uuid(uid)]
    data = sim.send(Uuid(uid))
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 4)):
            n = draw(st.integers(1, 200))
            ev: p.Event = Audio(rate, draw(st.binary(min_size=2 * n, max_size=2 * n)))
            data += sim.send(ev)
        elif draw(st.booleans()):
            ev = Dtmf(draw(st.sampled_from(sorted(p.DTMF_DIGITS))))
            data += sim.send(ev)
        else:
            ev = Error(draw(st.binary(max_size=4)))
            data += encode_frame(Kind.ERROR, ev.payload)
        events.append(ev)
    return data, events


@given(streams(), st.data())
@settings(max_examples=150, deadline=None)
def test_any_split_of_a_valid_stream_gives_the_same_events(
    stream: tuple[bytes, list[p.Event]], data: st.DataObject
) -> None:
    raw, expected = stream
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=20)))
    chunks = [b - a for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert parse_all(raw, chunks=chunks) == [*expected, Closed()]


@given(streams())
@settings(max_examples=40, deadline=None)
def test_every_split_point_and_byte_by_byte(stream: tuple[bytes, list[p.Event]]) -> None:
    raw, expected = stream
    want = [*expected, Closed()]
    for cut in range(len(raw) + 1):
        assert parse_all(raw, chunks=[cut]) == want
    assert parse_all(raw, chunks=[1] * len(raw)) == want


@given(st.binary(max_size=600), st.lists(st.integers(1, 50), max_size=30))
@settings(max_examples=400, deadline=None)
def test_garbage_parses_or_raises_a_remote_protocol_error(
    garbage: bytes, chunks: list[int]
) -> None:
    for prefix in (b"", UUID_FRAME):
        try:
            events = parse_all(prefix + garbage, chunks=chunks)
        except RemoteProtocolError as exc:
            assert str(exc)  # a specific message, never an empty one
        else:
            assert events[-1] == Closed()


@given(streams(), st.integers(0, 2000), st.binary(min_size=1, max_size=8))
@settings(max_examples=200, deadline=None)
def test_mutated_streams_never_raise_anything_else(
    stream: tuple[bytes, list[p.Event]], where: int, junk: bytes
) -> None:
    raw, _ = stream
    at = where % (len(raw) + 1)
    mutated = raw[:at] + junk + raw[at + len(junk) :]
    with contextlib.suppress(RemoteProtocolError):
        parse_all(mutated, chunks=[7] * (len(mutated) // 7))
