"""The AudioSocket server over loopback sockets: real Asterisk streams, bad peers, isolation."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from bot.asterisk import audiosocket as p
from bot.asterisk.server import Session, SessionEnded, Timeouts
from bot.audio import pcm_to_ulaw, rms_dbfs, silence
from bot.call import Call, CallEnded, echo
from bot.calllog import list_calls, read_call
from bot.tools.simulator import CallerSimulator

from .conftest import fixture_stream, make_settings, running_server, tone, wait_until

STREAMS = ["asterisk22-sip-llama1", "asterisk22-sip-llama1-slin16"]


def only_call(calls_dir: Path, call_id: str | None = None) -> list[dict[str, object]]:
    folders = [f for f in list_calls(calls_dir) if call_id is None or call_id in f.name]
    assert len(folders) == 1, folders
    return read_call(folders[0]).events


def by_name(events: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [e for e in events if e["event"] == name]


def test_fixture_streams_parse_with_their_original_chunking() -> None:
    for name in STREAMS:
        data, reads = fixture_stream(name)
        conn = p.Connection(p.Role.SERVER)
        kinds: list[type] = []
        for r in reads:
            conn.receive_data(data[r.offset : r.offset + r.nbytes])
            kinds += [type(e) for e in conn.events()]
        conn.receive_data(b"")
        kinds += [type(e) for e in conn.events()]
        assert kinds == [p.Uuid] + [p.Audio] * 620 + [p.Dtmf, p.Closed], name
        assert conn.peer_rate == (16000 if "slin16" in name else 8000)


async def replay(port: int, name: str) -> tuple[bytes, list[float]]:
    """Plays a recorded Asterisk stream at its recorded timing; returns what the bot sent."""
    data, reads = fixture_stream(name)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()

    async def read_all() -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)

    reading = asyncio.create_task(read_all())
    t0 = time.monotonic()
    for r in reads:
        await asyncio.sleep(max(0.0, t0 + r.ms / 1000 - time.monotonic()))
        writer.write(data[r.offset : r.offset + r.nbytes])
        await writer.drain()
    writer.close()  # the caller hangs up: Asterisk just closes the connection
    await asyncio.wait_for(reading, 5)
    return bytes(received), []


def test_real_asterisk_streams_replayed_in_real_time(calls_dir: Path) -> None:
    settings = make_settings(calls_dir, VOICEBOT_PROFILES_ECHO_DELAY_MS="0")

    async def main() -> list[bytes]:
        async with running_server(settings) as server:
            port = server.address[1]
            results = await asyncio.gather(*(replay(port, name) for name in STREAMS))
        return [r[0] for r in results]

    outputs = asyncio.run(main())
    for name, out in zip(STREAMS, outputs, strict=True):
        data, _ = fixture_stream(name)
        expected_uuid = str(uuid.UUID(bytes=data[3:19]))
        events = only_call(calls_dir, expected_uuid)
        rate = 16000 if "slin16" in name else 8000
        assert by_name(events, "call_start")[0]["uuid"] == expected_uuid
        assert by_name(events, "audio_format")[0] == {
            **by_name(events, "audio_format")[0],
            "rate": rate,
            "frame_bytes": rate // 25,
        }
        assert [e["digit"] for e in by_name(events, "dtmf")] == ["1"]
        end = by_name(events, "call_end")
        assert len(end) == 1 and end[0]["reason"] == "caller hung up"
        assert end[0]["frames_in"] == 620
        # What the bot sent back: audio frames only (never DTMF or error), 20 ms each at the
        # call's rate once the rate was known, and the caller's speech echoed back.
        conn = p.Connection(p.Role.CLIENT)
        conn.send(p.Uuid(uuid.UUID(expected_uuid)))
        conn.receive_data(out)
        conn.receive_data(b"")
        events_out = conn.events()
        assert isinstance(events_out[-1], p.Closed)
        audio = [e for e in events_out if isinstance(e, p.Audio)]
        assert len(audio) == len(events_out) - 1 >= 600
        assert {len(a.pcm) for a in audio[2:]} == {rate // 25}
        assert sum(a.pcm != silence(a.rate) for a in audio) > 300


def test_malformed_stream_ends_only_its_own_call(calls_dir: Path) -> None:
    settings = make_settings(calls_dir)
    bad_uuid = uuid.uuid4()

    async def bad_caller(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sim = p.Connection(p.Role.CLIENT)
        writer.write(sim.send(p.Uuid(bad_uuid)) + sim.send(p.Audio(8000, bytes(320))))
        writer.write(b"\x42\x00\x00")  # an unknown kind
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)  # the server must close on us
        writer.close()
        return data

    async def main() -> tuple[list[object], bytes, object]:
        async with running_server(settings) as server:
            port = server.address[1]
            good = [
                CallerSimulator("127.0.0.1", port, duration=1.5, record=False) for _ in range(2)
            ]
            runs = asyncio.gather(*(s.run() for s in good))
            await wait_until(lambda: all(len(s.rx_times) >= 10 for s in good))
            bad_out = await bad_caller(port)
            reports = await runs
            after = await CallerSimulator("127.0.0.1", port, duration=0.5, record=False).run()
        return list(reports), bad_out, after

    reports, bad_out, after = asyncio.run(main())
    bad = only_call(calls_dir, str(bad_uuid))
    end = by_name(bad, "call_end")[0]
    assert end["reason"] == "protocol error: unknown frame kind 0x42 (length 0)"
    assert by_name(bad, "error")[0]["message"] == "unknown frame kind 0x42 (length 0)"
    # The broken call got silence frames, then the server closed the connection on it.
    conn = p.Connection(p.Role.CLIENT)
    conn.send(p.Uuid(bad_uuid))
    conn.receive_data(bad_out)
    conn.receive_data(b"")
    out_events = conn.events()
    assert out_events[-1] == p.Closed()
    assert all(isinstance(e, p.Audio) for e in out_events[:-1])
    for report in [*reports, after]:
        assert report.ended_by == "caller"  # type: ignore[attr-defined]
        assert report.frames_received >= 20  # type: ignore[attr-defined]
    assert len(list(list_calls(calls_dir))) == 4
    ends = [read_call(f).end for f in list_calls(calls_dir)]
    assert sorted(str(e["reason"]) for e in ends if e) == sorted(
        ["caller hung up"] * 3 + ["protocol error: unknown frame kind 0x42 (length 0)"]
    )


@pytest.mark.parametrize(
    ("send", "why"),
    [
        (b"", "no UUID frame within 0.3 s"),
        (b"\x01\x00\x10" + bytes(5), "no UUID frame within 0.3 s"),
        (b"\x10\x01\x40" + bytes(320), "protocol error: SLIN frame before the UUID frame"),
    ],
)
def test_connections_that_never_become_calls_are_closed(
    calls_dir: Path, send: bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(calls_dir)

    async def main() -> tuple[bytes, int]:
        timeouts = Timeouts(uuid=0.3)
        async with running_server(settings, timeouts=timeouts) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(send)
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return data, server.rejected

    data, rejected = asyncio.run(main())
    assert data == b"" and rejected == 1
    assert why in caplog.text
    assert list(list_calls(calls_dir)) == []  # no UUID, no call


@pytest.mark.parametrize("bot_sends", [False, True])
def test_a_line_ends_only_when_neither_side_sends(calls_dir: Path, bot_sends: bool) -> None:
    """A phone with VAD/DTX leaves Asterisk quiet while the bot talks or waits: the bot's own
    frames keep such a call alive, as they keep Asterisk's AudioSocket app from timing out."""
    settings = make_settings(calls_dir)
    ended: list[str | None] = []

    async def handle(session: Session) -> None:
        async def keepalive() -> None:
            while bot_sends:
                await session.send_audio(silence(8000))
                await asyncio.sleep(0.05)

        task = asyncio.create_task(keepalive())
        while await session.receive() is not None:
            pass
        task.cancel()
        ended.append(session.end_reason)

    async def main() -> None:
        async with running_server(settings, handle, timeouts=Timeouts(idle=0.4)) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            sim = p.Connection(p.Role.CLIENT)
            writer.write(sim.send(p.Uuid(uuid.uuid4())) + sim.send(p.Audio(8000, bytes(320))))
            # The caller's side sends nothing more; it reads what comes until the bot closes or
            # 1.2 s (three idle timeouts) have passed.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.2):
                    while await reader.read(65536):
                        pass
            writer.close()
            await wait_until(lambda: bool(ended))

    asyncio.run(main())
    if bot_sends:
        assert ended == ["caller hung up"]
    else:
        assert ended == ["no frame from Asterisk for 0.4 s, none sent to it either"]


