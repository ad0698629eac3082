"""ARI mode: a Stasis application that connects each call to the bot through externalMedia.

The dialplan hands the call over with ``Stasis(voicebot,PROFILE)``. For each caller channel the
application answers, creates an externalMedia channel (``encapsulation=audiosocket``,
``transport=tcp``, ``format=slin16``, ``data=<uuid>``: Asterisk then dials the bot's AudioSocket
port and sends that UUID first), bridges the two once that channel is in the application too
(its own StasisStart, which may come after the request returned), and records UUID -> profile
in the :class:`~.directory.Directory` before the bot's socket connects. Either side hanging
up tears everything down; a transfer sends the caller back to the dialplan with ``continue``.

Why not ari-py: it imports ``urlparse`` and cannot load on any Python 3. ARI is a small REST API
plus one websocket of JSON events, so this speaks it directly with aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import uuid as uuid_mod
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from ..config import AriSettings
from .directory import Directory, Route, TransferFailed

log = logging.getLogger(__name__)

RECONNECT_DELAYS: Final = (0.5, 1.0, 2.0, 5.0)  # seconds between websocket attempts
REQUEST_TIMEOUT: Final = 5.0


class AriError(RuntimeError):
    """Asterisk answered a request with an error status."""


@dataclass
class AriCall:
    caller: str  # channel id
    uuid: str
    profile: str | None
    bridge: str = ""
    media: str = ""  # externalMedia channel id
    transferring: bool = False
    ended: bool = False
    # Set at the media channel's own StasisStart: only then can it join a bridge (before it,
    # addChannel answers 422 "Channel not in Stasis application").
    media_in_stasis: asyncio.Event = field(default_factory=asyncio.Event)


class AriApp:
    """One Stasis application; ``run()`` until cancelled (reconnects on its own)."""

    name = "ari"

    def __init__(self, settings: AriSettings, directory: Directory) -> None:
        self.settings = settings
        self.directory = directory
        self.calls: dict[str, AriCall] = {}  # by caller channel id
        self._media: dict[str, str] = {}  # externalMedia channel id -> caller channel id
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()

    # --- REST -----------------------------------------------------------------------------------

    async def request(self, method: str, path: str, **params: str) -> Any:
        assert self._http is not None, "run() opens the HTTP session"
        url = f"{self.settings.url.rstrip('/')}/ari/{path}"
        async with self._http.request(method, url, params=params) as resp:
            body = await resp.text()
            if resp.status >= 300:
                raise AriError(f"{method} /ari/{path}: HTTP {resp.status} {body.strip()[:200]}")
            return json.loads(body) if body.strip() else None

    async def _quietly(self, method: str, path: str, **params: str) -> None:
        """Teardown steps: the object may already be gone (404), which is fine."""
        try:
            await self.request(method, path, **params)
        except (AriError, aiohttp.ClientError, TimeoutError) as exc:
            log.debug("ARI teardown step: %s", exc)

    # --- the event loop -------------------------------------------------------------------------

    async def run(self) -> None:
        user = f"{self.settings.username}:{self.settings.password}".encode()
        headers = {"Authorization": "Basic " + base64.b64encode(user).decode("ascii")}
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
            self._http = http
            attempt = 0
            try:
                while True:
                    try:
                        await self._listen(http)
                        attempt = 0
                    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                        # The password is in the session's auth header, never in this message.
                        log.warning("ARI %s: %s", self.settings.url, exc)
                    self.connected.clear()
                    await asyncio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
                    attempt += 1
            finally:
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
                self._http = None

    async def _listen(self, http: aiohttp.ClientSession) -> None:
        ws_url = self.settings.url.replace("http", "ws", 1).rstrip("/") + "/ari/events"
        params = {"app": self.settings.app, "subscribeAll": "false"}
        async with http.ws_connect(ws_url, params=params, heartbeat=30) as ws:
            log.info("ARI connected: Stasis application %s", self.settings.app)
            self.connected.set()
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                try:
                    event = json.loads(msg.data)
                except json.JSONDecodeError:
                    log.warning("ARI sent a frame that is not JSON: %.80r", msg.data)
                    continue
                self._spawn(self._on_event(event))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        channel = event.get("channel") or {}
        cid = channel.get("id", "")
        try:
            if kind == "StasisStart":
                if cid in self._media:  # our own externalMedia channel entering the application
                    if self._media[cid] in self.calls:
                        self.calls[self._media[cid]].media_in_stasis.set()
                    return
                await self._start(channel, [str(a) for a in event.get("args", [])])
            elif kind in ("StasisEnd", "ChannelHangupRequest", "ChannelDestroyed"):
                if cid in self.calls:
                    await self._end(self.calls[cid], why=kind)
                elif cid in self._media and self._media[cid] in self.calls:
                    # The bot's side ended (it hung up or the socket closed): so does the call.
                    await self._end(self.calls[self._media[cid]], why="bot hung up")
            elif kind == "ChannelDtmfReceived" and cid in self.calls:
                call = self.calls[cid]
                self.directory.event(call.uuid, "asterisk_dtmf", digit=event.get("digit", ""))
        except (AriError, aiohttp.ClientError, TimeoutError) as exc:
            log.error("ARI %s on %s: %s", kind, cid, exc)
            if kind == "StasisStart" and cid in self.calls:
                await self._end(self.calls[cid], why=f"set-up failed: {exc}", hang_up=True)

    async def _start(self, channel: dict[str, Any], args: list[str]) -> None:
        cid = channel["id"]
        call_uuid = str(uuid_mod.uuid4())
        profile = args[0] if args and args[0] else None
        call = AriCall(cid, call_uuid, profile)
        self.calls[cid] = call
        self.directory.register(call_uuid, profile=profile, channel=cid, control=self)
        self.directory.event(
            call_uuid,
            "asterisk_channel",
            via="ari",
            channel=channel.get("name", cid),
            caller=(channel.get("caller") or {}).get("number", ""),
            exten=(channel.get("dialplan") or {}).get("exten", ""),
        )
        log.info("ARI call %s (%s) -> profile %s", cid, channel.get("name"), profile or "default")
        await self.request("POST", f"channels/{cid}/answer")
        bridge = await self.request("POST", "bridges", type="mixing", name=f"voicebot-{cid}")
        call.bridge = bridge["id"]
        media_id = f"voicebot-media-{call_uuid}"
        self._media[media_id] = cid
        call.media = media_id
        await self.request(
            "POST",
            "channels/externalMedia",
            channelId=media_id,
            app=self.settings.app,
            external_host=self.settings.media_host,
            encapsulation="audiosocket",
            transport="tcp",
            connection_type="client",
            format=self.settings.format,
            direction="both",
            data=call_uuid,
        )
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await call.media_in_stasis.wait()
        await self.request("POST", f"bridges/{call.bridge}/addChannel", channel=f"{cid},{media_id}")

    async def _end(self, call: AriCall, *, why: str, hang_up: bool = False) -> None:
        if call.ended:
            return
        call.ended = True
        self.directory.event(call.uuid, "asterisk_hangup", via="ari", cause=why)
        log.info("ARI call %s ended: %s", call.caller, why)
        if call.media:
            await self._quietly("DELETE", f"channels/{call.media}")
        if call.bridge:
            await self._quietly("DELETE", f"bridges/{call.bridge}")
        if (hang_up or why == "bot hung up") and not call.transferring:
            await self._quietly("DELETE", f"channels/{call.caller}")
        self.calls.pop(call.caller, None)
        self._media.pop(call.media, None)
        self.directory.forget(call.uuid)

    # --- CallControl ----------------------------------------------------------------------------

    async def transfer(self, route: Route, context: str, extension: str) -> None:
        call = self.calls.get(route.channel)
        if call is None or call.ended:
            raise TransferFailed(f"ARI does not hold channel {route.channel!r} any more")
        call.transferring = True
        try:
            await self.request(
                "POST",
                f"channels/{call.caller}/continue",
                context=context,
                extension=extension,
                priority="1",
            )
        except (AriError, aiohttp.ClientError, TimeoutError) as exc:
            call.transferring = False
            raise TransferFailed(str(exc)) from exc
        # The caller left Stasis for the dialplan; the bot's half goes away.
        with contextlib.suppress(Exception):
            await self._end(call, why=f"transferred to {extension}@{context}")
