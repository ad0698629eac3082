"""Wiring: which behaviour a call's profile gets, and the shared engines it needs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from .call import Call, echo
from .config import AssistantProfile, Settings
from .server import Session


def needs_engines(settings: Settings) -> bool:
    return any(isinstance(p, AssistantProfile) for p in settings.profiles.values())


async def load_assets(settings: Settings, say: Callable[[str], None]) -> object | None:
    """Loads, warms and prepares the engines (in a worker thread), if any profile needs them."""
    if not needs_engines(settings):
        return None
    from .conversation import Assets
    from .engines.stack import Engines

    def load() -> Assets:
        engines = Engines(settings.models, log=say)
        engines.warm_up()
        # Engine work of every call runs here: STT, LLM and TTS each hold their own lock.
        executor = ThreadPoolExecutor(
            max_workers=max(4, (os.cpu_count() or 2) * 2), thread_name_prefix="engine"
        )
        assets = Assets(settings, engines, executor)
        say("synthesizing greetings ...")
        assets.prepare()
        return assets

    return await asyncio.to_thread(load)


def handler(
    settings: Settings, assets: object | None = None
) -> Callable[[Session], Awaitable[None]]:
    """The server's per-connection handler for these settings."""

    async def handle(session: Session) -> None:
        name = settings.server.profile
        profile = settings.profile(name)
        if isinstance(profile, AssistantProfile):
            from .conversation import Assets, Assistant

            if not isinstance(assets, Assets):
                raise RuntimeError(f"profile {name} needs the engines, which were not loaded")

            async def behaviour(call: Call) -> None:
                await Assistant(call, assets).run()

            await Call(session, name, profile, settings, behaviour=behaviour).run()
        else:
            await Call(session, name, profile, settings, behaviour=echo).run()

    return handle
