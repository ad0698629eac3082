"""`voicebot bench calls`: simulated callers through the real server and the real models.

Starts ``voicebot serve --profile assistant`` in its own process (engines warmed before it says
ready), places the generated scenario calls through the caller simulator, ``--concurrency`` at a
time, and reports response latency as the caller measured it (end of its speech to the first
sound back) and each stage from the bot's own per-call marks, plus talk-overs (bot audio while
the caller spoke), missed answers and the playout clock's health.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..calllog import list_calls, read_call
from ..conversation.records import MARKS
from .scenarios import Scenario, generate
from .simulator import CallerSimulator
from .subserver import serving


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "p50": round(statistics.median(values), 1),
        "p95": round(percentile(values, 95), 1),
        "max": round(max(values), 1),
        "n": len(values),
    }


async def _run_calls(
    port: int, scenarios: list[Scenario], concurrency: int, progress: bool
) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)
    done = 0

    async def one(sc: Scenario) -> Any:
        nonlocal done
        async with sem:
            sim = CallerSimulator(
                "127.0.0.1",
                port,
                list(sc.turns),
                greeting_wait=4.0,
                quiet=1.2,
                answer_timeout=15.0,
                record=False,
            )
            report = await sim.run()
            done += 1
            if progress:
                lat = [t.response_latency_ms for t in report.turns]
                print(
                    f"  [{done}/{len(scenarios)}] {sc.name}: "
                    + ", ".join("missed" if x is None else f"{x:.0f} ms" for x in lat),
                    file=sys.stderr,
                    flush=True,
                )
            return report

    return list(await asyncio.gather(*(one(sc) for sc in scenarios)))


def stage_times(turns: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each pipeline mark's times over the logged turns; a turn answered by a prompt (the
    hand-over, asking again) has no marks, or none of the LLM's and the TTS's."""
    stages: dict[str, list[float]] = {m: [] for m in MARKS[1:]}
    for turn in turns:
        for name, ms in turn.get("marks_ms", {}).items():
            if name in stages:
                stages[name].append(ms)
    return stages


def _read_logs(logs: Path) -> tuple[list[dict[str, Any]], int, int]:
    """The turns the bot logged, the calls it refused as busy, its playout re-anchors."""
    turns: list[dict[str, Any]] = []
    refused = reanchors = 0
    for folder in list_calls(logs):
        events = read_call(folder).events
        refused += any(e["event"] == "busy" for e in events)
        turns += [e for e in events if e["event"] == "turn"]
        reanchors += sum(
            int(e.get("playout_reanchors", 0)) for e in events if e["event"] == "call_end"
        )
    return turns, refused, reanchors


def run(
    calls: int, concurrency: int, *, env: dict[str, str] | None = None, progress: bool = True
) -> dict[str, Any]:
    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    say(f"bench calls: generating {calls} caller scenarios ...")
    scenarios = generate(calls)
    logs = Path(tempfile.mkdtemp(prefix="voicebot-bench-"))
    say("bench calls: starting the server (loading and warming the engines) ...")
    server_env = {
        # The benchmark measures latency, not the call limit: leave room for teardown races.
        "VOICEBOT_LIMITS_MAX_CALLS": str(2 * concurrency + 2),
        **(env or {}),
        "VOICEBOT_CALLS_DIR": str(logs),
    }
    with serving("assistant", server_env) as port:
        start = time.monotonic()
        reports = asyncio.run(_run_calls(port, scenarios, concurrency, progress))
    latencies = [
        t.response_latency_ms for r in reports for t in r.turns if t.response_latency_ms is not None
    ]
    missed = sum(t.response_latency_ms is None for r in reports for t in r.turns)
    talk_overs = sum(t.talk_over_frames > 0 for r in reports for t in r.turns)
    turns_logged, refused, reanchors = _read_logs(logs)
    stages = stage_times(turns_logged)
    return {
        "calls": calls,
        "concurrency": concurrency,
        "turns": sum(len(r.turns) for r in reports),
        "response_latency_ms": summary(latencies),
        "stages_ms": {k: summary(v) for k, v in stages.items()},
        "missed_answers": missed,
        "refused_busy": refused,
        "talk_overs": talk_overs,
        # Which turns: the call's log (by uuid) shows what the bot was doing.
        "talk_over_turns": [
            {"call": sc.name, "uuid": r.uuid, "turn": t.index, "frames": t.talk_over_frames}
            for sc, r in zip(scenarios, reports, strict=True)
            for t in r.turns
            if t.talk_over_frames
        ],
        # The longest silence inside each answer: a stall between clauses the caller hears.
        "mid_reply_gap_ms": summary(
            [t.longest_gap_ms for r in reports for t in r.turns if t.response_latency_ms]
        ),
        "playout_reanchors": reanchors,
        "worst_frame_gap_ms": max((r.rx_interval_ms.get("max", 0) for r in reports), default=0),
        "wall_s": round(time.monotonic() - start, 1),
        "transcripts": [(e["transcript"], e["reply"]) for e in turns_logged],
        "logs": str(logs),
    }


def render(result: dict[str, Any]) -> str:
    r = result["response_latency_ms"]
    lines = [
        f"{result['calls']} calls, {result['turns']} turns, concurrency {result['concurrency']}, "
        f"{result['wall_s']} s",
        f"response latency (at the caller): p50 {r.get('p50', '-')} ms, p95 {r.get('p95', '-')} "
        f"ms, max {r.get('max', '-')} ms",
        "stages (bot marks, ms after the caller's speech ended):  p50 / p95 / max",
    ]
    for name, s in result["stages_ms"].items():
        if s:
            lines.append(f"  {name:<16} {s['p50']:>7} / {s['p95']:>7} / {s['max']:>7}")
    lines.append(
        f"missed answers: {result['missed_answers']}, refused as busy: "
        f"{result['refused_busy']}, talk-overs: "
        f"{result['talk_overs']}, playout re-anchors: {result['playout_reanchors']}, "
        f"worst gap between bot frames: {result['worst_frame_gap_ms']} ms"
    )
    g = result["mid_reply_gap_ms"]
    if g:
        lines.append(
            f"longest silence inside an answer: p50 {g['p50']} ms, p95 {g['p95']} ms, "
            f"max {g['max']} ms"
        )
    lines.append(f"call logs: {result['logs']}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(int(sys.argv[1]), int(sys.argv[2])), indent=2))
