"""Running a blocking generator (an engine's stream) in a worker thread, consumed from asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


async def iterate_in_thread(
    executor: ThreadPoolExecutor, make: Callable[[], Iterator[T]]
) -> AsyncGenerator[T, None]:
    """Yields the items of a blocking generator run in ``executor``.

    Consume it inside ``contextlib.aclosing()``: an async generator left by an exception in the
    loop body is only closed later by the event loop, and until then the worker runs on.
    Closing it (or cancelling the consumer) stops the worker after its current item.
    """
    loop = asyncio.get_running_loop()
    # Unbounded on purpose: the worker is a thread and must never wait on the loop (a blocked
    # worker would hold its engine); the source bounds it (an LLM reply ends at max_tokens, a
    # TTS stream with its clause).
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def post(kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def run() -> None:
        try:
            for item in make():
                if stop.is_set():
                    break
                post("item", item)
        except BaseException as exc:  # handed to the awaiting side, which re-raises it
            post("error", exc)
        else:
            post("done", None)

    future = loop.run_in_executor(executor, run)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        # The worker stops after its current item. Not waited for: a hang-up must not wait on
        # an engine in the middle of a step (the engine's own lock keeps the next user out).
        stop.set()
        future.add_done_callback(lambda f: f.exception())
