"""The clock of the call path: the running event loop's.

On asyncio's own loops it is ``time.monotonic()``. Everything that times a call (frame arrival,
the turn detector's times, a reply's marks and deadlines, the playout schedule, the caller
simulator's pacing) reads it here, so that a test can run whole calls on a loop whose time is
virtual (tests/virtual.py) and every one of those times stays consistent.
"""

from __future__ import annotations

import asyncio


def now() -> float:
    """The running loop's time, in seconds (called from the loop's thread)."""
    return asyncio.get_running_loop().time()
