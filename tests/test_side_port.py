"""The HTTP side port (/healthz, /readyz, /metrics) and the metrics it exposes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bot.app import Bot
from bot.calllog import list_calls, read_call
from bot.metrics import Metrics
from bot.tools.simulator import CallerSimulator
from bot.web import SidePort

from .conftest import make_settings, wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, parsed by Prometheus's own text parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def turn(first_frame_out: int, **fields: Any) -> dict[str, Any]:
    marks = {"speech_end": 0, "endpoint": 300, "stt_done": 420, "llm_first_token": 560}
    marks |= {"tts_first_audio": first_frame_out - 20, "first_frame_out": first_frame_out}
    return {"event": "turn", "reply": "Hello.", "marks_ms": marks, "llm_wait_ms": 0.0, **fields}


def test_the_metrics_count_what_the_call_logs_say() -> None:
    metrics = Metrics(lambda: 3)
    for record in (
        {"event": "call_start"},
        turn(640),
        turn(1120, underruns=2, interrupted=True, llm_wait_ms=150.0),
        {"event": "turn", "reply": "", "marks_ms": {"speech_end": 0}},  # unanswered: no latency
        {"event": "barge_in", "dropped_ms": 800},
        {"event": "busy", "max_calls": 4},
        {"event": "apology", "error": "EngineFailed: LLM server gone"},
        {"event": "call_end", "reason": "caller hung up", "playout_reanchors": 1},
        {"event": "call_end", "reason": "all lines busy", "playout_reanchors": 0},
    ):
        metrics.observe(record)
    got = samples(metrics.exposition().decode())
    assert got[("voicebot_calls_in_progress", ())] == 3
    assert got[("voicebot_turns_total", ())] == 2
    assert got[("voicebot_response_seconds_count", ())] == 2
    assert got[("voicebot_response_seconds_sum", ())] == 0.64 + 1.12
    assert got[("voicebot_response_seconds_bucket", (("le", "0.75"),))] == 1
    assert got[("voicebot_response_seconds_bucket", (("le", "1.25"),))] == 2
    stt = ("voicebot_turn_stage_seconds_sum", (("stage", "stt_done"),))
    assert got[stt] == 0.84
    assert got[("voicebot_engine_wait_seconds_sum", (("engine", "llm"),))] == 0.15
    assert got[("voicebot_playout_underruns_total", ())] == 2
    assert got[("voicebot_playout_reanchors_total", ())] == 1
    assert got[("voicebot_replies_interrupted_total", ())] == 1
    assert got[("voicebot_barge_ins_total", ())] == 1
    assert got[("voicebot_busy_rejections_total", ())] == 1
    assert got[("voicebot_engine_failures_total", ())] == 1
    assert got[("voicebot_calls_total", (("reason", "caller hung up"),))] == 1
    assert got[("voicebot_calls_total", (("reason", "all lines busy"),))] == 1


def test_the_side_port_says_alive_ready_full_and_draining(calls_dir: Path) -> None:
    settings = make_settings(
        calls_dir,
        VOICEBOT_SERVER_PORT="0",
        VOICEBOT_HTTP_PORT="0",
        VOICEBOT_LIMITS_MAX_CALLS="1",
        VOICEBOT_PROFILES_ECHO_DELAY_MS="0",
    )

    async def main() -> None:
        bot = Bot(settings)
        side = SidePort(bot, settings.http)
        await bot.start()
        await side.start()
        assert side.address is not None
        port = bot.servers["echo"].address[1]
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{side.address[1]}") as web:
                assert (await web.get("/healthz")).status_code == 200
                ready = await web.get("/readyz")
                assert ready.status_code == 200 and ready.json()["calls"] == 0
                call = asyncio.create_task(
                    CallerSimulator("127.0.0.1", port, [], duration=30).run()
                )
                await wait_until(lambda: len(bot.live) == 1)
                full = await web.get("/readyz")
                assert full.status_code == 503, full.text
                assert full.json() == {"ready": False, "calls": 1, "max_calls": 1, "closing": False}
                bot.end_calls()
                await call
                await wait_until(lambda: not bot.live)
                assert (await web.get("/readyz")).status_code == 200
                page = (await web.get("/metrics")).text
                [folder] = list_calls(calls_dir)
                end = read_call(folder).end
                assert end is not None
                assert samples(page)[("voicebot_calls_total", (("reason", end["reason"]),))] == 1
                closing = asyncio.create_task(bot.close(grace=5))
                await wait_until(lambda: bot.closing)
                draining = await web.get("/readyz")
                assert draining.status_code == 503 and draining.json()["closing"] is True
                assert (await web.get("/healthz")).status_code == 200  # alive while it drains
                await closing
        finally:
            await bot.close()
            await side.close()

    asyncio.run(main())


def test_the_grafana_dashboard_asks_only_for_metrics_the_bot_exposes() -> None:
    import json
    import re

    root = Path(__file__).resolve().parent.parent
    dashboard = json.loads((root / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    asked = {m for e in exprs for m in re.findall(r"\bvoicebot_\w+", e)}
    exposed = set(samples(Metrics(lambda: 0).exposition().decode()))
    names = {name for name, _ in exposed}
    # Counters and histograms with no sample yet: their families still name them.
    families = {f.name for f in text_string_to_metric_families(Metrics().exposition().decode())}
    known = names | {f"{f}_bucket" for f in families} | {f"{f}_total" for f in families} | families
    assert asked and asked <= known, asked - known
