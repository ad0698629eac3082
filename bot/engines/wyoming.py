"""Hearing and speaking on a server: the Wyoming protocol (``wyoming`` package).

Wyoming is the speech protocol of Home Assistant's voice servers: ``wyoming-faster-whisper``
for STT, ``wyoming-piper`` for TTS (and others that speak it). Each request is one TCP
connection: JSON event headers, each with an optional binary payload. The engines here are
blocking like the local ones (the call loop runs them in its executor) and use the package's
own event reader and writer on a socket's file objects.

STT: ``transcribe`` -> ``audio-start`` -> ``audio-chunk``... -> ``audio-stop``; the server
answers ``transcript``. TTS: ``synthesize``; the server answers ``audio-start``, the audio in
``audio-chunk`` events as it synthesizes, ``audio-stop``. Each chunk goes to the caller as it
arrives.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final
from urllib.parse import urlsplit

from wyoming.asr import Transcribe
from wyoming.asr import Transcript as WyTranscript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, read_event, write_event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

from ..audio import pcm_to_float, resample
from ..config import ModelSettings, default
from . import Activity, EngineFailed, ModelUnavailable
from .base import FloatArray, Transcript

CHUNK_BYTES: Final = 3200  # audio sent per event: 100 ms at 16 kHz, 200 ms at 8 kHz
PROBE_TEXT: Final = "Hello."


@dataclass(frozen=True, slots=True)
class WyomingOptions:
    url: str  # tcp://host:port
    voice: str = ""  # TTS: a voice the server has ("": its default)
    language: str = "en"  # STT
    connect_timeout_s: float = default(ModelSettings, "connect_timeout_s")
    read_timeout_s: float = default(ModelSettings, "read_timeout_s")


class _Connection:
    """One request's TCP connection to a Wyoming server."""

    def __init__(self, options: WyomingOptions) -> None:
        parts = urlsplit(options.url)
        if parts.scheme != "tcp" or not parts.hostname or not parts.port:
            raise ModelUnavailable(f"Wyoming server {options.url!r}: expected tcp://host:port")
        self.url = options.url
        try:
            self._sock = socket.create_connection(
                (parts.hostname, parts.port), timeout=options.connect_timeout_s
            )
        except OSError as exc:
            raise EngineFailed(f"Wyoming server {self.url}: {exc.strerror or exc}") from exc
        self._sock.settimeout(options.read_timeout_s)
        self._reader: BinaryIO = self._sock.makefile("rb")
        self._writer: BinaryIO = self._sock.makefile("wb")

    def send(self, *events: Event) -> None:
        try:
            for event in events:
                write_event(event, self._writer)
            self._writer.flush()
        except OSError as exc:
            raise EngineFailed(f"Wyoming server {self.url}: {exc.strerror or exc}") from exc

    def receive(self) -> Event:
        try:
            event = read_event(self._reader)
        except (OSError, ValueError) as exc:
            raise EngineFailed(f"Wyoming server {self.url}: {exc}") from exc
        if event is None:
            raise EngineFailed(f"Wyoming server {self.url} closed the connection")
        if Error.is_type(event.type):
            raise EngineFailed(f"Wyoming server {self.url}: {Error.from_event(event).text}")
        return event

    def close(self) -> None:
        for f in (self._reader, self._writer, self._sock):
            with contextlib.suppress(OSError):
                f.close()


@contextlib.contextmanager
def _connected(options: WyomingOptions) -> Iterator[_Connection]:
    connection = _Connection(options)
    try:
        yield connection
    finally:
        connection.close()


def describe(options: WyomingOptions) -> Info:
    """The server's ``info``: what it serves. Raises ModelUnavailable if it cannot be asked."""
    try:
        with _connected(options) as c:
            c.send(Describe().event())
            while not Info.is_type((event := c.receive()).type):
                pass
            return Info.from_event(event)
    except EngineFailed as exc:
        raise ModelUnavailable(str(exc)) from exc


