"""Wiring: which behaviour a call's profile gets, the shared engines, the Asterisk links.

:class:`Bot` is the whole server process: one AudioSocket listener for ``[server] port`` (profile
``server.profile``) and one more for each profile that sets its own ``port``; the engines shared
by every call; the optional ARI and AMI links; the concurrent-call limit; a graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .asterisk.directory import Directory, Route
from .asterisk.server import AudioSocketServer, Session, Timeouts
from .call import Call, CallState, echo
from .calllog import Observer, list_calls, prune
from .config import AssistantProfile, Settings
from .metrics import Metrics
from .recording import RECORDING_FILE, repair

if TYPE_CHECKING:
    from .conversation.assets import Assets

log = logging.getLogger(__name__)

# How long a new call waits for ARI/AMI to say which profile it is for (their events race the
# AudioSocket connection; ARI registers the UUID before Asterisk even dials the bot).
ROUTE_WAIT: Final = 0.3


def needs_engines(settings: Settings) -> bool:
    """A call may get an assistant profile: the port's profile, a profile's own port, or
    (with ARI or AMI, whose dialplan may name any profile) any profile."""
    profiles = settings.profiles
    if settings.ari.enabled or settings.ami.enabled:
        reachable = list(profiles.values())
    else:
        reachable = [profiles[settings.server.profile]]
        reachable += [p for p in profiles.values() if p.port]
    return any(isinstance(p, AssistantProfile) for p in reachable)


async def load_assets(settings: Settings, say: Callable[[str], None]) -> Assets | None:
    """Loads, warms and prepares the engines (in a worker thread), if any profile needs them."""
    if not needs_engines(settings):
        return None
    from .conversation.assets import Assets
    from .engines import Activity
    from .engines.stack import Engines

    def load() -> Assets:
        activity = Activity()  # what the engines are doing: every engine and call sees it
        engines = Engines(settings.models, log=say, activity=activity)
        engines.warm_up()
        # Engine work of every call runs here: a call may have an STT run, a reply streaming
        # from the LLM and a clause in the TTS at once, each waiting for its engine in turn
        # (a thread short, one call's work would wait behind another's in the pool's queue).
        executor = ThreadPoolExecutor(
            max_workers=3 * settings.limits.max_calls + 2, thread_name_prefix="engine"
        )
        assets = Assets(settings, engines, executor, activity, load_llm=engines.load_llm)
        say("loading per-profile voices and models, synthesizing prompts ...")
        assets.prepare()
        return assets

    return await asyncio.to_thread(load)


BUSY: Final = "all lines busy"


def _busy(assets: Assets | None) -> Callable[[Call], Awaitable[None]]:
    async def busy(call: Call) -> None:
        """The call over the limit: a short prompt (synthesized at start-up), then hang up."""
        call.state = CallState.BUSY
        call.calllog.event("busy", max_calls=call.settings.limits.max_calls)
        prompt = assets.prompt("busy", call.rate) if assets is not None else b""
        if prompt:
            await call.play(prompt)
            await call.drain()
        call.hangup(BUSY)

    return busy


def _assistant(name: str, assets: Assets | None) -> Callable[[Call], Awaitable[None]]:
    from .conversation.assistant import Assistant

    if assets is None:
        raise RuntimeError(f"profile {name} needs the engines, which were not loaded")

    async def behaviour(call: Call) -> None:
        await Assistant(call, assets).run()

    return behaviour


def _profile_name(
    settings: Settings, route: Route | None, port_profile: str, session: Session
) -> str:
    """The profile Asterisk asked for (ARI/AMI), if defined; else the port's."""
    if route is not None and route.profile:
        if route.profile in settings.profiles:
            return route.profile
        session.log.warning(
            "Asterisk asked for profile %r, which is not defined; using %s",
            route.profile,
            port_profile,
        )
    return port_profile


def handler(
    settings: Settings,
    assets: Assets | None = None,
    *,
    profile: str | None = None,
    directory: Directory | None = None,
    observer: Observer | None = None,
    live: dict[str, Call] | None = None,
) -> Callable[[Session], Awaitable[None]]:
    """The per-connection handler for one listener (whose profile is ``profile``);
    ``observer`` sees every call's log events (the metrics); ``live`` holds the calls served
    now, by their log folder's name (the line limit, the inspector), shared by listeners."""
    port_profile = profile or settings.server.profile
    live = {} if live is None else live

    async def handle(session: Session) -> None:
        uuid = str(session.uuid)
        route = None
        if directory is not None:
            wait = ROUTE_WAIT if settings.ari.enabled or settings.ami.enabled else 0.0
            route = await directory.lookup(uuid, wait)
        name = _profile_name(settings, route, port_profile, session)
        chosen = settings.profile(name)
        if len(live) >= settings.limits.max_calls:
            session.log.warning("all %d lines busy: refusing the call", settings.limits.max_calls)
            busy = Call(session, name, chosen, settings, behaviour=_busy(assets), observer=observer)
            await busy.run()
            return
        call: Call | None = None
        try:
            behaviour = _assistant(name, assets) if isinstance(chosen, AssistantProfile) else echo
            call = Call(
                session,
                name,
                chosen,
                settings,
                behaviour=behaviour,
                directory=directory,
                observer=observer,
            )
            live[call.calllog.folder.name] = call
            await call.run()
        finally:
            if call is not None:
                live.pop(call.calllog.folder.name, None)
            if directory is not None:
                directory.forget(uuid)

    return handle


