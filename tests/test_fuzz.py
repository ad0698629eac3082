"""Hostile and broken AudioSocket peers over real sockets, all at once, beside a good call.

Each bad connection must end within a bounded time with a logged reason; nothing may raise out
of the server; tasks and file descriptors return to where they were; the good call keeps its
20 ms pace; and the server still answers a call afterwards.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import socket
import time
import uuid
from pathlib import Path

import pytest

from bot.asterisk import audiosocket as p
from bot.asterisk.server import AudioSocketServer, Timeouts
from bot.calllog import list_calls, read_call
from bot.tools.simulator import CallerSimulator

from .conftest import make_settings, running_server, wait_until

TIMEOUTS = Timeouts(uuid=0.5, idle=0.6, write=0.5)
BOUND = 8.0  # seconds any bad connection may live
# A peer that stops reading is noticed once the socket buffers between us fill (kernel and
# asyncio, kept small in bot/asterisk/server.py) and a write then blocks for the write timeout.
WEDGED_BOUND = 4.0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def valid_call(call_id: uuid.UUID, frames: int) -> bytes:
    conn = p.Connection(p.Role.CLIENT)
    out = conn.send(p.Uuid(call_id))
    for i in range(frames):
        out += conn.send(p.Audio(8000, bytes([i % 256, 0]) * 160))
        if i == frames // 2:
            out += conn.send(p.Dtmf("5"))
    return out


async def until_closed(reader: asyncio.StreamReader) -> float:
    """Reads (and drops) what the server sends until it closes; returns when, from now."""
    start = time.monotonic()
    while await reader.read(65536):
        pass
    return time.monotonic() - start


async def send_then_wait(port: int, data: bytes, *, chunk: int, pause: float) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(0, len(data), chunk):
            writer.write(data[i : i + chunk])
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return await asyncio.wait_for(until_closed(reader), BOUND)
    except (ConnectionError, OSError):
        return 0.0  # the server closed on us mid-write: also an end
    finally:
        writer.close()


async def never_reads(port: int, server: AudioSocketServer) -> float:
    """Sends a live call but never reads the bot's frames (a wedged Asterisk); returns how
    long the server took to end that call. A raw socket: a StreamReader would read for us."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    conn = p.Connection(p.Role.CLIENT)
    call_id = uuid.uuid4()
    await loop.sock_sendall(sock, conn.send(p.Uuid(call_id)))
    start = time.monotonic()

    def alive() -> bool:
        return any(s.uuid == call_id for s in server.sessions)

    try:
        while time.monotonic() - start < WEDGED_BOUND * 2:
            await loop.sock_sendall(sock, conn.send(p.Audio(8000, bytes(320))))
            await asyncio.sleep(0.02)
            if time.monotonic() - start > 0.5 and not alive():
                break
    except (ConnectionError, OSError):
        pass
    finally:
        sock.close()
    return time.monotonic() - start


def hostile_streams(rng: random.Random) -> list[tuple[str, bytes, int, float]]:
    """(name, bytes, chunk size, pause between chunks)."""
    good = valid_call(uuid.uuid4(), 40)
    streams: list[tuple[str, bytes, int, float]] = [
        ("byte at a time", valid_call(uuid.uuid4(), 10), 1, 0.0005),
        ("says nothing", b"", 1, 0.0),
        ("oversized length", valid_call(uuid.uuid4(), 2) + b"\x10\xff\xff" + bytes(64), 4096, 0),
        ("unknown kind", valid_call(uuid.uuid4(), 2) + b"\x42\x00\x01\x00", 4096, 0),
        ("error frame", valid_call(uuid.uuid4(), 2) + b"\xff\x00\x01\x07", 4096, 0),
        ("empty audio", valid_call(uuid.uuid4(), 2) + b"\x10\x00\x00", 4096, 0),
        ("rate change", valid_call(uuid.uuid4(), 2) + b"\x12\x02\x80" + bytes(640), 4096, 0),
        ("truncated", valid_call(uuid.uuid4(), 2) + b"\x10\x01\x40" + bytes(100), 4096, 0),
    ]
    for i in range(12):
        noise = rng.randbytes(rng.randrange(1, 3000))
        streams.append((f"random {i}", noise, rng.choice([1, 7, 512, 4096]), 0.0))
    for i in range(12):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = rng.randrange(len(data) // 2, len(data) + 1)
        streams.append((f"mutated {i}", bytes(data[:cut]), rng.choice([3, 320, 4096]), 0.0))
    return streams


@pytest.mark.parametrize("seed", [1, 2])
def test_hostile_peers_end_alone_and_leave_nothing_behind(
    calls_dir: Path, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(calls_dir, VOICEBOT_PROFILES_ECHO_DELAY_MS="100")
    streams = hostile_streams(random.Random(seed))
    # The good call's pace is timed: the earlier tests' engines (hundreds of MB of models and
    # sessions) are collected now, not inside that call (a clean-clone run once saw a 530 ms
    # gap here, right after tests/test_engines.py).
    gc.collect()

    async def main() -> tuple[list[float], float, CallerSimulator, CallerSimulator, int, int]:
        fds_before = open_fds()
        async with running_server(settings, timeouts=TIMEOUTS) as server:
            port = server.address[1]
            baseline = len(asyncio.all_tasks())
            good = CallerSimulator("127.0.0.1", port, [], duration=4.0, record=False)
            good_run = asyncio.create_task(good.run())
            await wait_until(lambda: len(good.rx_times) > 5)
            bad = [
                send_then_wait(port, data, chunk=chunk, pause=pause)
                for _name, data, chunk, pause in streams
            ]
            lifetimes = await asyncio.gather(*bad)
            wedged = await never_reads(port, server)
            await good_run
            after = CallerSimulator("127.0.0.1", port, [], duration=0.5, record=False)
            await after.run()
            await wait_until(lambda: not server.sessions and len(asyncio.all_tasks()) <= baseline)
            tasks_left = len(asyncio.all_tasks()) - baseline
        await asyncio.sleep(0)
        return list(lifetimes), wedged, good, after, tasks_left, open_fds() - fds_before

    with caplog.at_level(logging.WARNING):
        lifetimes, wedged, good, after, tasks_left, fds_grown = asyncio.run(main())
    # Bad peers are logged as warnings with their reason; nothing escaped as an exception.
    unhandled = [r for r in caplog.records if r.exc_info or r.name == "asyncio"]
    assert unhandled == [], [r.getMessage() for r in unhandled]
    assert max(lifetimes) < BOUND
    assert wedged < WEDGED_BOUND  # write timeout: "Asterisk stopped reading"
    assert good.report.ended_by == "caller" and after.report.ended_by == "caller"
    assert good.report.rx_interval_ms["max"] < 60  # the good call kept its pace
    assert tasks_left <= 0 and fds_grown <= 0
    # Every connection that sent a UUID became a call with exactly one end and a reason.
    ends = []
    for folder in list_calls(calls_dir):
        events = read_call(folder).events
        assert [e["event"] for e in events].count("call_end") == 1
        ends.append(events[-1]["reason"])
    assert all(ends)
    assert any(r.startswith("protocol error: ") for r in ends)
    assert any(r.startswith("Asterisk stopped reading") for r in ends)
