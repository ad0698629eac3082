"""Real inference servers for the remote engines' tests, started on the offline models.

- llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``, extra ``server``)
- ``wyoming-faster-whisper`` and ``wyoming-piper`` (Home Assistant's Wyoming speech servers)

Each runs in its own process on a free loopback port and is ready once it answers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bot.engines.models import resolve
from bot.engines.wyoming import WyomingOptions, describe
from bot.tools.subserver import free_port

START_TIMEOUT_S = 120.0


def llm_model_path() -> Path:
    path = resolve("qwen2.5-0.5b", "llm").path
    assert path is not None
    return path


def whisper_model_dir() -> Path:
    path = resolve("whisper-tiny.en", "stt").path
    assert path is not None
    return path


def piper_voice_dir() -> Path:
    path = resolve("piper-joe-medium", "tts-piper").path
    assert path is not None
    return path.parent  # holds en_US-joe-medium.onnx and its .onnx.json


@dataclass
class ModelServer:
    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """SIGTERM, as an operator stops it; waits for it to go."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def _process(
    url: str, args: list[str], ready: Callable[[], bool], log: Path
) -> Iterator[ModelServer]:
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    server = ModelServer(url, proc)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args[1]} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)  # polling a server's readiness, not synchronising with it
        yield server
    finally:
        server.stop()


def _answers_http(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _answers_wyoming(url: str) -> bool:
    try:
        describe(WyomingOptions(url, connect_timeout_s=1.0, read_timeout_s=5.0))
    except Exception:
        return False
    return True


@contextlib.contextmanager
def llama_server(log_dir: Path) -> Iterator[ModelServer]:
    """The OpenAI-compatible API; its URL is the API's base (http://127.0.0.1:PORT/v1)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    args = [
        "-m", "llama_cpp.server",
        "--model", str(llm_model_path()),
        "--model_alias", "qwen2.5-0.5b",
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--n_threads", "2",
    ]  # fmt: skip
    ready = lambda: _answers_http(f"{base}/models")  # noqa: E731
    with _process(base, args, ready, log_dir / "llama-server.log") as server:
        yield server


@contextlib.contextmanager
def wyoming_whisper(log_dir: Path) -> Iterator[ModelServer]:
    """A Wyoming STT server (tcp://127.0.0.1:PORT) on Whisper tiny.en."""
    url = f"tcp://127.0.0.1:{free_port()}"
    data = log_dir / "whisper-data"
    data.mkdir(exist_ok=True)
    args = [
        "-m", "wyoming_faster_whisper",
        "--model", str(whisper_model_dir()), "--data-dir", str(data),
        "--uri", url, "--language", "en", "--beam-size", "1", "--cpu-threads", "1",
    ]  # fmt: skip
    with _process(url, args, lambda: _answers_wyoming(url), log_dir / "wyoming-whisper.log") as s:
        yield s


@contextlib.contextmanager
def wyoming_piper(log_dir: Path) -> Iterator[ModelServer]:
    """A Wyoming TTS server (tcp://127.0.0.1:PORT) on Piper's joe voice."""
    url = f"tcp://127.0.0.1:{free_port()}"
    args = [
        "-m", "wyoming_piper",
        "--voice", "en_US-joe-medium", "--data-dir", str(piper_voice_dir()), "--uri", url,
    ]  # fmt: skip
    with _process(url, args, lambda: _answers_wyoming(url), log_dir / "wyoming-piper.log") as s:
        yield s
