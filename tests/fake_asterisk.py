"""Local stand-ins for Asterisk's ARI (REST + websocket events) and AMI (TCP, line protocol).

They speak the documented wire formats and record what the bot asked for; ARI's externalMedia
also does what Asterisk does with ``encapsulation=audiosocket``: it dials the bot's AudioSocket
port and sends the ``data`` UUID first (through the project's Asterisk-faithful simulator), and
the new channel enters the Stasis application a little after the request returned (its own
StasisStart), so adding it to a bridge before that gets Asterisk's 422.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid as uuid_mod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from bot.tools.simulator import CallerSimulator


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]


class FakeAri:
    def __init__(
        self,
        username: str,
        password: str,
        *,
        media_seconds: float = 1.0,
        media_enters_stasis_after: float = 0.2,
    ) -> None:
        self.auth = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.requests: list[Request] = []
        self.sockets: list[web.WebSocketResponse] = []
        self.connected = asyncio.Event()
        self.media_seconds = media_seconds
        self.media_enters_stasis_after = media_enters_stasis_after
        self.in_stasis: set[str] = set()  # channel ids in the application
        self.media_calls: list[CallerSimulator] = []
        self.media_done = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.app = web.Application(middlewares=[self._check_auth])
        self.app.router.add_get("/ari/events", self._events)
        self.app.router.add_route("*", "/ari/{path:.*}", self._rest)
        self.url = ""

    @web.middleware
    async def _check_auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != self.auth:
            return web.json_response({"message": "Authentication required"}, status=401)
        return await handler(request)

    async def _events(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.requests.append(Request("WS", "events", dict(request.query)))
        self.sockets.append(ws)
        self.connected.set()
        async for msg in ws:
            if msg.type is WSMsgType.CLOSE:
                break
        return ws

    async def _rest(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        params = dict(request.query)
        self.requests.append(Request(request.method, path, params))
        if request.method == "POST" and path == "bridges":
            return web.json_response({"id": f"bridge-{len(self.requests)}", "technology": "x"})
        if request.method == "POST" and path == "channels/externalMedia":
            for job in (self._dial_bot(params), self._enter_stasis(params["channelId"])):
                self._tasks.add(asyncio.create_task(job))
            return web.json_response({"id": params["channelId"], "name": "AudioSocket/x"})
        in_stasis = set(params.get("channel", "").split(",")) <= self.in_stasis
        if request.method == "POST" and path.endswith("/addChannel") and not in_stasis:
            return web.json_response({"message": "Channel not in Stasis application"}, status=422)
        if request.method == "DELETE":
            return web.Response(status=204)
        return web.Response(status=204)

    async def _dial_bot(self, params: dict[str, str]) -> None:
        host, port = params["external_host"].rsplit(":", 1)
        rate = 16000 if params["format"] == "slin16" else 8000
        sim = CallerSimulator(
            host,
            int(port),
            [],
            rate=rate,
            call_uuid=uuid_mod.UUID(params["data"]),
            duration=self.media_seconds,
        )
        self.media_calls.append(sim)
        await sim.run()
        self.media_done.set()

    async def _enter_stasis(self, channel_id: str) -> None:
        await asyncio.sleep(self.media_enters_stasis_after)  # Asterisk's own set-up time
        event = stasis_start(channel_id)
        event["channel"]["name"] = f"AudioSocket/{channel_id}"
        await self.push(event)

    async def push(self, event: dict[str, Any]) -> None:
        channel_id = event.get("channel", {}).get("id", "")
        if event["type"] == "StasisStart":
            self.in_stasis.add(channel_id)
        elif event["type"] == "StasisEnd":
            self.in_stasis.discard(channel_id)
        for ws in self.sockets:
            await ws.send_str(json.dumps(event))

    def calls(self, method: str | None = None) -> list[Request]:
        return [r for r in self.requests if method is None or r.method == method]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeAri]:
        runner = web.AppRunner(self.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await runner.cleanup()


def stasis_start(channel_id: str, *args: str) -> dict[str, Any]:
    return {
        "type": "StasisStart",
        "application": "voicebot",
        "args": list(args),
        "channel": {
            "id": channel_id,
            "name": f"PJSIP/16-{channel_id}",
            "state": "Ring",
            "caller": {"name": "Softphone", "number": "16"},
            "dialplan": {"context": "from-phones", "exten": "Llama1ari", "priority": 2},
        },
    }


def channel_event(kind: str, channel_id: str) -> dict[str, Any]:
    return {"type": kind, "application": "voicebot", "channel": {"id": channel_id}}


# --- AMI ----------------------------------------------------------------------------------------


@dataclass
class FakeAmi:
    """Asterisk's manager interface: banner, Login, actions answered, events pushed."""

    username: str
    secret: str
    actions: list[dict[str, str]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    logged_in: asyncio.Event = field(default_factory=asyncio.Event)
    refuse: set[str] = field(default_factory=set)  # actions answered with an error
    originate_result: str = "Success"  # or Failure: nobody answered
    port: int = 0

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"Asterisk Call Manager/9.0.0\r\n")
        await writer.drain()
        self.writers.append(writer)
        buf = b""
        try:
            while data := await reader.read(4096):
                buf += data
                while b"\r\n\r\n" in buf:
                    raw, buf = buf.split(b"\r\n\r\n", 1)
                    action = dict(
                        line.split(": ", 1) for line in raw.decode().split("\r\n") if ": " in line
                    )
                    self.actions.append(action)
                    writer.write(self._answer(action))
                    if action.get("Action", "").lower() == "originate":
                        # The phone answers: Asterisk's final word on an async Originate.
                        writer.write(
                            (
                                "Event: OriginateResponse\r\n"
                                f"ActionID: {action.get('ActionID', '')}\r\n"
                                f"Response: {self.originate_result}\r\n"
                                f"Channel: {action['Channel']}-00000001\r\n"
                                "Reason: 4\r\n\r\n"
                            ).encode()
                        )
                    await writer.drain()
        finally:
            writer.close()

    def _answer(self, action: dict[str, str]) -> bytes:
        name = action.get("Action", "").lower()
        ok = True
        message = "Success"
        if name == "login":
            ok = action.get("Username") == self.username and action.get("Secret") == self.secret
            message = "Authentication accepted" if ok else "Authentication failed"
            if ok:
                self.logged_in.set()
        elif name == "originate":
            message = "Originate successfully queued"
        elif name == "redirect":
            message = "Redirect successful"
        if name in self.refuse:
            ok, message = False, "Channel not found"
        lines = [f"Response: {'Success' if ok else 'Error'}"]
        if "ActionID" in action:
            lines.append(f"ActionID: {action['ActionID']}")
        lines.append(f"Message: {message}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def push(self, **event: str) -> None:
        payload = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in event.items()) + "\r\n"
        for writer in self.writers:
            writer.write(payload.encode())
            await writer.drain()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeAmi]:
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            for writer in self.writers:
                writer.close()
            server.close()
            await server.wait_closed()
