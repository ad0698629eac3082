"""A softphone for tests against a real Asterisk: SIPp for the signalling, RtpPhone for the audio.

SIPp (Debian's ``sip-tester``) registers, dials with digest auth and answers, from the
scenarios in ``tests/sipp/``. Their SDP points the call's audio at an :class:`RtpPhone`, a UDP
socket in the test process that sends G.711 u-law (and RFC 4733 digits) like a phone and records
what Asterisk sends back, so a test can transcribe what the caller heard.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bot.audio import pcm_to_ulaw, rms_dbfs, ulaw_to_pcm

SCENARIOS: Final = Path(__file__).resolve().parent / "sipp"
PCMU: Final = 0
EVENTS: Final = 101  # telephone-event, as the scenarios' SDP offers it
PACKET: Final = 160  # 20 ms of u-law at 8 kHz
DTMF_CODES: Final = {**{str(d): d for d in range(10)}, "*": 10, "#": 11}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Received:
    """What the phone received: 8 kHz PCM from the first packet on, with arrival times."""

    pcm: bytearray = field(default_factory=bytearray)
    first_at: float | None = None  # time.monotonic() of the first packet
    arrivals: list[float] = field(default_factory=list)  # of each packet (20 ms, 320 bytes)

    def seconds(self) -> float:
        return len(self.pcm) / 16000


class RtpPhone:
    """The audio half of a phone: a UDP port that answers where Asterisk's RTP comes from
    (symmetric RTP, as pjsip.conf's ``rtp_symmetric`` expects). Like a phone it sends a packet
    every 20 ms once the call's audio flows (silence when nobody speaks), unless ``dtx`` is set:
    then it sends only while it speaks, like a phone with VAD/DTX."""

    def __init__(self, *, dtx: bool = False) -> None:
        self.dtx = dtx
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.heard = Received()
        self.peer: tuple[str, int] | None = None
        self.sent_packets = 0
        self._peer_known = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._outbox: list[tuple[int, bytes, bool, int]] = []  # (type, payload, marker, step)
        self._outbox_empty = threading.Event()
        self._outbox_empty.set()
        self._seq = random.randrange(1 << 16)
        self._ts = random.randrange(1 << 32)
        self._ssrc = random.randrange(1 << 32)
        self._threads = [
            threading.Thread(target=self._receive, name=f"rtp-in-{self.port}", daemon=True),
            threading.Thread(target=self._transmit, name=f"rtp-out-{self.port}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        self.sock.close()

    def __enter__(self) -> RtpPhone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- receiving --------------------------------------------------------------------------

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) < 12 or data[1] & 0x7F != PCMU:
                continue
            with self._lock:
                now = time.monotonic()
                if self.heard.first_at is None:
                    self.heard.first_at = now
                self.heard.pcm += ulaw_to_pcm(data[12:])
                self.heard.arrivals.append(now)
            self.peer = addr
            self._peer_known.set()

    def wait_connected(self, within: float) -> None:
        if not self._peer_known.wait(within):
            raise AssertionError(f"no RTP from Asterisk within {within} s")

    def received(self) -> bytes:
        with self._lock:
            return bytes(self.heard.pcm)

    def first_voice_after(self, since: int) -> float | None:
        """When the first voiced 20 ms packet after byte ``since`` arrived."""
        with self._lock:
            pcm, arrivals = bytes(self.heard.pcm), list(self.heard.arrivals)
        for i in range(since // 320, min(len(arrivals), len(pcm) // 320)):
            if rms_dbfs(pcm[i * 320 : (i + 1) * 320]) > -40:
                return arrivals[i]
        return None

    def wait_quiet(self, quiet: float, within: float, since: int = 0) -> bytes:
        """Waits until, after some voice past byte ``since``, what arrives has been silent for
        ``quiet`` s; returns everything received so far."""
        deadline = time.monotonic() + within
        window = round(quiet * 16000)
        while time.monotonic() < deadline:
            pcm = self.received()
            heard = pcm[since:]
            levels = [rms_dbfs(heard[i : i + 320]) for i in range(0, len(heard) - 319, 320)]
            tail = levels[-(window // 320) :]
            if any(v > -40 for v in levels) and len(heard) > window and max(tail) < -45:
                return pcm
            time.sleep(0.05)
        raise AssertionError(f"no voice, then {quiet} s of quiet, within {within} s")

    # --- sending ----------------------------------------------------------------------------

    def _transmit(self) -> None:
        self._peer_known.wait()
        next_t = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                item = self._outbox.pop(0) if self._outbox else None
                if not self._outbox:
                    self._outbox_empty.set()
            if item is not None:
                self._send(*item)
            elif not self.dtx:
                self._send(PCMU, b"\xff" * PACKET, False, PACKET)  # u-law silence
            next_t += 0.02
            time.sleep(max(0.0, next_t - time.monotonic()))

    def _send(self, payload_type: int, payload: bytes, marker: bool, step: int) -> None:
        assert self.peer is not None
        header = struct.pack(
            "!BBHII", 0x80, payload_type | (0x80 if marker else 0), self._seq, self._ts, self._ssrc
        )
        with contextlib.suppress(OSError):
            self.sock.sendto(header + payload, self.peer)
        self.sent_packets += 1
        self._seq = (self._seq + 1) & 0xFFFF
        self._ts = (self._ts + step) & 0xFFFFFFFF

    def _queue(self, items: list[tuple[int, bytes, bool, int]], within: float) -> None:
        with self._lock:
            self._outbox_empty.clear()
            self._outbox += items
        if not self._outbox_empty.wait(within):
            raise AssertionError("the phone could not send its audio in time")

    def say(self, pcm: bytes) -> None:
        """Speaks 8 kHz PCM as 20 ms u-law packets; returns once it is sent (real time)."""
        data = pcm_to_ulaw(pcm)
        packets = [
            (PCMU, data[i : i + PACKET].ljust(PACKET, b"\xff"), i == 0, PACKET)
            for i in range(0, len(data), PACKET)
        ]
        self._queue(packets, within=len(packets) * 0.02 + 5)

    def press(self, digit: str, millis: int = 160) -> None:
        """One RFC 4733 digit: an event packet every 20 ms, then the end packet three times
        (all at the event's first timestamp: a step of 0 until the last)."""
        code = DTMF_CODES[digit]
        steps = millis // 20
        packets = [
            (EVENTS, struct.pack("!BBH", code, 10, n * PACKET), n == 1, 0)
            for n in range(1, steps + 1)
        ]
        end = struct.pack("!BBH", code, 0x80 | 10, steps * PACKET)
        packets += [(EVENTS, end, False, 0), (EVENTS, end, False, 0)]
        packets += [(EVENTS, end, False, steps * PACKET)]
        self._queue(packets, within=5)


# --- SIPp ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """Where the phones reach Asterisk, and extension 16's and 17's credentials."""

    sip_port: int
    passwords: dict[str, str]


def sipp(
    line: Line,
    scenario: str,
    user: str,
    *,
    local_port: int,
    service: str = "",
    rtp_port: int = 0,
    hold_ms: int = 0,
    calls: int = 1,
    timeout: float = 60,
) -> subprocess.Popen[str]:
    """Starts SIPp as extension ``user`` with one of tests/sipp/*.xml."""
    cmd = [
        "sipp", f"127.0.0.1:{line.sip_port}",
        "-sf", str(SCENARIOS / f"{scenario}.xml"),
        "-i", "127.0.0.1", "-p", str(local_port),
        "-mp", str(free_port(socket.SOCK_DGRAM)),
        "-set", "user", user,
        "-au", user, "-ap", line.passwords[user],
        "-m", str(calls), "-l", "1",
        "-timeout", f"{timeout:g}s", "-timeout_error",
        "-nostdin",
    ]  # fmt: skip
    if rtp_port:
        cmd += ["-set", "rtp_port", str(rtp_port)]
    if service:
        cmd += ["-s", service]
    if hold_ms:
        cmd += ["-d", str(hold_ms)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/tmp"
    )


def finished(process: subprocess.Popen[str], within: float) -> str:
    """Waits for SIPp; its output, or an AssertionError with it when the call failed."""
    try:
        out, _ = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError(f"SIPp did not finish within {within} s:\n{out[-2000:]}") from None
    if process.returncode != 0:
        raise AssertionError(f"SIPp exited {process.returncode}:\n{out[-3000:]}")
    return out


def register(line: Line, user: str, local_port: int) -> None:
    finished(sipp(line, "register", user, local_port=local_port, timeout=10), within=20)


@contextlib.contextmanager
def answering(line: Line, user: str) -> Iterator[tuple[subprocess.Popen[str], RtpPhone]]:
    """Extension ``user`` registered and ready to answer one call on an RtpPhone."""
    port = free_port(socket.SOCK_DGRAM)
    register(line, user, port)
    with RtpPhone() as phone:
        process = sipp(line, "answer", user, local_port=port, rtp_port=phone.port, timeout=120)
        try:
            yield process, phone
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
