"""The playout clock and buffer, on a fake clock: exact schedules, no real sleeps."""

from __future__ import annotations

import asyncio

import pytest

from bot.audio import FRAME_SECONDS, Playout, PlayoutBuffer, frame_bytes, silence


class FakeClock:
    """Time moves only when the playout sleeps; ``stalls`` adds extra delay to chosen wake-ups."""

    def __init__(self) -> None:
        self.t = 100.0
        self.stalls: dict[int, float] = {}  # sleep number -> extra seconds late
        self.sleeps = 0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline: float) -> None:
        self.sleeps += 1
        self.t = max(self.t, deadline) + self.stalls.get(self.sleeps, 0.0)
        await asyncio.sleep(0)


class Stop(Exception):
    pass


def run_playout(
    buffer: PlayoutBuffer, frames: int, clock: FakeClock, lead: int = 3, **kw: object
) -> tuple[list[tuple[float, bytes]], Playout]:
    sent: list[tuple[float, bytes]] = []

    async def send(frame: bytes) -> None:
        sent.append((clock.now() - 100.0, frame))
        if len(sent) >= frames:
            raise Stop

    playout = Playout(buffer, send, clock=clock, lead_frames=lead, **kw)  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(Stop):
            await playout.run()

    asyncio.run(main())
    return sent, playout


def test_frames_follow_an_absolute_schedule_with_a_fixed_lead() -> None:
    clock = FakeClock()
    sent, playout = run_playout(PlayoutBuffer(8000), 1000, clock, lead=3)
    times = [t for t, _ in sent]
    # The first lead+1 frames go at once, then one every 20 ms, written 60 ms before it plays.
    assert times[:4] == [0.0] * 4
    for k in range(4, 1000):
        assert times[k] == pytest.approx((k - 3) * FRAME_SECONDS, abs=1e-9)
    assert playout.stats.reanchors == 0
    assert all(len(f) == 320 and f == silence(8000) for _, f in sent)


def test_a_short_stall_catches_up_without_drift_and_bursts_at_most_lead_plus_one() -> None:
    clock = FakeClock()
    clock.stalls = {50: 0.050}  # one wake-up 50 ms late
    sent, playout = run_playout(PlayoutBuffer(8000), 400, clock, lead=3)
    times = [t for t, _ in sent]
    burst = max(times.count(t) for t in set(times[4:]))
    assert burst <= 4
    # After catching up, frames are back on the original schedule: no drift.
    for k in range(100, 400):
        assert times[k] == pytest.approx((k - 3) * FRAME_SECONDS, abs=1e-9)
    assert playout.stats.reanchors == 0
    assert playout.stats.max_late == pytest.approx(0.050)


def test_a_long_stall_reanchors_instead_of_bursting() -> None:
    clock = FakeClock()
    clock.stalls = {50: 0.5}  # 25 frames' worth
    sent, playout = run_playout(PlayoutBuffer(8000), 400, clock, lead=3)
    times = [t for t, _ in sent]
    assert max(times.count(t) for t in set(times[4:])) <= 4
    assert playout.stats.reanchors == 1
    gaps = [b - a for a, b in zip(times[60:], times[61:], strict=False)]
    assert gaps == pytest.approx([FRAME_SECONDS] * len(gaps))


def test_zero_lead_writes_exactly_on_time() -> None:
    clock = FakeClock()
    sent, _ = run_playout(PlayoutBuffer(8000), 50, clock, lead=0)
    assert [t for t, _ in sent] == pytest.approx([k * FRAME_SECONDS for k in range(50)])


def test_buffered_audio_plays_in_order_then_silence_and_the_tail_is_padded() -> None:
    buffer = PlayoutBuffer(8000)
    speech = b"".join(bytes([k + 1]) * 320 for k in range(5)) + b"\x07\x07" * 10  # 5.06 frames

    async def fill() -> None:
        await buffer.write(speech)

    asyncio.run(fill())
    sent, playout = run_playout(buffer, 10, FakeClock(), lead=0)
    frames = [f for _, f in sent]
    assert frames[:5] == [bytes([k + 1]) * 320 for k in range(5)]
    assert frames[5] == b"\x07\x07" * 10 + bytes(300)
    assert frames[6:] == [silence(8000)] * 4
    assert playout.stats.voiced_frames == 6


def test_rate_follows_the_call_once_known() -> None:
    rate: list[int | None] = [None]
    clock = FakeClock()
    sent: list[bytes] = []

    async def send(frame: bytes) -> None:
        sent.append(frame)
        if len(sent) == 3:
            rate[0] = 16000  # the first slin16 frame arrived
        if len(sent) == 8:
            raise Stop

    async def main() -> None:
        playout = Playout(
            PlayoutBuffer(8000), send, clock=clock, lead_frames=0, rate_source=lambda: rate[0]
        )
        with pytest.raises(Stop):
            await playout.run()

    asyncio.run(main())
    assert [len(f) for f in sent] == [320] * 3 + [640] * 5


def test_buffer_applies_back_pressure_and_clear_drops_unplayed_audio() -> None:
    async def main() -> None:
        buffer = PlayoutBuffer(8000, capacity_seconds=1.0)
        writer = asyncio.create_task(buffer.write(bytes(3 * 16000)))  # 3 s into a 1 s buffer
        await asyncio.sleep(0)
        assert not writer.done()
        assert buffer.pending_bytes == buffer.capacity == 16000
        for _ in range(50):  # one second of pulls makes room for the next second
            assert buffer.pull() == bytes(320)
        await asyncio.sleep(0)
        assert buffer.pending_bytes == 16000
        assert buffer.clear() == 16000
        await asyncio.sleep(0)
        assert buffer.pending_bytes == 16000  # the writer fills the room clear() made
        buffer.clear()
        await asyncio.wait_for(writer, 1)
        assert buffer.pull() is None

    asyncio.run(main())


def test_odd_length_pcm_is_refused() -> None:
    with pytest.raises(ValueError, match="not whole 16-bit samples"):
        asyncio.run(PlayoutBuffer(8000).write(b"abc"))


def test_lead_is_bounded() -> None:
    with pytest.raises(ValueError, match="lead_frames must be 0..10"):
        Playout(PlayoutBuffer(8000), lambda f: asyncio.sleep(0), lead_frames=11)


def test_frame_sizes() -> None:
    assert [frame_bytes(r) for r in (8000, 16000, 48000)] == [320, 640, 1920]


def test_drain_returns_once_queued_audio_was_written() -> None:
    clock = FakeClock()
    sent: list[bytes] = []

    async def send(frame: bytes) -> None:
        sent.append(frame)

    async def main() -> None:
        buffer = PlayoutBuffer(8000)
        await buffer.write(b"\x01\x00" * 160 * 5)
        playout = Playout(buffer, send, clock=clock, lead_frames=0)
        task = asyncio.create_task(playout.run())
        await asyncio.wait_for(playout.drain(), 1)
        assert len(sent) >= 5 and sent[4] == b"\x01\x00" * 160
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
