"""Whole calls on virtual time: an event loop whose clock jumps, an in-memory line, engines inline.

- :class:`VirtualLoop` is asyncio's own loop with its own clock: whenever nothing is ready to
  run, its time jumps to the next timer at once. Every time on the call path is this loop's
  (``bot.clock``), so the caller simulator's pacing, the call's frame times, the turn detector,
  the reply's marks and the playout schedule all run on one virtual clock, exactly and fast.
- :func:`memory_line` is a TCP connection without sockets: what one end writes the other end
  reads on the loop's next turn.
- :class:`InlineExecutor` runs engine work on the loop's thread at once, so an engine double
  takes no time unless it says so (``spend``): no thread runs beside the clock.

A call that waits for something nothing will ever do (no timer, nothing ready) is a deadlock,
and the loop says so instead of hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import selectors
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
START = 1000.0  # the virtual clock's reading when a loop starts (any positive time will do)


class _JumpingSelector(selectors.DefaultSelector):
    """Never waits: with nothing ready, the loop's clock jumps by the timeout instead."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("deadlock: nothing is scheduled and nothing can wake the loop")
        assert self.loop is not None
        self.loop.jump(timeout)
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = START

    def time(self) -> float:
        return self._now

    def jump(self, seconds: float) -> None:
        self._now += seconds


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run`` on a :class:`VirtualLoop`."""
    with asyncio.Runner(loop_factory=VirtualLoop) as runner:
        return runner.run(main())


class InlineExecutor(concurrent.futures.Executor):
    """Runs each job at once on the loop's thread. A job takes no time unless what it runs
    says so (:meth:`spend`, from an engine double): what it hands the loop after that (a
    stream's items) arrives that much later, and so does its result."""

    def __init__(self) -> None:
        self._spent = 0.0
        self._until: asyncio.Event | None = None
        self._waiting: set[asyncio.Task[None]] = set()

    def spend(self, seconds: float) -> None:
        """The running job takes ``seconds`` more of virtual time from here on."""
        self._spent += seconds

    def spend_until(self, event: asyncio.Event) -> None:
        """The running job goes on only once ``event`` is set (an engine held by a test)."""
        self._until = event

    def _after(self, when: float, callback: Callable[..., object], *args: Any) -> None:
        """``callback`` at virtual time ``when``, or once the job's event is set."""
        loop = asyncio.get_running_loop()
        event = self._until
        if event is None:
            loop.call_at(when, callback, *args)
            return

        async def deliver() -> None:
            await event.wait()
            callback(*args)

        task = loop.create_task(deliver())
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        loop = asyncio.get_running_loop()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._spent, self._until, posted = 0.0, None, itertools.count(1)

        def post(callback: Callable[..., object], *args: Any, context: Any = None) -> None:
            # A stream's items, in order, each when the work before it is done.
            self._after(loop.time() + self._spent + next(posted) * 1e-9, callback, *args)

        loop.call_soon_threadsafe = post  # type: ignore[method-assign]
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # the awaiting side raises it
            self._after(loop.time() + self._spent + next(posted) * 1e-9, future.set_exception, exc)
            return future
        finally:
            del loop.call_soon_threadsafe
        self._after(loop.time() + self._spent + next(posted) * 1e-9, future.set_result, result)
        return future


class _MemoryTransport(asyncio.Transport):
    """One end of an in-memory connection: writes reach the other end's protocol."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        super().__init__()
        self._loop = loop
        self._name = name
        self._protocol: asyncio.Protocol | None = None
        self.peer: _MemoryTransport | None = None
        self._closing = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (self._name, 0), "sockname": (self._name, 0)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self.peer is None or self.peer._closing:
            return
        self._loop.call_soon(self.peer._receive, bytes(data))

    def _receive(self, data: bytes) -> None:
        if not self._closing and self._protocol is not None:
            self._protocol.data_received(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.peer is not None and not self.peer._closing:
            self._loop.call_soon(self.peer._eof)

    def _eof(self) -> None:
        if not self._closing and self._protocol is not None:
            self._protocol.eof_received()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        assert self._protocol is not None
        self._loop.call_soon(self._protocol.connection_lost, None)
        if self.peer is not None and not self.peer._closing:
            self._loop.call_soon(self.peer._eof)
            self._loop.call_soon(self.peer.close)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_reading(self) -> bool:
        return not self._closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _end(loop: asyncio.AbstractEventLoop, name: str) -> tuple[Any, ...]:
    reader = asyncio.StreamReader(limit=2**16, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = _MemoryTransport(loop, name)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return transport, reader, writer


def memory_line() -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
]:
    """Both ends of a connection in memory: (caller's reader and writer, bot's)."""
    loop = asyncio.get_running_loop()
    a, a_reader, a_writer = _end(loop, "caller")
    b, b_reader, b_writer = _end(loop, "bot")
    a.peer, b.peer = b, a
    return (a_reader, a_writer), (b_reader, b_writer)


Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def dial(on_connect: Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]) -> Connect:
    """A simulator's ``connect``: a memory line to a server's connection handler."""

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        caller, bot = memory_line()
        on_connect(*bot)
        return caller

    return connect
