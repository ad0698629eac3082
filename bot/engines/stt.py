"""Speech to text with faster-whisper (CTranslate2).

Telephone audio is 8 kHz; Whisper wants 16 kHz, so caller audio goes through the anti-aliasing
resampler first. The model is loaded once per process and shared; transcription is blocking
(call it from an executor). CTranslate2 releases the GIL while it decodes.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from ..audio import pcm_to_float, resample
from ..config import MODEL_PACKS, ModelSettings, default
from ..wording import words
from . import Activity, EngineFailed, ModelUnavailable, devices
from .base import Transcript
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


TOKENS_BASE: Final = 8  # the most tokens a transcript of an utterance may have: this many,
TOKENS_PER_S: Final = 6  # and this many per second of audio


@dataclass(frozen=True, slots=True)
class SttOptions:
    # catalogue name, path, HF repo, or a faster-whisper size
    model: str = MODEL_PACKS["default"]["stt"]
    beam_size: int = default(ModelSettings, "stt_beam_size")
    device: str = default(ModelSettings, "stt_device")  # auto | cpu | cuda
    compute_type: str = default(ModelSettings, "stt_compute_type")  # "": by device
    threads: int = default(ModelSettings, "stt_threads")
    language: str | None = "en"
    # Whisper pads every input to 30 s, which is most of its cost for a 1-3 s phone turn. An
    # utterance shorter than this window is encoded padded to the window only (10 s measured
    # as fast as 3x with no more word errors; below ~7 s Whisper starts repeating itself).
    # 0 disables the short path.
    window_s: float = 10.0


class WhisperStt:
    def __init__(
        self,
        options: SttOptions | None = None,
        *,
        progress: bool = True,
        activity: Activity | None = None,
    ) -> None:
        self.options = options or SttOptions()
        self.activity = activity or Activity()
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
        want = self.options.device
        self.device = devices.choose(
            "models.stt_device",
            want,
            want != "cpu" and devices.ctranslate2_cuda(),
            "CTranslate2 sees no CUDA device (a GPU, its driver, CUDA 12 and cuDNN 9)",
        )
        self.compute_type = devices.stt_compute_type(self.options.compute_type, self.device)
        try:
            self._model: Any = WhisperModel(
                source,
                device=self.device,
                compute_type=self.compute_type,
                cpu_threads=self.options.threads,
            )
        except Exception as exc:
            raise ModelUnavailable(f"cannot load Whisper model {name!r}: {exc}") from exc
        self._lock = threading.Lock()
        self._short: _ShortWindow | None = None
        if self.options.window_s:
            self._short = _ShortWindow(self._model, self.options)

    def transcribe(self, pcm: bytes, rate: int) -> Transcript:
        """Transcribes 16-bit mono PCM at ``rate``; blocking."""
        start = time.perf_counter()
        audio = pcm_to_float(pcm)
        if rate != WHISPER_RATE:
            audio = resample(audio, rate, WHISPER_RATE)
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        o = self.options
        window = self.options.window_s
        if self._short is not None and len(audio) / WHISPER_RATE <= window - 0.5:
            try:
                with self._lock, self.activity.running("stt"):
                    text, confidence = self._short.transcribe(audio)
            except Exception as exc:
                raise EngineFailed(f"Whisper failed: {exc}") from exc
            seconds = time.perf_counter() - start
            return Transcript(text, len(pcm) / 2 / rate, seconds, o.language, confidence)
        try:
            # One decode at a time per model: CTranslate2 uses all its threads.
            with self._lock, self.activity.running("stt"):
                segments, info = self._model.transcribe(
                    audio,
                    language=o.language,
                    beam_size=o.beam_size,
                    condition_on_previous_text=False,
                    without_timestamps=True,
                    vad_filter=False,
                )
                said = list(segments)
                text = " ".join(s.text.strip() for s in said).strip()
        except Exception as exc:
            raise EngineFailed(f"Whisper failed: {exc}") from exc
        logprob = float(np.mean([s.avg_logprob for s in said])) if said else None
        seconds = time.perf_counter() - start
        return Transcript(text, len(pcm) / 2 / rate, seconds, info.language, logprob)


class _ShortWindow:
    """Whisper on a short window: the same features, encoder and greedy/beam decoder that
    faster-whisper drives, without padding a 2 s utterance to 30 s."""

    def __init__(self, model: Any, options: SttOptions) -> None:
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        self._model = model
        self._frames = int(options.window_s * 100)  # 10 ms hop
        self._tokenizer = Tokenizer(
            model.hf_tokenizer,
            model.model.is_multilingual,
            task="transcribe",
            language=options.language or "en",
        )
        self._prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        self._suppress = list(get_suppressed_tokens(self._tokenizer, (-1,)) or ())
        self._beam = options.beam_size

    def transcribe(self, audio: np.ndarray) -> tuple[str, float]:
        """The words, and the mean log-probability of their tokens."""
        # Speech is ~3 words (~4 tokens) a second: a longer output is Whisper looping on noise
        # or silence ("Can I talk to a person? Can I talk to a person? Can ..."): cut it off.
        tokens = min(200, TOKENS_BASE + int(TOKENS_PER_S * len(audio) / WHISPER_RATE))
        samples = self._frames * 160
        padded = np.zeros(samples, dtype=np.float32)
        padded[: min(len(audio), samples)] = audio[:samples]
        features = self._model.feature_extractor(padded, padding=0)[:, : self._frames]
        encoded = self._model.encode(np.ascontiguousarray(features))
        result = self._model.model.generate(
            encoded,
            [self._prompt],
            beam_size=self._beam,
            max_length=len(self._prompt) + tokens,
            suppress_blank=True,
            suppress_tokens=self._suppress,
            return_scores=True,
        )[0]
        text = unlooped(str(self._tokenizer.decode(result.sequences_ids[0])).strip())
        return text, float(result.scores[0])


def unlooped(text: str) -> str:
    """``text`` without a sentence said again right after itself, or the start of one again
    at the end: Whisper looping, not the caller repeating."""
    kept: list[tuple[str, str]] = []  # (sentence, its words)
    for sentence in re.findall(r"[^.!?]+[.!?]*", text):
        key = " ".join(words(sentence))
        if key and (not kept or key != kept[-1][1]):
            kept.append((sentence, key))
    cut_short = len(kept) > 1 and not re.search(r"[.!?]$", kept[-1][0].strip())
    if cut_short and any(key.startswith(kept[-1][1]) for _, key in kept[:-1]):
        kept.pop()
    return "".join(sentence for sentence, _ in kept).strip()
