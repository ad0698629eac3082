"""Audio plumbing: PCM helpers, an anti-aliasing resampler, and the paced playout clock.

Theory of operation (playout)
-----------------------------
Asterisk neither paces nor buffers what the server writes: every frame is forwarded to the caller
the moment it arrives, and nothing written can be recalled (docs/audiosocket.md). So the
bot writes one 20 ms frame per tick against an absolute monotonic schedule, from the first moment
of the call to the last, silence whenever it has nothing to say. Frame ``k`` is due at
``t0 + k * 20 ms`` and is written ``lead`` frames early, which absorbs event-loop hiccups without
writing far ahead. When the loop wakes late it catches up with at most ``lead + 1`` frames at once;
if it is further behind than that, it re-anchors the schedule instead of bursting (a burst is
audio the phone's jitter buffer throws away).

Audio to be played waits in a :class:`PlayoutBuffer` of bounded size that the clock pulls from;
producers (TTS, the echo profile) wait while it is full. ``clear()`` drops what is not yet
written, which is all that barge-in can take back.
"""

from __future__ import annotations

import asyncio
import math
import wave
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

FRAME_MS: Final = 20
FRAME_SECONDS: Final = FRAME_MS / 1000
SILENCE_DBFS: Final = -50.0  # a frame quieter than this is silence to the simulator and the gate

FloatArray = npt.NDArray[np.float32]


def frame_bytes(rate: int) -> int:
    """Bytes in one 20 ms frame of 16-bit mono PCM at ``rate`` (320 at 8 kHz, 640 at 16 kHz)."""
    return rate * FRAME_MS // 1000 * 2


def silence(rate: int, seconds: float = FRAME_SECONDS) -> bytes:
    return bytes(2 * round(rate * seconds))


def pcm_to_float(pcm: bytes) -> FloatArray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm(samples: npt.ArrayLike) -> bytes:
    x = np.asarray(samples, dtype=np.float32)
    return bytes(np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2").tobytes())


def rms_dbfs(pcm: bytes) -> float:
    """RMS level relative to a full-scale square wave; ``-inf`` for digital silence."""
    if len(pcm) < 2:
        return -math.inf
    x = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float64)
    ms = float(np.mean(x * x))
    return -math.inf if ms == 0.0 else 10.0 * math.log10(ms / (32768.0 * 32768.0))


def is_silent(pcm: bytes, threshold_dbfs: float = SILENCE_DBFS) -> bool:
    return rms_dbfs(pcm) < threshold_dbfs


def leading_silence(
    pcm: bytes, rate: int, threshold_dbfs: float = -45.0, keep_ms: float = 20.0
) -> int:
    """Bytes of near-silence at the start of ``pcm`` (less ``keep_ms``), in 5 ms steps.

    TTS models start an utterance with a few hundred ms of breath; at the start of a reply that
    is pure latency.
    """
    step = 2 * max(1, rate // 200)
    pos = 0
    while pos + step <= len(pcm) and rms_dbfs(pcm[pos : pos + step]) < threshold_dbfs:
        pos += step
    return max(0, pos - 2 * round(rate * keep_ms / 1000))


def trailing_silence(
    pcm: bytes, rate: int, threshold_dbfs: float = -45.0, keep_ms: float = 20.0
) -> int:
    """Bytes of near-silence at the end of ``pcm`` (less ``keep_ms``), in 5 ms steps."""
    step = 2 * max(1, rate // 200)
    pos = len(pcm) - len(pcm) % 2
    while pos - step >= 0 and rms_dbfs(pcm[pos - step : pos]) < threshold_dbfs:
        pos -= step
    return max(0, len(pcm) - pos - 2 * round(rate * keep_ms / 1000))


# --- G.711 u-law ---------------------------------------------------------------------------------
# What a Dial(AudioSocket/host:port/uuid) without c(slin) sends: the caller's u-law bytes, one per
# sample, under the slin kind (0x10). ITU-T G.711 as Sun's reference g711.c (and audioop)
# computes it.

_ULAW_BIAS: Final = 0x84
_ULAW_BIAS14: Final = 0x21  # the same bias and clip on 14-bit samples (the encoder's scale)
_ULAW_CLIP14: Final = 8159
_ULAW_SEGMENT_ENDS: Final = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])


