"""AMI (Asterisk Manager Interface) through panoramisk: call events, transfers, originate.

The dialplan tags each channel before it connects to the bot::

    same => n,Set(VOICEBOT_UUID=${UUID()})
    same => n,Set(VOICEBOT_PROFILE=assistant)
    same => n,AudioSocket(${VOICEBOT_UUID},bot:9092)

Asterisk reports each ``Set()`` as a ``VarSet`` event naming the channel, so the bot learns
UUID -> channel and profile. ``Hangup`` and ``DTMFEnd`` events of a tagged channel go into that
call's log; a transfer is an AMI ``Redirect`` of the channel; ``voicebot originate`` sends an
``Originate`` that makes Asterisk call a number and connect it to a bot profile.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from panoramisk import Manager

from ..config import AmiSettings
from .directory import Directory, Route, TransferFailed

log = logging.getLogger(__name__)

UUID_VAR: Final = "VOICEBOT_UUID"
PROFILE_VAR: Final = "VOICEBOT_PROFILE"
LOGIN_TIMEOUT: Final = 5.0
ACTION_TIMEOUT: Final = 10.0


class AmiError(RuntimeError):
    """The manager interface refused a login or an action."""


def _ok(response: Any) -> bool:
    return str(response.get("Response", "")).lower() == "success"


class AmiLink:
    """One manager connection (panoramisk reconnects it on its own)."""

    name = "ami"

    def __init__(self, settings: AmiSettings, directory: Directory | None = None) -> None:
        self.settings = settings
        self.directory = directory
        self.channels: dict[str, str] = {}  # channel name -> call UUID
        self.manager = Manager(
            host=settings.host,
            port=settings.port,
            username=settings.username,
            secret=settings.secret,
            ping_delay=10,
            reconnect_timeout=2,
            log=logging.getLogger("bot.asterisk.ami.panoramisk"),
        )
        self.manager.register_event("VarSet", self._on_varset)
        self.manager.register_event("Hangup", self._on_hangup)
        self.manager.register_event("DTMFEnd", self._on_dtmf)

    async def connect(self) -> None:
        """Connects and logs in; raises AmiError (wrong secret, nobody listening)."""
        self.manager.loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(LOGIN_TIMEOUT):
                await self.manager.connect()
                while self.manager.authenticated_future is not None:
                    await asyncio.shield(self.manager.authenticated_future)
        except (OSError, TimeoutError) as exc:
            raise AmiError(
                f"cannot reach AMI at {self.settings.host}:{self.settings.port}: {exc}"
            ) from exc
        if not self.manager.authenticated:
            # Never echo the secret: name the user only.
            raise AmiError(f"AMI login as {self.settings.username!r} refused")
        log.info("AMI connected to %s:%d", self.settings.host, self.settings.port)

    def close(self) -> None:
        self.manager.close()

    async def action(self, action: dict[str, str], within: float = ACTION_TIMEOUT) -> Any:
        """The response (an async Originate: its final OriginateResponse event)."""
        try:
            async with asyncio.timeout(within):
                response = await self.manager.send_action(action)
        except TimeoutError as exc:
            raise AmiError(f"AMI {action['Action']}: no response") from exc
        if isinstance(response, list):
            response = response[-1]
        if not _ok(response):
            message = response.get("Message", "") if hasattr(response, "get") else ""
            raise AmiError(f"AMI {action['Action']}: {message or 'refused'}")
        return response

    # --- events ---------------------------------------------------------------------------------

    def _on_varset(self, _manager: Any, event: Any) -> None:
        variable = event.get("Variable", "")
        channel = event.get("Channel", "")
        value = event.get("Value", "")
        if self.directory is None or not channel:
            return
        if variable == UUID_VAR and value:
            self.channels[channel] = value
            self.directory.register(value, channel=channel, control=self)
            self.directory.event(value, "asterisk_channel", via="ami", channel=channel)
        elif variable == PROFILE_VAR and channel in self.channels:
            self.directory.register(self.channels[channel], profile=value)

    def _on_hangup(self, _manager: Any, event: Any) -> None:
        channel = event.get("Channel", "")
        call_uuid = self.channels.pop(channel, None)
        if call_uuid is None or self.directory is None:
            return
        self.directory.event(
            call_uuid,
            "asterisk_hangup",
            via="ami",
            channel=channel,
            cause=event.get("Cause", ""),
            cause_text=event.get("Cause-txt", ""),
        )
        self.directory.forget_unless_live(call_uuid)

    def _on_dtmf(self, _manager: Any, event: Any) -> None:
        call_uuid = self.channels.get(event.get("Channel", ""))
        if call_uuid is not None and self.directory is not None:
            self.directory.event(
                call_uuid, "asterisk_dtmf", digit=event.get("Digit", ""), via="ami"
            )

    # --- actions --------------------------------------------------------------------------------

    async def transfer(self, route: Route, context: str, extension: str) -> None:
        if not route.channel:
            raise TransferFailed("AMI has not seen this call's channel")
        try:
            await self.action(
                {
                    "Action": "Redirect",
                    "Channel": route.channel,
                    "Context": context,
                    "Exten": extension,
                    "Priority": "1",
                }
            )
        except AmiError as exc:
            raise TransferFailed(str(exc)) from exc

    async def originate(
        self,
        endpoint: str,
        *,
        context: str,
        extension: str,
        caller_id: str = "Voicebot",
        timeout_s: int = 30,
    ) -> str:
        """Makes Asterisk call ``endpoint`` (``PJSIP/16``) and send the answered call to
        ``extension@context``. Returns once the phone answered (Asterisk's OriginateResponse);
        raises AmiError if it did not within ``timeout_s``."""
        response = await self.action(
            {
                "Action": "Originate",
                "Channel": endpoint,
                "Context": context,
                "Exten": extension,
                "Priority": "1",
                "CallerID": caller_id,
                "Timeout": str(timeout_s * 1000),
                "Async": "true",
            },
            within=timeout_s + ACTION_TIMEOUT,
        )
        return f"answered ({response.get('Channel', endpoint)})"
