"""Speech to text with faster-whisper (CTranslate2).

Telephone audio is 8 kHz; Whisper wants 16 kHz, so caller audio goes through the anti-aliasing
resampler first. The model is loaded once per process and shared; transcription is blocking
(call it from an executor). CTranslate2 releases the GIL while it decodes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from ..audio import pcm_to_float, resample
from . import EngineFailed, ModelUnavailable
from .models import Resolved, resolve

WHISPER_RATE: Final = 16000
# Short names faster-whisper itself maps to Hugging Face repositories (Systran/faster-whisper-*).
HF_SIZES: Final = frozenset(
    {
        "tiny",
        "tiny.en",
        "base",
        "base.en",
        "small",
        "small.en",
        "medium",
        "medium.en",
        "large-v1",
        "large-v2",
        "large-v3",
        "large",
        "turbo",
        "distil-large-v3",
    }
)


@dataclass(frozen=True, slots=True)
class SttOptions:
    model: str = "whisper-tiny.en"  # catalogue name, path, HF repo, or a faster-whisper size
    beam_size: int = 1
    compute_type: str = "int8"
    threads: int = 2
    language: str | None = "en"


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    audio_seconds: float
    seconds: float  # wall time spent transcribing
    language: str | None = None


class WhisperStt:
    def __init__(self, options: SttOptions | None = None, *, progress: bool = True) -> None:
        self.options = options or SttOptions()
        try:
            from faster_whisper import WhisperModel
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise ModelUnavailable(f"faster-whisper is not installed ({exc})") from exc
        name = self.options.model
        if name in HF_SIZES:
            self.resolved = Resolved(name, "huggingface", ref=f"Systran/faster-whisper-{name}")
            source = name
        else:
            self.resolved = resolve(name, "stt", progress=progress)
            # faster-whisper rejects a Path object: it wants a str or a size/repo name.
            source = (
                self.resolved.ref
                if self.resolved.source == "huggingface"
                else str(self.resolved.path)
            )
        try:
            self._model: Any = WhisperModel(
                source,
                device="cpu",
                compute_type=self.options.compute_type,
                cpu_threads=self.options.threads,
            )
        except Exception as exc:
            raise ModelUnavailable(f"cannot load Whisper model {name!r}: {exc}") from exc
        self._lock = threading.Lock()

    def transcribe(self, pcm: bytes, rate: int) -> Transcript:
        """Transcribes 16-bit mono PCM at ``rate``; blocking."""
        start = time.perf_counter()
        audio = pcm_to_float(pcm)
        if rate != WHISPER_RATE:
            audio = resample(audio, rate, WHISPER_RATE)
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        o = self.options
        try:
            with self._lock:  # one decode at a time per model: CTranslate2 uses all its threads
                segments, info = self._model.transcribe(
                    audio,
                    language=o.language,
                    beam_size=o.beam_size,
                    condition_on_previous_text=False,
                    without_timestamps=True,
                    vad_filter=False,
                )
                text = " ".join(s.text.strip() for s in segments).strip()
        except Exception as exc:
            raise EngineFailed(f"Whisper failed: {exc}") from exc
        return Transcript(text, len(pcm) / 2 / rate, time.perf_counter() - start, info.language)