def _ulaw_decode_table() -> npt.NDArray[np.int16]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = (((u & 0x0F) << 3) + _ULAW_BIAS << exponent) - _ULAW_BIAS
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


_ULAW_TO_LINEAR: Final = _ulaw_decode_table()


def ulaw_to_pcm(data: bytes) -> bytes:
    """G.711 u-law bytes to 16-bit little-endian PCM (two bytes out per byte in)."""
    return _ULAW_TO_LINEAR[np.frombuffer(data, dtype=np.uint8)].astype("<i2").tobytes()


def pcm_to_ulaw(pcm: bytes) -> bytes:
    """16-bit little-endian PCM to G.711 u-law (one byte out per sample), as Sun's reference
    g711.c computes it on 14-bit samples."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.int32) >> 2
    mask = np.where(x < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(x), _ULAW_CLIP14) + _ULAW_BIAS14
    segment = np.searchsorted(_ULAW_SEGMENT_ENDS, magnitude)
    code = np.where(segment < 8, (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F), 0x7F)
    return (code ^ mask).astype(np.uint8).tobytes()


# --- resampling ---------------------------------------------------------------------------------


class Resampler:
    """Streaming polyphase resampler with a Kaiser-windowed sinc anti-aliasing filter.

    Telephone audio is 8 kHz; Whisper wants 16 kHz and Kokoro speaks at 24 kHz, so audio crosses
    rates in both directions. Naive decimation folds everything above the new Nyquist frequency
    back into the band the caller hears; this filter cuts at 90 % of the lower Nyquist frequency
    with ~80 dB of stopband attenuation. Feed chunks of any size with :meth:`process`, then call
    :meth:`flush` once for the tail; the output is aligned with the input (delay compensated).
    """

    ZERO_CROSSINGS: Final = 32  # sinc lobes on each side: the filter's sharpness
    KAISER_BETA: Final = 8.0  # ~80 dB stopband
    CUTOFF: Final = 0.9  # fraction of the lower Nyquist frequency kept

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        if src_rate <= 0 or dst_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
        ratio = Fraction(dst_rate, src_rate)
        self.src_rate, self.dst_rate = src_rate, dst_rate
        self.up, self.down = ratio.numerator, ratio.denominator
        self._identity = self.up == self.down == 1
        inter = src_rate * self.up  # the (virtual) upsampled rate the filter runs at
        cutoff = self.CUTOFF * min(src_rate, dst_rate) / 2
        spacing = inter / (2 * cutoff)  # samples between the sinc's zero crossings
        half = math.ceil(self.ZERO_CROSSINGS * spacing)
        n = np.arange(-half, half + 1, dtype=np.float64)
        h = (2 * cutoff / inter) * np.sinc(2 * cutoff / inter * n)
        h *= np.kaiser(len(n), self.KAISER_BETA)
        h *= self.up / h.sum()  # unity gain at DC after zero-stuffing by `up`
        self._delay = half  # centre tap, in upsampled samples
        taps = math.ceil(len(h) / self.up)
        padded = np.zeros(taps * self.up, dtype=np.float64)
        padded[: len(h)] = h
        # poly[p, m] = h[p + up*m]: the taps that meet input sample (i_max - m) at phase p.
        self._poly = padded.reshape(taps, self.up).T.astype(np.float32).copy()
        self._taps = taps
        self._history = np.zeros(taps - 1, dtype=np.float32)  # input before the chunk
        self._base = -(taps - 1)  # absolute input index of _history[0] (zeros before the start)
        self._consumed = 0  # input samples seen so far
        self._next_out = 0  # index of the next output sample
        self._flushed = False

    def process(self, chunk: npt.ArrayLike) -> FloatArray:
        if self._flushed:
            raise RuntimeError("resampler already flushed")
        x = np.asarray(chunk, dtype=np.float32).reshape(-1)
        if self._identity:
            return x.copy()
        self._consumed += len(x)
        return self._emit(x, final=False)

    def flush(self) -> FloatArray:
        """The output still held back by the filter's delay; ends the stream."""
        if self._flushed:
            raise RuntimeError("resampler already flushed")
        self._flushed = True
        if self._identity:
            return np.zeros(0, dtype=np.float32)
        tail = np.zeros(self._delay // self.up + self._taps + 1, dtype=np.float32)
        return self._emit(tail, final=True)

    def _emit(self, x: FloatArray, *, final: bool) -> FloatArray:
        data = np.concatenate([self._history, x])
        first_index = self._base  # absolute input index of data[0]
        if final:
            # Stop at the output that corresponds to the input's real end.
            last_needed = -(-self._consumed * self.up // self.down) - 1
        else:
            # Output n reads input up to i_max = (n*down + delay) // up.
            last_input = self._consumed - 1
            last_needed = (last_input * self.up + self.up - 1 - self._delay) // self.down
        count = last_needed - self._next_out + 1
        out = np.zeros(max(count, 0), dtype=np.float32)
        if count > 0:
            n = np.arange(self._next_out, self._next_out + count, dtype=np.int64)
            pos = n * self.down + self._delay
            i_max = pos // self.up - first_index
            phase = pos % self.up
            idx = i_max[:, None] - np.arange(self._taps)[None, :]
            windows = data[np.clip(idx, 0, len(data) - 1)]
            out = np.einsum("nk,nk->n", windows, self._poly[phase]).astype(np.float32)
            self._next_out += count
        keep = self._taps - 1
        self._history = data[len(data) - keep :].copy()
        self._base = first_index + len(data) - keep
        return out


def resample(samples: npt.ArrayLike, src_rate: int, dst_rate: int) -> FloatArray:
    """Resample a whole signal (float samples in [-1, 1])."""
    r = Resampler(src_rate, dst_rate)
    head = r.process(samples)
    return np.concatenate([head, r.flush()])


def resample_pcm(pcm: bytes, src_rate: int, dst_rate: int) -> bytes:
    if src_rate == dst_rate:
        return pcm
    return float_to_pcm(resample(pcm_to_float(pcm), src_rate, dst_rate))


def read_wav(path: str, rate: int) -> bytes:
    """16-bit PCM WAV as mono 16-bit PCM at ``rate`` (channels averaged, resampled)."""
    try:
        with wave.open(path, "rb") as w:
            width, channels, src_rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a PCM WAV file ({exc})") from None
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit samples; only 16-bit PCM WAV is supported")
    x = np.frombuffer(raw[: len(raw) // (2 * channels) * 2 * channels], dtype="<i2")
    mono = x.reshape(-1, channels).astype(np.float32).mean(axis=1) / 32768.0
    return float_to_pcm(resample(mono, src_rate, rate) if src_rate != rate else mono)


def write_wav(path: str, pcm: bytes, rate: int) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)


# --- playout ------------------------------------------------------------------------------------


class PlayoutBuffer:
    """Bounded audio waiting to be played; the playout clock pulls one frame per tick.

    Overflow policy: :meth:`write` waits for room (back-pressure on the producer). Nothing is
    ever dropped except by :meth:`clear`.
    """

    def __init__(self, rate: int, capacity_seconds: float = 10.0) -> None:
        if capacity_seconds <= 0:
            raise ValueError("capacity_seconds must be positive")
        self._rate = rate
        self._capacity_seconds = capacity_seconds
        self._buf = bytearray()
        self._room = asyncio.Event()
        self._room.set()

    @property
    def rate(self) -> int:
        return self._rate

    @property
    def capacity(self) -> int:
        return 2 * round(self._rate * self._capacity_seconds)

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def set_rate(self, rate: int) -> None:
        """Switch rate (the call's real rate became known); converts what is buffered."""
        if rate == self._rate:
            return
        if self._buf:
            self._buf = bytearray(resample_pcm(bytes(self._buf), self._rate, rate))
        self._rate = rate
        self._update_room()

    async def write(self, pcm: bytes) -> None:
        if len(pcm) % 2:
            raise ValueError(f"PCM of {len(pcm)} bytes is not whole 16-bit samples")
        view = memoryview(pcm)
        while view:
            await self._room.wait()
            take = min(len(view), self.capacity - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            self._update_room()

    def clear(self) -> int:
        """Drop everything not yet pulled; returns the bytes dropped."""
        dropped = len(self._buf)
        self._buf.clear()
        self._update_room()
        return dropped

    def pull(self) -> bytes | None:
        """The next 20 ms frame (the last one padded with silence), or None when empty."""
        if not self._buf:
            return None
        size = frame_bytes(self._rate)
        frame = bytes(self._buf[:size])
        del self._buf[:size]
        self._update_room()
        if len(frame) < size:
            frame += bytes(size - len(frame))
        return frame

    def _update_room(self) -> None:
        if len(self._buf) < self.capacity:
            self._room.set()
        else:
            self._room.clear()


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None: ...


class MonotonicClock:
    """The event loop's monotonic clock (``bot.clock``)."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - self.now()))


@dataclass(slots=True)
class PlayoutStats:
    frames: int = 0
    voiced_frames: int = 0
    reanchors: int = 0  # times the schedule was reset after falling behind
    max_late: float = 0.0  # seconds the clock woke after a frame was due to be written
    last_voiced_at: float | None = None  # clock time the last non-silent frame was written
    voiced_since: float | None = None  # clock time the current stretch of bot audio began


class Playout:
    """Writes one frame per 20 ms from ``buffer`` (silence when empty) through ``send``."""

    def __init__(
        self,
        buffer: PlayoutBuffer,
        send: Callable[[bytes], Awaitable[None]],
        *,
        clock: Clock | None = None,
        lead_frames: int = 3,
        rate_source: Callable[[], int | None] | None = None,
    ) -> None:
        if not 0 <= lead_frames <= 10:
            raise ValueError(f"lead_frames must be 0..10, got {lead_frames}")
        self.buffer = buffer
        self._send = send
        self.clock: Clock = clock or MonotonicClock()
        self.lead_frames = lead_frames
        self._rate_source = rate_source
        self.stats = PlayoutStats()
        self._idle = asyncio.Event()  # set each time a tick finds nothing to play
        # Called with the clock time when a stretch of bot audio starts going out (latency marks).
        self.on_voice_start: Callable[[float], None] | None = None

    @property
    def speaking(self) -> bool:
        """True while bot audio is queued or the last frame written was voiced."""
        return self.buffer.pending_bytes > 0 or self.stats.voiced_since is not None

    async def drain(self) -> None:
        """Waits until everything queued has been written."""
        while self.buffer.pending_bytes:
            self._idle.clear()
            await self._idle.wait()

    async def run(self) -> None:
        period = FRAME_SECONDS
        lead = self.lead_frames * period
        stats = self.stats
        due = wake_at = self.clock.now()  # `due`: when the next frame starts playing
        while True:
            now = self.clock.now()
            stats.max_late = max(stats.max_late, now - wake_at)
            if now - (due - lead) > (self.lead_frames + 1) * period:
                # Far behind (a stalled loop or a slow reader): re-anchor rather than burst.
                stats.reanchors += 1
                due = now
            burst = 0
            while due - lead <= now and burst <= self.lead_frames:
                await self._write_one(now)
                due += period
                burst += 1
            wake_at = due - lead
            await self.clock.sleep_until(wake_at)

    async def _write_one(self, now: float) -> None:
        if self._rate_source is not None:
            rate = self._rate_source()
            if rate is not None and rate != self.buffer.rate:
                self.buffer.set_rate(rate)
        frame = self.buffer.pull()
        stats = self.stats
        if frame is None:
            frame = silence(self.buffer.rate)
            stats.voiced_since = None
            self._idle.set()
        elif is_silent(frame):
            stats.voiced_since = None
        else:
            stats.voiced_frames += 1
            stats.last_voiced_at = now
            if stats.voiced_since is None:
                stats.voiced_since = now
                if self.on_voice_start is not None:
                    self.on_voice_start(now)
        await self._send(frame)
        stats.frames += 1
