"""The HTTP side port of ``voicebot serve`` (aiohttp): what operators and load balancers ask.

- ``/healthz``: 200 while the process runs its event loop (alive).
- ``/readyz``: 200 when the instance takes a new call (engines loaded, listening, a line free,
  not shutting down), else 503: HAProxy's ``httpchk`` then sends calls to the other instances.
- ``/metrics``: Prometheus's text format (bot/metrics.py).
- the call inspector (bot/inspector.py), unless ``[http] inspector = false``.

Loopback by default ([http] host): it says how busy the bot is, to anyone who can reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from aiohttp import web

from .app import Bot
from .calllog import EVENTS_FILE, list_calls, read_call
from .config import HttpSettings
from .inspector import Inspector
from .metrics import CONTENT_TYPE


async def listen(
    app: web.Application, host: str, port: int
) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serves ``app`` on ``host:port`` (0: a free port); the runner and the bound address.
    Raises OSError when the port is taken."""
    sock = socket.create_server((host, port))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    bound_host, bound_port = sock.getsockname()[:2]
    return runner, (bound_host, bound_port)


class SidePort:
    def __init__(self, bot: Bot, settings: HttpSettings) -> None:
        self.bot = bot
        self.settings = settings
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        if settings.inspector:
            root = Path(bot.settings.calls.dir)
            inspector = Inspector(root, bot.live_states, host=settings.host, token=settings.token)
            inspector.add_routes(app)
        self._app = app
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        """Listens (raises OSError when the port is taken)."""
        self._runner, self.address = await listen(self._app, self.settings.host, self.settings.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        bot = self.bot
        state = {
            "ready": bot.ready,
            "calls": len(bot.live),
            "max_calls": bot.settings.limits.max_calls,
            "closing": bot.closing,
        }
        return web.Response(
            text=json.dumps(state) + "\n",
            status=200 if bot.ready else 503,
            content_type="application/json",
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        body = self.bot.metrics.exposition()
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE
        return response


QUIET_S: Final = 60.0  # a call whose log has not grown this long, and has no end, is not live


def folder_live(root: Path) -> Callable[[], dict[str, str]]:
    """Live calls as a folder of logs shows them, with no bot to ask: no ``call_end`` yet and
    a log written to lately ("in progress"; a crashed call's log goes quiet)."""

    def live() -> dict[str, str]:
        now = time.time()
        found = {}
        for folder in itertools.islice(list_calls(root), 50):
            events = folder / EVENTS_FILE
            with contextlib.suppress(OSError):
                if now - events.stat().st_mtime < QUIET_S and read_call(folder).end is None:
                    found[folder.name] = "in progress"
        return found

    return live


async def serve_folder(root: Path, host: str, port: int, token: str = "") -> None:
    """``voicebot calls web``: the call inspector on ``root`` until cancelled."""
    app = web.Application()
    Inspector(root, folder_live(root), host=host, token=token).add_routes(app)
    runner, bound = await listen(app, host, port)
    print(f"call inspector for {root}/ on http://{bound[0]}:{bound[1]}/", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
