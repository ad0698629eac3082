"""A call's recording: ``call.wav`` in its folder, stereo 16-bit, caller left and bot right.

Both sides sit on the line's 20 ms timeline as Asterisk heard it: a caller frame at the slot of
its arrival, a bot frame at the slot it plays in (the playout writes ``lead`` frames ahead of
real time), silence where a side sent nothing (a phone with DTX, the bot's quiet playout). The
file grows as the call goes: slots more than ``LAG_SLOTS`` behind the clock are final and go to
disk about once a second with the header's sizes updated, so a killed server leaves a readable
WAV missing at most the last second; :func:`repair` fixes a header cut off mid-write.

Writing never stops a call: an error (a full disk, an unwritable folder) is reported once
through ``on_error`` and the recording stops.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np

from .audio import FRAME_SECONDS, resample_pcm

RECORDING_FILE: Final = "call.wav"
HEADER_BYTES: Final = 44
JITTER_SLOTS: Final = 3  # a frame this much later than the one before is only late
LAG_SLOTS: Final = 10  # a frame may arrive this late (200 ms) and still find its slot
FLUSH_SLOTS: Final = 50  # written about once a second


def header(rate: int, data_bytes: int) -> bytes:
    """A 16-bit stereo PCM WAV header for ``data_bytes`` of samples."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        1,  # PCM
        2,  # channels
        rate,
        rate * 4,
        4,
        16,
        b"data",
        data_bytes,
    )


class Recorder:
    def __init__(
        self,
        path: Path,
        rate: int,
        start: float,
        *,
        lead_frames: int = 0,
        on_error: Callable[[str], None] = lambda why: None,
    ) -> None:
        self.path = path
        self.rate = rate
        self.start = start
        self.lead = lead_frames
        self._on_error = on_error
        self._frame = int(rate * FRAME_SECONDS) * 2  # bytes of one side's 20 ms
        self._base = 0  # the first slot not yet on disk
        self._sides = (bytearray(), bytearray())  # caller, bot: slots from _base on
        self._next = [-JITTER_SLOTS - 1] * 2  # each side's next slot (none yet: the clock's)
        self.data_bytes = 0
        self._file: BinaryIO | None = None
        try:
            self._file = path.open("wb")
            self._file.write(header(rate, 0))
            self._file.flush()
        except OSError as exc:
            self._fail(exc)

    @property
    def recording(self) -> bool:
        return self._file is not None

    @property
    def seconds(self) -> float:
        return self.data_bytes / 4 / self.rate

    def caller(self, t: float, pcm: bytes, rate: int) -> None:
        """A caller frame that arrived at ``t``."""
        self._place(0, self._slot(t), pcm, rate)
        self._maybe_flush(t)

    def bot(self, t: float, pcm: bytes, rate: int) -> None:
        """A bot frame written to the line at ``t``: Asterisk plays it as it arrives."""
        self._place(1, self._slot(t), pcm, rate)
        self._maybe_flush(t)

    def close(self) -> None:
        """Writes everything held and the final header."""
        if self._file is None:
            return
        slots = max(len(side) for side in self._sides) // self._frame
        self._flush(slots)
        f, self._file = self._file, None
        try:
            f.close()
        except OSError as exc:
            self._on_error(f"recording stopped: {exc.strerror or exc}")

    # --- the timeline --------------------------------------------------------------------------

    def _slot(self, t: float) -> int:
        return round((t - self.start) / FRAME_SECONDS)

    def _place(self, side: int, slot: int, pcm: bytes, rate: int) -> None:
        if self._file is None:
            return
        if rate != self.rate:
            pcm = resample_pcm(pcm, rate, self.rate)
        # A side's frames follow each other (TCP loses none): a frame takes the slot after
        # the last one unless the clock says a stretch went by with none (a phone with DTX, a
        # playout that re-anchored); then it starts again where the clock puts it. The
        # playout writes ``lead`` frames ahead of its schedule, so its frames run ``lead``
        # slots ahead of the clock: they are where Asterisk heard them ``lead`` slots back. A
        # slot already on disk is gone: a frame that late follows what is written.
        if slot <= self._next[side] + JITTER_SLOTS:
            slot = self._next[side]
        self._next[side] = slot + max(1, len(pcm) // self._frame)
        if side == 1:
            slot -= self.lead
        if slot < self._base:
            return
        buf = self._sides[side]
        at = (slot - self._base) * self._frame
        if len(buf) < at:
            buf.extend(bytes(at - len(buf)))
        buf[at : at + len(pcm)] = pcm

    def _maybe_flush(self, t: float) -> None:
        final = self._slot(t) - LAG_SLOTS - self._base
        if final >= FLUSH_SLOTS:
            self._flush(final)

    def _flush(self, slots: int) -> None:
        """Writes the first ``slots`` slots of both sides, interleaved, and the header."""
        if self._file is None or slots <= 0:
            return
        n = slots * self._frame
        left, right = (bytes(side[:n]).ljust(n, b"\0") for side in self._sides)
        for side in self._sides:
            del side[:n]
        self._base += slots
        stereo = np.empty((n // 2, 2), dtype="<i2")
        stereo[:, 0] = np.frombuffer(left, dtype="<i2")
        stereo[:, 1] = np.frombuffer(right, dtype="<i2")
        try:
            f = self._file
            f.write(stereo.tobytes())
            self.data_bytes += n * 2
            f.seek(0)
            f.write(header(self.rate, self.data_bytes))
            f.seek(0, 2)
            f.flush()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            with contextlib.suppress(OSError):
                f.close()
        self._on_error(f"recording stopped: {exc.strerror or exc} ({self.path})")


def repair(path: Path) -> bool:
    """Fixes the header of a recording cut off mid-write (its sizes from the file's length);
    True if it needed it."""
    try:
        with path.open("r+b") as f:
            head = f.read(HEADER_BYTES)
            if len(head) < HEADER_BYTES or head[:4] != b"RIFF":
                return False
            rate = struct.unpack_from("<I", head, 24)[0]
            size = path.stat().st_size - HEADER_BYTES
            size -= size % 4  # a whole stereo sample
            if struct.unpack_from("<I", head, 40)[0] == size:
                return False
            f.seek(0)
            f.write(header(rate, size))
            f.truncate(HEADER_BYTES + size)
            return True
    except OSError:
        return False
