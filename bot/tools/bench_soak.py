"""`voicebot bench soak`: hundreds of short calls, some overlapping, through `voicebot serve`.

The server runs in its own process, as in production. After a warm-up, and then every tenth of
the run, the benchmark asks it for its health (SIGUSR1 -> ``server-stats.json``: calls in
progress, asyncio tasks, threads, open file descriptors, resident memory) once no call is in
progress, so the numbers compare like with like. A healthy server ends where it started:
no more tasks, threads or descriptors than after the warm-up, and memory flat.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from ..calllog import list_calls, read_call
from .scenarios import generate
from .simulator import CallerSimulator, DtmfAt
from .subserver import server_process

STATS_FILE: Final = "server-stats.json"
SAMPLES: Final = 10
# Allocator noise. A leak shows as growth beyond 5 % (or this) after the warm-up, or beyond
# this over the second half of the run, when everything has long been warm.
RSS_SLACK_MB: Final = 10.0


def sample(proc: subprocess.Popen[str], logs: Path, within: float = 10.0) -> dict[str, Any]:
    """The server's health once no call is in progress (the last ones may still be closing
    their logs when the callers are done)."""
    path = logs / STATS_FILE
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        before = path.stat().st_mtime_ns if path.exists() else 0
        proc.send_signal(signal.SIGUSR1)
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_mtime_ns != before:
                break
            time.sleep(0.02)
        data: dict[str, Any] = json.loads(path.read_text())
        if data["calls_in_progress"] == 0:
            return data
        time.sleep(0.1)
    raise RuntimeError(f"the server did not report an idle state within {within:g} s")


async def _calls(
    port: int, count: int, concurrency: int, turns: list[bytes], seed: int
) -> list[Any]:
    """``count`` short calls, ``concurrency`` at a time, with random lengths and start times."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with sem:
            await asyncio.sleep(rng.uniform(0, 0.2))  # overlap, not lockstep
            if turns:
                sim = CallerSimulator(
                    "127.0.0.1",
                    port,
                    [turns[i % len(turns)]],
                    greeting_wait=4.0,
                    quiet=0.8,
                    answer_timeout=15.0,
                    record=False,
                )
            else:
                dtmf = [DtmfAt(rng.choice("0123456789*#"), 0.2)] if rng.random() < 0.3 else []
                sim = CallerSimulator(
                    "127.0.0.1", port, [], duration=rng.uniform(0.3, 1.5), dtmf=dtmf, record=False
                )
            return await sim.run()

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def run(
    calls: int,
    concurrency: int,
    *,
    profile: str = "echo",
    env: dict[str, str] | None = None,
    progress: bool = True,
    seed: int = 1,
) -> dict[str, Any]:
    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    logs = Path(tempfile.mkdtemp(prefix="voicebot-soak-"))
    turns = [sc.turns[0] for sc in generate(8)] if profile != "echo" else []
    # Warm until every engine has run at full concurrency once (caches, thread pools, KV).
    warm = max(4, calls // SAMPLES, 2 * concurrency)
    say(f"bench soak: starting the server (profile {profile}) ...")
    start = time.monotonic()
    reports: list[Any] = []
    samples: list[dict[str, Any]] = []
    server_env = {
        # The benchmark measures calls, not the limit: leave room for teardown races.
        "VOICEBOT_LIMITS_MAX_CALLS": str(2 * concurrency + 2),
        **(env or {}),
        "VOICEBOT_CALLS_DIR": str(logs),
    }
    with server_process(profile, server_env) as (
        port,
        proc,
    ):
        say(f"bench soak: warm-up, {warm} calls ...")
        reports += asyncio.run(_calls(port, warm, concurrency, turns, seed))
        samples.append({"calls_done": len(reports), **sample(proc, logs)})
        step = max(1, calls // SAMPLES)
        while len(reports) < warm + calls:
            n = min(step, warm + calls - len(reports))
            reports += asyncio.run(_calls(port, n, concurrency, turns, seed + len(reports)))
            samples.append({"calls_done": len(reports), **sample(proc, logs)})
            s = samples[-1]
            say(
                f"  [{len(reports) - warm}/{calls}] rss {s['rss_mb']} MB, fds {s['fds']}, "
                f"tasks {s['tasks']}, threads {s['threads']}, in progress "
                f"{s['calls_in_progress']}"
            )
    return {
        "profile": profile,
        "calls": calls,
        "warm_up_calls": warm,
        "concurrency": concurrency,
        **_verdict(samples, logs),
        "caller_errors": sum(r.ended_by.startswith("error") for r in reports),
        "wall_s": round(time.monotonic() - start, 1),
        "logs": str(logs),
    }


def _verdict(samples: list[dict[str, Any]], logs: Path) -> dict[str, Any]:
    """What grew after the warm-up, how the calls ended, and whether the server stayed flat."""
    ends: collections.Counter[str] = collections.Counter()
    unclosed = refused = 0
    for folder in list_calls(logs):
        call = read_call(folder)
        refused += any(e["event"] == "busy" for e in call.events)
        if call.end is None:
            unclosed += 1
        else:
            ends[str(call.end["reason"])] += 1
    base, middle, last = samples[0], samples[len(samples) // 2], samples[-1]
    growth = {k: round(last[k] - base[k], 1) for k in ("rss_mb", "fds", "tasks", "threads")}
    second_half_rss = round(last["rss_mb"] - middle["rss_mb"], 1)
    flat = (
        growth["fds"] <= 0
        and growth["tasks"] <= 0
        and growth["threads"] <= 0
        and growth["rss_mb"] <= max(RSS_SLACK_MB, 0.05 * base["rss_mb"])
        and second_half_rss <= RSS_SLACK_MB
        and unclosed == 0
        and refused == 0
    )
    return {
        "samples": samples,
        "growth_after_warm_up": growth,
        "rss_growth_second_half_mb": second_half_rss,
        "peak_rss_mb": max(s["rss_mb"] for s in samples),
        "end_reasons": dict(ends),
        "unclosed_logs": unclosed,
        "refused_busy": refused,
        "flat": flat,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"soak: {result['calls']} calls after {result['warm_up_calls']} warm-up, "
        f"{result['concurrency']} at a time, profile {result['profile']}, "
        f"{result['wall_s']} s",
        f"{'calls':>6} {'rss MB':>8} {'fds':>5} {'tasks':>6} {'threads':>8}",
    ]
    for s in result["samples"]:
        lines.append(
            f"{s['calls_done']:>6} {s['rss_mb']:>8} {s['fds']:>5} {s['tasks']:>6} {s['threads']:>8}"
        )
    g = result["growth_after_warm_up"]
    lines.append(
        f"growth after warm-up: rss {g['rss_mb']:+} MB, fds {g['fds']:+}, tasks {g['tasks']:+}, "
        f"threads {g['threads']:+}; rss over the second half "
        f"{result['rss_growth_second_half_mb']:+} MB; peak rss {result['peak_rss_mb']} MB"
    )
    lines.append(
        f"end reasons: {result['end_reasons']}; unclosed logs {result['unclosed_logs']}; "
        f"refused as busy {result['refused_busy']}"
    )
    lines.append("verdict: " + ("flat" if result["flat"] else "GROWING (see above)"))
    return "\n".join(lines)
