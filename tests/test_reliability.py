"""Overload, graceful shutdown, and secrets kept out of configuration files and logs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bot.app import Bot
from bot.calllog import list_calls, read_call
from bot.config import ConfigError, load
from bot.conversation.assets import Assets
from bot.tools.simulator import CallerSimulator

from .conftest import ROOT, make_settings, wait_until

BUSY = b"\x00\x30" * 160 * 25  # 0.5 s of a loud prompt


def test_the_call_over_the_limit_hears_busy_and_is_hung_up_while_others_go_on(
    calls_dir: Path,
) -> None:
    settings = make_settings(calls_dir, VOICEBOT_SERVER_PORT="0", VOICEBOT_LIMITS_MAX_CALLS="1")
    # An echo profile needs no engines: only the busy prompt.
    no_engines: Any = types.SimpleNamespace()
    assets = Assets(settings, no_engines, ThreadPoolExecutor(1), prompts={("busy", 8000): BUSY})

    async def main() -> tuple[CallerSimulator, CallerSimulator]:
        bot = Bot(settings, assets)
        await bot.start()
        port = bot.servers["echo"].address[1]
        try:
            first = CallerSimulator("127.0.0.1", port, [], duration=2.5)
            running = asyncio.create_task(first.run())
            await wait_until(lambda: bot.calls_in_progress == 1)
            second = CallerSimulator("127.0.0.1", port, [], duration=5.0)
            await second.run()
            await running
            return first, second
        finally:
            await bot.close(grace=2)

    first, second = asyncio.run(main())
    assert second.report.ended_by == "bot" and second.report.hangup_frame
    assert second.report.voiced_frames_received == len(BUSY) // 320
    assert second.report.duration < len(BUSY) / 16000 + 1.0  # hung up within 1 s of the prompt
    assert first.report.ended_by == "caller"  # the call in progress was untouched
    assert first.report.rx_interval_ms["max"] < 60
    reasons = sorted(read_call(f).events[-1]["reason"] for f in list_calls(calls_dir))
    assert reasons == ["all lines busy", "caller hung up"]


def serve(calls_dir: Path, **env: str) -> tuple[subprocess.Popen[str], int]:
    from bot.tools.subserver import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--port", str(port), "--profile", "echo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "VOICEBOT_CALLS_DIR": str(calls_dir), "VOICEBOT_HTTP_PORT": "0", **env},
    )
    assert proc.stdout is not None
    assert "ready" in proc.stdout.readline()
    return proc, port


def test_sigterm_lets_calls_finish_refuses_new_ones_and_exits_0(calls_dir: Path) -> None:
    proc, port = serve(calls_dir, VOICEBOT_LIMITS_SHUTDOWN_GRACE="10")

    async def main() -> CallerSimulator:
        sim = CallerSimulator("127.0.0.1", port, [], duration=1.5)
        call = asyncio.create_task(sim.run())
        await asyncio.sleep(0.5)  # the call is well under way (the simulator paces in real time)
        proc.send_signal(signal.SIGTERM)
        for _ in range(100):  # the listener closes at once
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                await asyncio.sleep(0.02)
            except ConnectionRefusedError:
                break
        else:
            pytest.fail("still accepting calls after SIGTERM")
        await call
        return sim

    sim = asyncio.run(main())
    assert proc.wait(10) == 0
    assert sim.report.ended_by == "caller"  # it ran its full 1.5 s
    [folder] = list_calls(calls_dir)
    assert read_call(folder).events[-1]["reason"] == "caller hung up"
    assert "shutting down" in (proc.stderr.read() if proc.stderr else "")


def test_calls_still_going_when_the_grace_ends_are_hung_up_and_logged(calls_dir: Path) -> None:
    proc, port = serve(calls_dir, VOICEBOT_LIMITS_SHUTDOWN_GRACE="0.5")

    async def main() -> CallerSimulator:
        sim = CallerSimulator("127.0.0.1", port, [], duration=20)
        call = asyncio.create_task(sim.run())
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        await call
        return sim

    sim = asyncio.run(main())
    assert proc.wait(10) == 0
    assert sim.report.ended_by == "bot" and sim.report.hangup_frame
    assert sim.report.duration < 3
    [folder] = list_calls(calls_dir)
    assert read_call(folder).events[-1]["reason"] == "server shutting down"


def test_secrets_come_from_the_environment_only_and_never_show(tmp_path: Path) -> None:
    conf = tmp_path / "voicebot.toml"
    conf.write_text('[ami]\nenabled = true\nsecret = "in-the-file"\n')
    with pytest.raises(ConfigError, match=r"^ami.secret: .* set VOICEBOT_AMI_SECRET$"):
        load(conf, {})
    settings = load(None, {"VOICEBOT_ARI_ENABLED": "1", "VOICEBOT_ARI_PASSWORD": "pw-Zx81vv0"})
    assert settings.ari.password == "pw-Zx81vv0"
    assert "pw-Zx81vv0" not in repr(settings)
    with pytest.raises(ConfigError, match=r"^ari.password: ARI is enabled but"):
        load(None, {"VOICEBOT_ARI_ENABLED": "1"})


def test_safe_defaults() -> None:
    settings = load(None, {})
    assert settings.server.host == "127.0.0.1"
    assert settings.ami.host == "127.0.0.1" and settings.ari.url.startswith("http://127.0.0.1")
    assert not settings.ari.enabled and not settings.ami.enabled
    assert settings.ari.password == "" and settings.ami.secret == ""


def test_a_bad_setting_stops_start_up_with_one_line_and_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bot", "serve"],
        env={**os.environ, "VOICEBOT_LIMITS_MAX_CALLS": "0"},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "voicebot: configuration error: limits.max_calls: must be between 1 and 1000, got 0"
    ]


def test_a_soak_of_overlapping_calls_leaves_the_server_where_it_started() -> None:
    from bot.tools import bench_soak

    result = bench_soak.run(24, 4, progress=False)
    assert result["growth_after_warm_up"]["fds"] <= 0
    assert result["growth_after_warm_up"]["tasks"] <= 0
    assert result["unclosed_logs"] == 0 and result["caller_errors"] == 0
    assert result["refused_busy"] == 0
    assert result["end_reasons"] == {"caller hung up": 24 + result["warm_up_calls"]}
    assert len(result["samples"]) >= 5
    assert result["flat"], bench_soak.render(result)


def test_a_model_that_fails_to_load_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(64))  # a truncated model file
    done = subprocess.run(
        [sys.executable, "-m", "bot", "serve"],
        env={**os.environ, "VOICEBOT_MODELS_LLM": str(broken)},
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("voicebot: cannot start: ") and "broken.gguf" in last
