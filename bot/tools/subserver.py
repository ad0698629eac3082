"""`voicebot serve` in a child process, so benchmarks measure it from outside like Asterisk."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import IO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def server_process(
    profile: str,
    env: dict[str, str] | None = None,
    *,
    port: int = 0,
    stderr: IO[str] | None = None,
) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Starts the server with ``profile`` on ``port`` (0: a free one), waits until it says
    ready, yields its port and process; then stops it with SIGTERM as an operator would.
    Its console (stderr) goes to ``stderr``, or nowhere."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--port", str(port), "--profile", profile],
        stdout=subprocess.PIPE,
        stderr=stderr or subprocess.DEVNULL,
        text=True,
        # The HTTP side port on a free port too, unless ``env`` names one.
        env={**os.environ, "VOICEBOT_HTTP_PORT": "0", **(env or {})},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the ready line comes once every engine is warm
        if "ready" not in line:
            raise RuntimeError(f"the server did not start: {line.strip() or 'no output'}")
        yield port, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serving(profile: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """:func:`server_process`, for callers that need only the port."""
    with server_process(profile, env) as (port, _proc):
        yield port