def test_u_law_labelled_slin_is_decoded(calls_dir: Path) -> None:
    """Dial(AudioSocket/...) without c(slin) sends 160-byte G.711 frames under kind 0x10; what
    the bot sends back stays slin (Asterisk reads kind 0x10 as slin whatever the codec)."""
    settings = make_settings(calls_dir, VOICEBOT_PROFILES_ECHO_DELAY_MS="0")
    caller = tone(440, 0.6)

    async def main() -> bytes:
        async with running_server(settings) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            sim = p.Connection(p.Role.CLIENT)
            writer.write(sim.send(p.Uuid(uuid.uuid4())))
            ulaw = pcm_to_ulaw(caller)
            heard = bytearray()
            for i in range(0, len(ulaw), 160):
                writer.write(sim.send(p.Audio(8000, ulaw[i : i + 160])))
                await asyncio.sleep(0.02)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.6):
                    while data := await reader.read(65536):
                        sim.receive_data(data)
                        for event in sim.events():
                            assert isinstance(event, p.Audio) and len(event.pcm) == 320
                            heard += event.pcm
            writer.close()
            return bytes(heard)

    heard = asyncio.run(main())
    # The echo came back as the caller's tone, decoded: loud, and at 440 Hz.
    voiced = [
        heard[i : i + 320] for i in range(0, len(heard), 320) if rms_dbfs(heard[i : i + 320]) > -20
    ]
    assert len(voiced) >= 10
    spectrum = np.abs(np.fft.rfft(np.frombuffer(b"".join(voiced), "<i2")))
    assert abs(np.argmax(spectrum) * 8000 / (len(spectrum) * 2 - 2) - 440) < 10
    events = only_call(calls_dir)
    [fmt] = by_name(events, "audio_format")
    assert fmt == {**fmt, "rate": 8000, "frame_bytes": 160, "encoding": "ulaw"}
    [warning] = by_name(events, "warning")
    assert "add c(slin) or c(slin16) to the Dial()" in str(warning["message"])


