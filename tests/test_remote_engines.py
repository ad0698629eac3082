"""The remote engines against the real servers: llama-cpp-python's OpenAI-compatible server,
wyoming-faster-whisper and wyoming-piper, each started here on the offline models."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bot.audio import float_to_pcm, resample
from bot.calllog import list_calls, read_call
from bot.config import ConfigError, load
from bot.engines import EngineFailed, ModelUnavailable
from bot.engines.base import Usage
from bot.engines.remote_llm import OpenAiLlm, RemoteLlmOptions
from bot.engines.tts import PiperTts
from bot.engines.wyoming import WyomingOptions, WyomingStt, WyomingTts
from bot.tools import doctor
from bot.tools.doctor import models_report
from bot.tools.scenarios import phone_band
from bot.tools.simulator import CallerSimulator
from bot.tools.subserver import free_port, server_process
from tests.model_servers import llama_server, wyoming_piper, wyoming_whisper
from tests.test_side_port import samples

SHOP = [
    {
        "role": "system",
        "content": "You answer the phone for Greenway Bikes. Open Monday to Friday 9 am to "
        "6 pm, Saturday 10 am to 4 pm, closed on Sunday. Answer in one short sentence.",
    },
    {"role": "user", "content": "When are you open on Saturday?"},
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    logs = tmp_path_factory.mktemp("model-servers")
    with llama_server(logs) as llm, wyoming_whisper(logs) as stt, wyoming_piper(logs) as tts:
        yield {"llm": llm.url, "stt": stt.url, "tts": tts.url}


@pytest.fixture(scope="module")
def llm(servers: dict[str, str]) -> Iterator[OpenAiLlm]:
    engine = OpenAiLlm(RemoteLlmOptions(servers["llm"], model="qwen2.5-0.5b"))
    yield engine
    engine.close()


def test_the_openai_engine_streams_a_reply_from_the_server(llm: OpenAiLlm) -> None:
    assert "qwen2.5-0.5b" in llm.check()
    usage = Usage()
    pieces = list(llm.stream(SHOP, usage=usage))
    reply = "".join(pieces)
    assert len(pieces) > 3, pieces  # streamed piece by piece, not in one answer
    assert "10" in reply and "4" in reply, reply
    assert usage.completion_tokens == len(pieces) and usage.finish_reason == "stop"
    assert usage.first_token_s is not None and usage.first_token_s < usage.total_s


def test_a_reply_closed_mid_stream_stops_and_the_next_one_streams(llm: OpenAiLlm) -> None:
    stream = llm.stream(SHOP, max_tokens=40)
    first = next(stream)
    assert first and llm.contended is False
    stream.close()  # barge-in or hang-up: the connection closes, the server stops decoding
    assert llm._streaming == 0
    usage = Usage()
    assert "".join(llm.stream(SHOP, max_tokens=6, usage=usage))
    assert usage.finish_reason == "length" and usage.completion_tokens <= 6


def test_an_llm_server_that_is_not_there_fails_the_reply_naming_it() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    llm = OpenAiLlm(RemoteLlmOptions(url, connect_timeout_s=1.0))
    with pytest.raises(ModelUnavailable, match=url):
        llm.check()
    with pytest.raises(EngineFailed, match=url):
        "".join(llm.stream(SHOP))


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts and never answers: a model server stuck mid-request."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()
    for s in accepted:
        s.close()


def test_a_server_that_stops_answering_fails_the_reply_after_the_read_timeout(
    silent_server: int,
) -> None:
    llm = OpenAiLlm(RemoteLlmOptions(f"http://127.0.0.1:{silent_server}/v1", read_timeout_s=0.3))
    with pytest.raises(EngineFailed, match="timed out"):
        "".join(llm.stream(SHOP))
    stt = WyomingOptions(f"tcp://127.0.0.1:{silent_server}", read_timeout_s=0.3)
    with pytest.raises(ModelUnavailable, match="timed out"):
        WyomingStt(stt)


def test_wyoming_tts_streams_audio_that_wyoming_stt_hears(servers: dict[str, str]) -> None:
    tts = WyomingTts(WyomingOptions(servers["tts"]))
    assert tts.native_rate == 22050  # Piper's medium voices
    chunks = list(tts.synthesize("What are your opening hours on Saturday?"))
    assert len(chunks) > 1  # chunk by chunk, as the server sends them
    audio = np.concatenate(chunks)
    assert 1.0 < len(audio) / tts.native_rate < 5.0
    pcm = float_to_pcm(resample(audio, tts.native_rate, 8000))
    heard = WyomingStt(WyomingOptions(servers["stt"])).transcribe(pcm, 8000)
    assert "opening hours on saturday" in heard.text.lower(), heard
    assert heard.audio_seconds == pytest.approx(len(pcm) / 16000)
    with pytest.raises(ModelUnavailable, match="no voice 'nobody'"):
        tts.check_voice("nobody")


def test_a_remote_engine_needs_its_url_and_a_tcp_or_http_one(tmp_path: Path) -> None:
    config = tmp_path / "voicebot.toml"
    config.write_text('[models]\nllm_engine = "openai"\n')
    with pytest.raises(ConfigError, match="^models.llm_url: llm_engine is openai"):
        load(config, environ={})
    config.write_text('[models]\nstt_engine = "wyoming"\nstt_url = "http://stt:10300"\n')
    with pytest.raises(ConfigError, match="^models.stt_url: must be a tcp:// address"):
        load(config, environ={})
    config.write_text('[models]\nllm_api_key = "sk-1"\n')
    with pytest.raises(ConfigError, match="VOICEBOT_MODELS_LLM_API_KEY"):
        load(config, environ={})


def _remote_env(servers: dict[str, str], calls: Path) -> dict[str, str]:
    return {
        "VOICEBOT_CALLS_DIR": str(calls),
        "VOICEBOT_MODELS_STT_ENGINE": "wyoming",
        "VOICEBOT_MODELS_STT_URL": servers["stt"],
        "VOICEBOT_MODELS_LLM_ENGINE": "openai",
        "VOICEBOT_MODELS_LLM_URL": servers["llm"],
        "VOICEBOT_MODELS_LLM": "qwen2.5-0.5b",
        "VOICEBOT_MODELS_TTS_ENGINE": "wyoming",
        "VOICEBOT_MODELS_TTS_URL": servers["tts"],
    }


def metrics_after_calls(http_port: int, calls: int) -> dict[Any, float]:
    """The instance's /metrics once ``calls`` calls have ended (polled: a call's end is
    logged a moment after the caller hangs up)."""
    deadline = time.monotonic() + 10
    while True:
        page = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
        got = samples(page)
        ended = sum(v for (name, _), v in got.items() if name == "voicebot_calls_total")
        if ended >= calls or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _question(text: str) -> bytes:
    piper = PiperTts(progress=False)
    return float_to_pcm(phone_band(np.concatenate(list(piper.synthesize(text))), piper.native_rate))


def test_a_call_through_remote_engines_only_is_heard_and_answered(
    servers: dict[str, str], tmp_path: Path
) -> None:
    question = _question("What are your opening hours on Saturday?")
    http = free_port()
    env = {**_remote_env(servers, tmp_path / "calls"), "VOICEBOT_HTTP_PORT": str(http)}
    with server_process("assistant", env) as (port, _):
        sim = CallerSimulator(
            "127.0.0.1", port, [question], greeting_wait=8.0, quiet=1.5, answer_timeout=20.0
        )
        report = asyncio.run(sim.run())
        metrics = metrics_after_calls(http, 1)
    assert report.ended_by == "caller"
    [turn] = report.turns
    assert turn.response_latency_ms is not None and turn.talk_over_frames == 0
    events = read_call(next(list_calls(tmp_path / "calls"))).events
    [logged] = [e for e in events if e["event"] == "turn"]
    assert "saturday" in logged["transcript"].lower(), logged
    # The example business's Saturday hours (bot/knowledge/example.md), from the server's model.
    assert "10" in logged["reply"] and "4" in logged["reply"], logged["reply"]
    # /metrics says what the call log says.
    answered = logged["marks_ms"]["first_frame_out"] / 1000
    assert metrics[("voicebot_response_seconds_count", ())] == 1
    assert metrics[("voicebot_response_seconds_sum", ())] == pytest.approx(answered)
    stt = logged["marks_ms"]["stt_done"] / 1000
    assert metrics[("voicebot_turn_stage_seconds_sum", (("stage", "stt_done"),))] == pytest.approx(
        stt
    )
    assert metrics[("voicebot_calls_total", (("reason", events[-1]["reason"]),))] == 1


def test_a_call_whose_llm_server_went_away_hears_the_apology_and_ends_cleanly(
    tmp_path: Path,
) -> None:
    question = _question("What are your opening hours on Saturday?")
    logs = tmp_path / "logs"
    logs.mkdir()
    with llama_server(logs) as llm, wyoming_whisper(logs) as stt, wyoming_piper(logs) as tts:
        env = _remote_env({"llm": llm.url, "stt": stt.url, "tts": tts.url}, tmp_path / "calls")
        with server_process("assistant", env) as (port, proc):
            llm.stop()  # after the bot warmed up on it
            sim = CallerSimulator(
                "127.0.0.1", port, [question], greeting_wait=8.0, quiet=1.5, answer_timeout=20.0
            )
            report = asyncio.run(sim.run())
            assert proc.poll() is None  # the bot goes on for the next call
    url = llm.url
    assert report.ended_by == "bot"
    events = read_call(next(list_calls(tmp_path / "calls"))).events
    [apology] = [e for e in events if e["event"] == "apology"]
    assert url in apology["error"]
    assert events[-1]["event"] == "call_end" and "LLM" in events[-1].get("error", "")


def test_doctor_checks_the_remote_engines_and_names_one_that_is_down(
    servers: dict[str, str],
) -> None:
    env = _remote_env(servers, Path("calls"))
    settings = load(None, environ=env)
    rows = {r["engine"]: r for r in models_report(settings)}
    assert rows["llm"]["status"].startswith(f"ok: {servers['llm']} serves qwen2.5-0.5b"), rows
    assert rows["stt"]["status"].startswith("ok: ") and "faster-whisper" in rows["stt"]["status"]
    assert rows["tts"]["status"].startswith("ok: ") and "voices" in rows["tts"]["status"]
    report = doctor.run(settings, say=lambda _: None)
    assert report["ok"], report
    assert report["engines"]["llm"] == f"the server at {servers['llm']}"
    assert "quick brown fox" in report["stt"]["heard"].lower()

    down = f"tcp://127.0.0.1:{free_port()}"
    settings = load(None, environ={**env, "VOICEBOT_MODELS_TTS_URL": down})
    [tts] = [r for r in models_report(settings) if r["engine"] == "tts"]
    assert tts["status"].startswith(f"unreachable: Wyoming server {down}"), tts
