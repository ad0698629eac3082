"""What the bot knows about a call beyond its AudioSocket stream.

AudioSocket carries only a UUID. Which profile a call is for, which Asterisk channel it is, and
how to move it elsewhere come from other paths, all keyed by that UUID:

- the port the call arrived on (``[profiles.NAME] port``): no Asterisk link needed;
- ARI (:mod:`.ari`): the Stasis application creates the externalMedia channel itself and knows
  the dialled profile from ``Stasis(voicebot,PROFILE)`` before the bot's socket connects;
- AMI (:mod:`.ami`): the dialplan sets ``VOICEBOT_UUID`` and ``VOICEBOT_PROFILE`` on the
  channel before ``AudioSocket()``; the ``VarSet`` events arrive on the manager connection.

The two Asterisk links race the AudioSocket connection, so a call waits a moment for its route.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

log = logging.getLogger(__name__)

EARLY_EVENTS: Final = 32  # events kept for a call whose log is not open yet


class TransferFailed(RuntimeError):
    """Asterisk refused to move the call, or no link to Asterisk can move it."""


class CallControl(Protocol):
    """A link to Asterisk that can act on one call's channel."""

    name: str

    async def transfer(self, route: Route, context: str, extension: str) -> None:
        """Moves the caller's channel to ``extension@context`` (raises TransferFailed)."""


@dataclass
class Route:
    uuid: str
    profile: str | None = None  # asked for by Asterisk; None: the port's profile
    channel: str = ""  # the caller's channel: ARI id or AMI name
    control: CallControl | None = None
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    sink: Callable[[str, dict[str, Any]], None] | None = None


class Directory:
    """UUID -> :class:`Route`, filled by the Asterisk links, read by each call."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._routes)

    def register(self, uuid: str, **info: Any) -> Route:
        """Adds what one link learned about a call (profile, channel, control)."""
        route = self._routes.setdefault(uuid.lower(), Route(uuid.lower()))
        for key, value in info.items():
            if value is not None and value != "":
                setattr(route, key, value)
        self._changed.set()
        self._changed = asyncio.Event()
        return route

    def get(self, uuid: str) -> Route | None:
        return self._routes.get(uuid.lower())

    async def lookup(self, uuid: str, wait: float) -> Route | None:
        """The call's route once it names a profile, waiting up to ``wait`` seconds for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            route = self.get(uuid)
            if route is not None and route.profile is not None:
                return route
            left = deadline - loop.time()
            if left <= 0:
                return route
            changed = self._changed
            try:
                async with asyncio.timeout(left):
                    await changed.wait()
            except TimeoutError:
                return self.get(uuid)

    def event(self, uuid: str, name: str, **fields: Any) -> None:
        """An Asterisk event for the call's log (kept until the call's log is open)."""
        route = self.get(uuid)
        if route is None:
            route = self.register(uuid)
        if route.sink is not None:
            route.sink(name, fields)
        elif len(route.events) < EARLY_EVENTS:
            route.events.append((name, fields))

    def attach(self, uuid: str, sink: Callable[[str, dict[str, Any]], None]) -> Route:
        """The call's log opened: early events go in now, later ones as they come."""
        route = self.get(uuid) or self.register(uuid)
        route.sink = sink
        for name, fields in route.events:
            sink(name, fields)
        route.events.clear()
        return route

    def forget(self, uuid: str) -> None:
        self._routes.pop(uuid.lower(), None)

    def forget_unless_live(self, uuid: str) -> None:
        """After Asterisk's last word on a call: drop its route unless the call is still going
        (its log is open), so events for calls that already ended leave nothing behind."""
        route = self.get(uuid)
        if route is not None and route.sink is None:
            self.forget(uuid)