@pytest.mark.parametrize("ending", ["hangup", "release"])
def test_a_peer_still_sending_when_the_bot_ends_the_call_gets_a_clean_close(
    calls_dir: Path, ending: str
) -> None:
    """Hanging up sends 0x00 then a FIN; a release (a transfer: Asterisk moves the caller)
    sends no 0x00, but still a FIN and never a reset, whatever the peer still had in flight."""
    settings = make_settings(calls_dir)

    async def leaves_at_once(call: Call) -> None:
        await call.next_audio()
        if ending == "release":
            call.release("transferred")

    async def handle(session: Session) -> None:
        await Call(
            session, "leave", settings.profile("echo"), settings, behaviour=leaves_at_once
        ).run()

    async def flooding_call(port: int) -> tuple[list[p.Event], bool]:
        """Sends audio as fast as it can until the bot's 0x00 or FIN, like a peer whose frames are
        in flight when the bot hangs up; then reads to the end."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sim = p.Connection(p.Role.CLIENT)
        writer.write(sim.send(p.Uuid(uuid.uuid4())))
        frame = sim.send(p.Audio(8000, bytes(320)))
        events: list[p.Event] = []
        reset = False
        try:
            while not events or not isinstance(events[-1], p.Closed):
                writer.write(frame * 10)
                try:
                    data = await asyncio.wait_for(reader.read(65536), 0.02)
                except TimeoutError:
                    continue
                sim.receive_data(data)
                events += sim.events()
                if any(isinstance(e, (p.Hangup, p.Closed)) for e in events):
                    break
            while not events or not isinstance(events[-1], p.Closed):
                sim.receive_data(await asyncio.wait_for(reader.read(65536), 5))
                events += sim.events()
        except ConnectionError:
            reset = True
        writer.close()
        return events, reset

    async def main() -> list[tuple[list[p.Event], bool]]:
        async with running_server(settings, handle) as server:
            return [await flooding_call(server.address[1]) for _ in range(5)]

    for events, reset in asyncio.run(main()):
        assert not reset  # the bot closed only after the peer did: no reset
        kinds = [type(e) for e in events]
        last = [p.Hangup, p.Closed] if ending == "hangup" else [p.Closed]  # (0x00), then a FIN
        assert kinds[-len(last) :] == last
        assert set(kinds[: -len(last)]) <= {p.Audio}  # (the playout clock's silence before it)


def test_a_transport_closed_by_a_reset_means_the_caller_hung_up(calls_dir: Path) -> None:
    settings = make_settings(calls_dir)
    seen: list[tuple[str, str | None]] = []

    async def handle(session: Session) -> None:
        # What asyncio does when a write meets a reset, before the reader has seen the end.
        session._writer.transport.abort()
        with pytest.raises(SessionEnded) as ended:
            await session.send_audio(bytes(320))
        seen.append((str(ended.value), session.end_reason))

    async def main() -> None:
        async with running_server(settings, handle) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.address[1])
            writer.write(p.Connection(p.Role.CLIENT).send(p.Uuid(uuid.uuid4())))
            await wait_until(lambda: bool(seen))
            writer.close()

    asyncio.run(main())
    assert seen == [("caller hung up", "caller hung up")]


def test_bot_hangs_up_with_a_hangup_frame_and_behaviour_errors_stay_in_their_call(
    calls_dir: Path,
) -> None:
    settings = make_settings(calls_dir)

    async def speaks_then_leaves(call: Call) -> None:
        await call.play(tone(500, 0.2))

    async def breaks(call: Call) -> None:
        await call.next_audio()
        raise RuntimeError("engine exploded")

    behaviours = {"leave": speaks_then_leaves, "break": breaks}

    async def handle(session: Session) -> None:
        # The UUID's first byte picks the behaviour under test; others get the echo.
        name = {1: "leave", 2: "break"}.get(session.uuid.bytes[0], "echo")
        await Call(
            session, name, settings.profile("echo"), settings, behaviour=behaviours.get(name, echo)
        ).run()

    async def raw_call(port: int, first: int) -> list[p.Event]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sim = p.Connection(p.Role.CLIENT)
        writer.write(sim.send(p.Uuid(uuid.UUID(bytes=bytes([first]) + bytes(15)))))
        for _ in range(3):
            writer.write(sim.send(p.Audio(8000, bytes(320))))
        events: list[p.Event] = []
        while not events or not isinstance(events[-1], p.Closed):
            data = await asyncio.wait_for(reader.read(65536), 5)
            sim.receive_data(data)
            events += sim.events()
        writer.close()
        return events

    async def main() -> tuple[list[p.Event], list[p.Event], object]:
        async with running_server(settings, handle) as server:
            port = server.address[1]
            bystander = CallerSimulator(
                "127.0.0.1",
                port,
                duration=1.0,
                record=False,
                call_uuid=uuid.UUID(bytes=b"\x03" + bytes(15)),
            )
            other = asyncio.create_task(bystander.run())
            leave, broke = await asyncio.gather(raw_call(port, 1), raw_call(port, 2))
            return leave, broke, await other

    leave, broke, bystander = asyncio.run(main())
    for events in (leave, broke):
        assert isinstance(events[-2], p.Hangup) and isinstance(events[-1], p.Closed)
    voiced = [e for e in leave if isinstance(e, p.Audio) and e.pcm != silence(8000)]
    assert len(voiced) == 10  # the 200 ms were played before hanging up
    reasons = {f.name[-36:-34]: read_call(f).end for f in list_calls(calls_dir)}
    assert {k: v["reason"] for k, v in reasons.items() if v} == {
        "01": "profile leave finished",
        "02": "internal error: RuntimeError: engine exploded",
        "03": "caller hung up",
    }
    assert bystander.ended_by == "caller"  # type: ignore[attr-defined]
    assert bystander.frames_received >= 45  # type: ignore[attr-defined]


def test_call_ended_reasons_reach_the_log(calls_dir: Path) -> None:
    settings = make_settings(calls_dir)

    async def hangs_up(call: Call) -> None:
        call.hangup("transferred")

    async def handle(session: Session) -> None:
        await Call(session, "x", settings.profile("echo"), settings, behaviour=hangs_up).run()

    async def main() -> None:
        async with running_server(settings, handle) as server:
            await CallerSimulator("127.0.0.1", server.address[1], duration=2, record=False).run()

    asyncio.run(main())
    events = only_call(calls_dir)
    assert by_name(events, "call_end")[0]["reason"] == "transferred"
    assert CallEnded("x").by_bot is False


def test_every_task_of_a_call_ends_with_it(calls_dir: Path) -> None:
    settings = make_settings(calls_dir)

    async def main() -> None:
        async with running_server(settings) as server:
            port = server.address[1]
            sims = [
                CallerSimulator("127.0.0.1", port, duration=d, record=False)
                for d in (0.3, 0.6, 0.9)
            ]
            await asyncio.gather(*(s.run() for s in sims))
            await wait_until(lambda: not server.sessions and not server._tasks)
            leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert leftovers == []

    asyncio.run(main())
    assert [read_call(f).end["reason"] for f in list_calls(calls_dir)] == ["caller hung up"] * 3  # type: ignore[index]
