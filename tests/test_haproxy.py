"""Two bot instances behind a real HAProxy (Debian's package) with the shipped
deploy/haproxy.cfg: calls spread, a full instance is skipped, a stopped one drains."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bot.calllog import list_calls, read_call
from bot.tools.simulator import CallerSimulator
from bot.tools.subserver import free_port, server_process

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "haproxy.cfg"
HELD_S = 6.0  # how long a held call lasts

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None and not os.environ.get("CI"),
    reason="HAProxy is not installed (apt-get install haproxy; CI installs it)",
)


@dataclass
class Instance:
    name: str  # HAProxy's name for it: bot1, bot2
    port: int
    http: int
    calls: Path
    process: subprocess.Popen[str]

    def ready(self) -> bool:
        return httpx.get(f"http://127.0.0.1:{self.http}/readyz", timeout=2).status_code == 200

    def served(self) -> list[str]:
        """End reasons (or "in progress") of the calls this instance took."""
        ends = [read_call(f).end for f in list_calls(self.calls)]
        return [e["reason"] if e else "in progress" for e in ends]


@dataclass
class Balancer:
    port: int
    stats: int

    def up(self) -> dict[str, bool]:
        """HAProxy's view of each instance (its health checks' verdict)."""
        page = httpx.get(f"http://127.0.0.1:{self.stats}/stats;csv", timeout=2).text
        rows = csv.DictReader(io.StringIO(page.lstrip("# ")))
        return {
            r["svname"]: r["status"] == "UP"
            for r in rows
            if r["pxname"] == "voicebots" and r["svname"].startswith("bot")
        }


@contextlib.contextmanager
def instance(name: str, tmp: Path, max_calls: int) -> Iterator[Instance]:
    http = free_port()
    env = {
        "VOICEBOT_CALLS_DIR": str(tmp / name),
        "VOICEBOT_HTTP_PORT": str(http),
        "VOICEBOT_LIMITS_MAX_CALLS": str(max_calls),
        "VOICEBOT_PROFILES_ECHO_DELAY_MS": "0",
    }
    with server_process("echo", env) as (port, proc):
        yield Instance(name, port, http, tmp / name, proc)


@contextlib.contextmanager
def haproxy(tmp: Path, bots: list[Instance]) -> Iterator[Balancer]:
    lb = Balancer(free_port(), free_port())
    env = {
        **os.environ,
        "VOICEBOT_LB_BIND": f"127.0.0.1:{lb.port}",
        "VOICEBOT_LB_STATS_BIND": f"127.0.0.1:{lb.stats}",
    }
    for bot in bots:
        env[f"VOICEBOT_{bot.name.upper()}"] = f"127.0.0.1:{bot.port}"
        env[f"VOICEBOT_{bot.name.upper()}_HTTP_PORT"] = str(bot.http)
    log = (tmp / "haproxy.log").open("w")
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(CONFIG)], env=env, stdout=log, stderr=log)
    try:
        until(lambda: all(lb.up().values()) and len(lb.up()) == len(bots), "both bots UP")
        yield lb
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def until(condition: object, what: str, within: float = 10.0) -> None:
    """Polls ``condition`` (a callable; connection errors count as not yet)."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if condition():  # type: ignore[operator]
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.1)


def hold_call(lb: Balancer) -> asyncio.Task[object]:
    """A call through HAProxy that stays on the line for HELD_S, then hangs up."""
    sim = CallerSimulator("127.0.0.1", lb.port, [], duration=HELD_S)
    return asyncio.ensure_future(sim.run())


async def settle(bots: list[Instance], lb: Balancer, calls: int) -> None:
    """Waits until the instances hold ``calls`` calls in all and HAProxy's view of each
    matches its /readyz (a full one is DOWN)."""

    def settled() -> bool:
        taken = sum(len(b.served()) for b in bots)
        return taken == calls and lb.up() == {b.name: b.ready() for b in bots}

    await asyncio.to_thread(until, settled, f"{calls} calls placed and HAProxy up to date")


@contextlib.contextmanager
def balanced(tmp: Path, calls1: int, calls2: int) -> Iterator[tuple[Instance, Instance, Balancer]]:
    """bot1 and bot2, taking at most ``calls1`` and ``calls2`` calls, behind HAProxy."""
    with (
        instance("bot1", tmp, calls1) as a,
        instance("bot2", tmp, calls2) as b,
        haproxy(tmp, [a, b]) as lb,
    ):
        yield a, b, lb


async def place_held_calls(bots: list[Instance], lb: Balancer, count: int) -> None:
    """``count`` held calls, one at a time once HAProxy has seen the last one land."""
    calls = []
    for placed in range(1, count + 1):
        calls.append(hold_call(lb))
        await settle(bots, lb, placed)
    await asyncio.gather(*calls)


def test_calls_spread_over_the_instances(tmp_path: Path) -> None:
    with balanced(tmp_path, 4, 4) as (a, b, lb):
        asyncio.run(place_held_calls([a, b], lb, 4))
    assert len(a.served()) == 2 and len(b.served()) == 2  # leastconn: two each
    assert set(a.served() + b.served()) == {"caller hung up"}


def test_a_full_instance_is_skipped(tmp_path: Path) -> None:
    # bot1 takes one call, bot2 three. By connections alone (leastconn) the fourth call would
    # go to bot1 (1 against bot2's 2) and hear "all lines busy"; its /readyz keeps it out.
    with balanced(tmp_path, 1, 3) as (a, b, lb):
        asyncio.run(place_held_calls([a, b], lb, 4))
    assert a.served() == ["caller hung up"]
    assert b.served() == ["caller hung up"] * 3


def test_a_stopped_instance_drains_its_calls_while_new_ones_go_to_the_other(
    tmp_path: Path,
) -> None:
    with balanced(tmp_path, 4, 4) as (a, b, lb):

        async def main() -> None:
            first = hold_call(lb)
            await settle([a, b], lb, 1)
            busy, idle = (a, b) if a.served() else (b, a)
            busy.process.send_signal(signal.SIGTERM)  # an operator stops it
            await asyncio.to_thread(until, lambda: lb.up()[busy.name] is False, "drain")
            second = hold_call(lb)
            await asyncio.gather(first, second)
            assert busy.process.wait(10) == 0  # it exits once its call is over
            assert busy.served() == ["caller hung up"]  # the call was not cut
            # The new call went to the other (its end is logged a moment after the hang-up).
            await asyncio.to_thread(until, lambda: idle.served() != ["in progress"], "logged")
            assert idle.served() == ["caller hung up"]

        asyncio.run(main())