class WyomingStt:
    """STT on a Wyoming server; satisfies ``base.SttEngine``."""

    def __init__(self, options: WyomingOptions, *, activity: Activity | None = None) -> None:
        self.options = options
        self.activity = activity or Activity()
        info = describe(options)
        if not any(a.installed for a in info.asr):
            raise ModelUnavailable(f"Wyoming server {options.url} has no speech-to-text")
        self.served = ", ".join(m.name for a in info.asr for m in a.models) or "?"

    def transcribe(self, pcm: bytes, rate: int) -> Transcript:
        start = time.perf_counter()
        audio = AudioStart(rate=rate, width=2, channels=1)
        with _connected(self.options) as c, self.activity.running("stt-remote"):
            c.send(Transcribe(language=self.options.language or None).event(), audio.event())
            for i in range(0, len(pcm), CHUNK_BYTES):
                chunk = AudioChunk(rate=rate, width=2, channels=1, audio=pcm[i : i + CHUNK_BYTES])
                c.send(chunk.event())
            c.send(AudioStop().event())
            while not WyTranscript.is_type((event := c.receive()).type):
                pass
        text = WyTranscript.from_event(event).text.strip()
        return Transcript(
            text=text,
            audio_seconds=len(pcm) / 2 / rate,
            seconds=time.perf_counter() - start,
            language=self.options.language or None,
        )


class WyomingTts:
    """TTS on a Wyoming server; satisfies ``base.TtsEngine``. ``native_rate`` is the rate of
    the server's audio, learnt from a first synthesis at construction (which also warms it)."""

    def __init__(self, options: WyomingOptions, *, activity: Activity | None = None) -> None:
        self.options = options
        self.activity = activity or Activity()
        info = describe(options)
        self.voices = [v.name for t in info.tts for v in t.voices if v.installed]
        if not any(t.installed for t in info.tts):
            raise ModelUnavailable(f"Wyoming server {options.url} has no text-to-speech")
        if options.voice:
            self.check_voice(options.voice)
        self.native_rate = 0
        try:
            self.native_rate = self._first_rate()
        except EngineFailed as exc:
            raise ModelUnavailable(str(exc)) from exc

    def check_voice(self, voice: str) -> None:
        if voice and self.voices and voice not in self.voices:
            raise ModelUnavailable(
                f"Wyoming server {self.options.url} has no voice {voice!r} "
                f"(it has: {', '.join(self.voices)})"
            )

    def synthesize(
        self, text: str, voice: str | None = None, *, due: float | None = None
    ) -> Iterator[FloatArray]:
        """The audio of ``text`` chunk by chunk as the server sends it (``due`` is the
        server's business: it orders its own work)."""
        name = voice or self.options.voice or None
        request = Synthesize(text=text, voice=SynthesizeVoice(name=name) if name else None)
        with _connected(self.options) as c:
            c.send(request.event())
            while not AudioStop.is_type((event := c.receive()).type):
                if AudioChunk.is_type(event.type):
                    yield self._samples(AudioChunk.from_event(event))

    def _samples(self, chunk: AudioChunk) -> FloatArray:
        if chunk.width != 2 or chunk.channels != 1:
            raise EngineFailed(
                f"Wyoming server {self.options.url} sent {chunk.width * 8}-bit audio in "
                f"{chunk.channels} channels (16-bit mono expected)"
            )
        samples = pcm_to_float(chunk.audio)
        if self.native_rate and chunk.rate != self.native_rate:
            return resample(samples, chunk.rate, self.native_rate)
        return samples

    def _first_rate(self) -> int:
        request = Synthesize(text=PROBE_TEXT, voice=None)
        if self.options.voice:
            request.voice = SynthesizeVoice(name=self.options.voice)
        with _connected(self.options) as c:
            c.send(request.event())
            rate = 0
            while not AudioStop.is_type((event := c.receive()).type):
                if AudioStart.is_type(event.type):
                    rate = AudioStart.from_event(event).rate
        if not rate:
            raise EngineFailed(f"Wyoming server {self.options.url} sent no audio-start")
        return rate
