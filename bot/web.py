"""The HTTP side port of ``voicebot serve`` (aiohttp): what operators and load balancers ask.

- ``/healthz``: 200 while the process runs its event loop (alive).
- ``/readyz``: 200 when the instance takes a new call (engines loaded, listening, a line free,
  not shutting down), else 503: HAProxy's ``httpchk`` then sends calls to the other instances.
- ``/metrics``: Prometheus's text format (bot/metrics.py).

Loopback by default ([http] host): it says how busy the bot is, to anyone who can reach it.
"""

from __future__ import annotations

import json
import socket

from aiohttp import web

from .app import Bot
from .config import HttpSettings
from .metrics import CONTENT_TYPE


class SidePort:
    def __init__(self, bot: Bot, settings: HttpSettings) -> None:
        self.bot = bot
        self.settings = settings
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        """Listens (raises OSError when the port is taken)."""
        sock = socket.create_server((self.settings.host, self.settings.port))
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        host, port = sock.getsockname()[:2]
        self.address = (host, port)

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        bot = self.bot
        state = {
            "ready": bot.ready,
            "calls": len(bot.active),
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
