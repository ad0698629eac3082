"""`voicebot bench pacing`: how evenly the bot's frames reach callers, one to many echo calls.

Asterisk neither paces nor buffers what it is sent (docs/audiosocket.md): the bot's playout
clock must write one 20 ms frame every 20 ms to every call. Each run places ``n`` echo calls
for a while and reports the spacing of the frames each caller received.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Any

from .simulator import CallerSimulator
from .subserver import serving


async def _calls(port: int, calls: int, seconds: float, progress: bool) -> list[Any]:
    sims = [
        CallerSimulator("127.0.0.1", port, rate=8000, duration=seconds, record=False)
        for _ in range(calls)
    ]
    runs = asyncio.gather(*(s.run() for s in sims))
    if progress:
        start = time.monotonic()
        while not runs.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(runs), 1.0)
            got = sum(len(s.rx_times) for s in sims)
            print(
                f"\r  {calls} call(s): {time.monotonic() - start:4.1f}/{seconds:g} s, "
                f"{got} frames received",
                end="",
                file=sys.stderr,
                flush=True,
            )
        print(file=sys.stderr)
    return list(await runs)


def _row(calls: int, seconds: float, reports: list[Any]) -> dict[str, Any]:
    gaps = [r.rx_interval_ms for r in reports]
    return {
        "calls": calls,
        "seconds": seconds,
        "frames_per_call": [r.frames_received for r in reports],
        "interval_p50_ms": max(g["p50"] for g in gaps),
        "interval_p99_ms": max(g["p99"] for g in gaps),
        "interval_max_ms": max(g["max"] for g in gaps),
        "interval_mean_ms": round(sum(g["mean"] for g in gaps) / len(gaps), 3),
        "max_frames_in_20ms": max(r.max_frames_in_20ms for r in reports),
        "ended_by": sorted({r.ended_by for r in reports}),
    }


def run(
    calls: list[int], seconds: float, *, calls_dir: str, progress: bool = True
) -> list[dict[str, Any]]:
    """One row per entry of ``calls``: that many concurrent echo calls for ``seconds``."""
    results = []
    # Pacing is measured on as many calls as asked for, not on busy prompts: lift the limit.
    env = {"VOICEBOT_CALLS_DIR": calls_dir, "VOICEBOT_LIMITS_MAX_CALLS": str(max(calls))}
    with serving("echo", env) as port:
        for n in calls:
            print(f"pacing: {n} concurrent echo call(s) for {seconds:g} s", file=sys.stderr)
            results.append(_row(n, seconds, asyncio.run(_calls(port, n, seconds, progress))))
    return results


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'calls':>5} {'frames/call (min-max)':>22} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'mean ms':>8} {'burst':>5}"
    ]
    for r in results:
        fpc = r["frames_per_call"]
        lines.append(
            f"{r['calls']:>5} {f'{min(fpc)}-{max(fpc)}':>22} {r['interval_p50_ms']:>7.2f} "
            f"{r['interval_p99_ms']:>7.2f} {r['interval_max_ms']:>7.2f} "
            f"{r['interval_mean_ms']:>8.3f} {r['max_frames_in_20ms']:>5}"
        )
    lines.append("(worst call shown for each spacing statistic; burst = most frames in any 20 ms)")
    return "\n".join(lines)