TIDY_EVERY_S: Final = 3600.0
QUIET_RECORDING_S: Final = 60.0  # a recording untouched this long is no live call's


def tidy_calls(settings: Settings) -> None:
    """The calls folder at start-up and hourly: recordings cut off by a crash get a header
    that matches their length, and call folders older than ``[calls] keep_days`` go."""
    root = Path(settings.calls.dir)
    now = time.time()
    for folder in list_calls(root):
        wav = folder / RECORDING_FILE
        with contextlib.suppress(OSError):
            if wav.is_file() and now - wav.stat().st_mtime > QUIET_RECORDING_S and repair(wav):
                log.warning("repaired the recording of a call cut off: %s", wav)
    for folder in prune(root, settings.calls.keep_days):
        log.info("removed call %s (older than %d days)", folder.name, settings.calls.keep_days)


class Bot:
    """The server process: listeners, engines, Asterisk links."""

    def __init__(self, settings: Settings, assets: Assets | None = None) -> None:
        self.settings = settings
        self.assets = assets
        self.directory = Directory()
        self.servers: dict[str, AudioSocketServer] = {}
        self.links: list[Any] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self.live: dict[str, Call] = {}  # the calls served now, by log folder name
        self.metrics = Metrics(lambda: self.calls_in_progress)
        self.closing = False  # shutting down: no new calls

    def live_states(self) -> dict[str, str]:
        """The calls in progress and what each is doing (log folder name -> state)."""
        return {name: str(call.state) for name, call in list(self.live.items())}

    @property
    def ready(self) -> bool:
        """Takes a new call now: listening, not shutting down, a line free (what a load
        balancer's health check asks: a full instance is skipped, not sent a call to refuse)."""
        return (
            bool(self.servers)
            and not self.closing
            and len(self.live) < self.settings.limits.max_calls
        )

    def listeners(self) -> list[tuple[str, int]]:
        """(profile, port) for every AudioSocket listener."""
        s = self.settings
        found = [(s.server.profile, s.server.port)]
        found += [(name, p.port) for name, p in s.profiles.items() if p.port]
        return found

    async def start(self) -> None:
        s = self.settings
        await asyncio.to_thread(tidy_calls, s)
        self._tasks.append(asyncio.create_task(self._tidy_hourly(), name="tidy-calls"))
        timeouts = Timeouts.from_settings(s.server)
        for profile, port in self.listeners():
            server = AudioSocketServer(
                handler(
                    s,
                    self.assets,
                    profile=profile,
                    directory=self.directory,
                    observer=self.metrics.observe,
                    live=self.live,
                ),
                host=s.server.host,
                port=port,
                timeouts=timeouts,
            )
            await server.start()
            self.servers[profile if profile not in self.servers else f"{profile}:{port}"] = server
            self._tasks.append(asyncio.create_task(server.serve_forever(), name=f"serve-{port}"))
        if s.ami.enabled:
            from .asterisk.ami import AmiLink

            ami = AmiLink(s.ami, self.directory)
            await ami.connect()
            self.links.append(ami)
        if s.ari.enabled:
            from .asterisk.ari import AriApp

            ari = AriApp(s.ari, self.directory)
            self.links.append(ari)
            self._tasks.append(asyncio.create_task(ari.run(), name="ari"))

    async def _tidy_hourly(self) -> None:
        while True:
            await asyncio.sleep(TIDY_EVERY_S)
            await asyncio.to_thread(tidy_calls, self.settings)

    def stats(self) -> dict[str, Any]:
        """Process health: what a soak test watches for growth (SIGUSR1 writes it out)."""
        fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1
        rss_kb = -1
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kb = int(line.split()[1])
        return {
            "calls_in_progress": self.calls_in_progress,
            "calls_total": sum(s.connections - s.rejected for s in self.servers.values()),
            "tasks": len(asyncio.all_tasks()),
            "threads": threading.active_count(),
            "fds": fds,
            "rss_mb": round(rss_kb / 1024, 1),
        }

    @property
    def calls_in_progress(self) -> int:
        return sum(len(server.sessions) for server in self.servers.values())

    def end_calls(self) -> None:
        for server in self.servers.values():
            server.end_calls()

    async def close(self, grace: float = 0.0) -> None:
        """Stops accepting calls; calls in progress get ``grace`` seconds, then are ended."""
        self.closing = True
        await asyncio.gather(*(server.close(grace) for server in self.servers.values()))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for link in self.links:
            if hasattr(link, "close"):
                link.close()
        if self.assets is not None:
            self.assets.executor.shutdown(wait=False, cancel_futures=True)
