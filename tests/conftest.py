from __future__ import annotations

import asyncio
import contextlib
import csv
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bot import config
from bot.app import handler
from bot.asterisk.server import AudioSocketServer, Handler, Timeouts

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "data" / "asterisk22"  # real Asterisk 22 captures (README there)


@dataclass(frozen=True)
class Read:
    ms: float
    offset: int
    nbytes: int


def fixture_stream(name: str) -> tuple[bytes, list[Read]]:
    """A real Asterisk 22 byte stream and the socket reads a server made of it."""
    data = (FIXTURES / f"{name}.bin").read_bytes()
    with (FIXTURES / f"{name}.reads.csv").open() as fh:
        reads = [
            Read(float(r["ms"]), int(r["offset"]), int(r["nbytes"])) for r in csv.DictReader(fh)
        ]
    return data, reads


@pytest.fixture
def calls_dir(tmp_path: Path) -> Path:
    return tmp_path / "calls"


def make_settings(calls_dir: Path, **env: str) -> config.Settings:
    """Settings for in-process servers: the echo profile unless a test asks for another."""
    defaults = {"VOICEBOT_CALLS_DIR": str(calls_dir), "VOICEBOT_SERVER_PROFILE": "echo"}
    return config.load(None, {**defaults, **env})


@contextlib.asynccontextmanager
async def running_server(
    settings: config.Settings, handle: Handler | None = None, timeouts: Timeouts | None = None
) -> AsyncIterator[AudioSocketServer]:
    server = AudioSocketServer(
        handle or handler(settings), host="127.0.0.1", port=0, timeouts=timeouts or Timeouts()
    )
    await server.start()
    try:
        yield server
    finally:
        # Calls whose caller just hung up finish their logs; anything else is ended.
        await server.close(grace=2.0)


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Polls ``condition`` on the event loop until it holds; fails the test after ``within`` s."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.01)


def tone(freq: float, seconds: float, rate: int = 8000, level: float = 0.3) -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    return (level * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def chirps(seconds: float, rate: int = 8000) -> bytes:
    """Speech-like test audio: distinct tone bursts with gaps, so any alignment is unambiguous."""
    out = bytearray()
    rng = np.random.default_rng(7)
    while len(out) < seconds * rate * 2:
        out += tone(float(rng.uniform(300, 3000)), 0.12, rate)
        out += bytes(2 * round(0.04 * rate))
    return bytes(out[: round(seconds * rate) * 2])
