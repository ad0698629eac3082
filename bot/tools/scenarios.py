"""Caller turns for benchmarks and end-to-end tests, generated rather than shipped as WAVs.

Voices other than the bot's: Piper's en_US-joe-medium (a neural TTS voice), Kokoro's other voices
and, where Debian's ``espeak-ng`` and ``flite`` are installed, theirs. Every turn is made
phone-band (8 kHz, 300-3400 Hz); some get background noise, some a pause in the middle of the
sentence (which must not make the bot answer early).
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from ..audio import float_to_pcm, pcm_to_float, read_wav, resample

QUESTIONS: Final = (
    "What time do you open tomorrow?",
    "Can you tell me a fun fact about the moon?",
    "I would like to book a table for two, tonight at eight.",
    "What is the capital of France?",
    "How do I reset my password?",
    "Is it going to rain this weekend?",
    "Could you recommend a good book, please?",
    "My order has not arrived yet, what should I do?",
)


# espeak-ng's English voices with different accents and speakers (US, British RP, Scottish,
# Caribbean, a US woman).
ESPEAK_VOICES: Final = ("en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us+f3")
# Flite's voices built from recorded speakers (CMU ARCTIC: a US woman, a US man, a Scottish man;
# KAL, an older diphone voice).
FLITE_VOICES: Final = ("slt", "rms", "awb", "kal16")
# Kokoro v1.0's voices in the offline pack (the bot speaks with one of them).
KOKORO_VOICES: Final = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
ESPEAK_WPM: Final = 160  # espeak-ng's speaking rate, words a minute
# A caller asked to say it again says it slower: this fraction of the voice's own speed.
SLOWER: Final = 0.8


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    turns: tuple[bytes, ...]  # 8 kHz PCM, one per caller turn
    texts: tuple[str, ...]


PHONE_BAND_TAPS: Final = 255  # ~170 Hz transitions, ringing within +-16 ms of a sound


def phone_band(samples: np.ndarray, rate: int) -> np.ndarray:
    """8 kHz, 300-3400 Hz, like a G.711 call.

    A windowed-sinc FIR, not a brick wall on the whole clip's spectrum: a brick wall smears
    every sound over the whole clip (at about -45 dBFS), so a caller's pauses and the quiet
    after the last word were never quiet.
    """
    x = resample(samples, rate, 8000) if rate != 8000 else samples.astype(np.float32)
    out: np.ndarray = np.convolve(x, _band_pass(), mode="same").astype(np.float32)
    return out


def _band_pass(low: float = 300.0, high: float = 3400.0, rate: int = 8000) -> np.ndarray:
    n = np.arange(PHONE_BAND_TAPS) - (PHONE_BAND_TAPS - 1) / 2
    lowpass = [2 * f / rate * np.sinc(2 * f / rate * n) for f in (high, low)]
    taps: np.ndarray = (lowpass[0] - lowpass[1]) * np.blackman(PHONE_BAND_TAPS)
    return taps


def with_noise(x: np.ndarray, dbfs: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(len(x)).astype(np.float32) * (10 ** (dbfs / 20))
    out: np.ndarray = np.clip(x + noise, -1, 1)
    return out


class Voices:
    """Caller voices: ``piper`` (en_US-joe-medium), ``espeak:VOICE`` and ``flite:VOICE``
    (Debian's espeak-ng and flite, where installed) and ``kokoro:VOICE`` (a Kokoro voice other
    than the bot's, loaded on first use).
    """

    def __init__(self) -> None:
        self.espeak = shutil.which("espeak-ng")
        self.flite = shutil.which("flite")
        self._engines: dict[tuple[str, bool], Any] = {}  # Piper, Kokoro: at two speeds

    def available(self, bot_voice: str) -> list[str]:
        """Every caller voice this machine has, never ``bot_voice``; the engines take turns,
        so a few voices in a row are of different kinds."""
        kinds = [["piper"], [f"kokoro:{v}" for v in KOKORO_VOICES if v != bot_voice]]
        if self.espeak:
            kinds.append([f"espeak:{v}" for v in ESPEAK_VOICES])
        if self.flite:
            kinds.append([f"flite:{v}" for v in FLITE_VOICES])
        return [v for row in itertools.zip_longest(*kinds) for v in row if v is not None]

    def say(self, text: str, voice: str, *, slower: bool = False) -> np.ndarray:
        """8 kHz phone-band float audio of ``text``; ``slower``: as a caller who was asked to
        say it again says it, at ``SLOWER`` of the voice's speed."""
        engine, _, name = voice.partition(":")
        if engine in ("piper", "kokoro"):
            tts = self._engine(engine, slower)
            chunks = tts.synthesize(text, name) if name else tts.synthesize(text)
            return phone_band(np.concatenate(list(chunks)), tts.native_rate)
        if engine == "flite":
            return self._flite(text, name, slower)
        return self._espeak(text, name or voice, slower)

    def _engine(self, engine: str, slower: bool) -> Any:
        from ..engines.tts import KokoroOnnx, PiperTts, TtsOptions

        key = (engine, slower)
        if key not in self._engines:
            speed = SLOWER if slower else 1.0
            if engine == "piper":
                options = TtsOptions(engine="piper", model="piper-joe-medium", voice="")
                self._engines[key] = PiperTts(replace(options, speed=speed), progress=False)
            else:
                self._engines[key] = KokoroOnnx(TtsOptions(speed=speed), progress=False)
        return self._engines[key]

    def _espeak(self, text: str, voice: str, slower: bool) -> np.ndarray:
        if self.espeak is None:
            raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
        espeak, wpm = self.espeak, str(round(ESPEAK_WPM * (SLOWER if slower else 1.0)))
        return _spoken_wav(lambda wav: [espeak, "-v", voice, "-s", wpm, "-w", wav, text])

    def _flite(self, text: str, voice: str, slower: bool) -> np.ndarray:
        if self.flite is None:
            raise RuntimeError("flite is not installed (apt-get install flite)")
        flite, stretch = self.flite, f"{1 / SLOWER if slower else 1.0:.3f}"
        return _spoken_wav(
            lambda wav: [
                *(flite, "-voice", voice, "--setf", f"duration_stretch={stretch}"),
                *("-t", text, "-o", wav),
            ]
        )


def _spoken_wav(command: Callable[[str], list[str]]) -> np.ndarray:
    """Phone-band audio of what ``command`` (given the WAV path to write) speaks."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = str(Path(tmp) / "turn.wav")
        subprocess.run(command(wav), check=True, capture_output=True)
        x = pcm_to_float(read_wav(wav, 16000))
    return phone_band(x, 16000)


def generate(count: int = 8, *, seed: int = 1) -> list[Scenario]:
    """``count`` two-turn calls mixing voices, noise and mid-sentence pauses."""
    voices = Voices()
    names = ["piper"] + (["espeak:en-us+m3", "espeak:en-us+f2"] if voices.espeak else [])
    out = []
    for i in range(count):
        voice = names[i % len(names)]
        texts = (QUESTIONS[i % len(QUESTIONS)], QUESTIONS[(i + 3) % len(QUESTIONS)])
        turns = []
        variants = []
        for j, text in enumerate(texts):
            if (i + j) % 3 == 2 and "," in text:
                # A 400 ms pause mid-sentence, where a caller takes a breath.
                head, tail = text.split(",", 1)
                x = np.concatenate(
                    [
                        voices.say(head + ",", voice),
                        np.zeros(3200, np.float32),
                        voices.say(tail.strip(), voice),
                    ]
                )
                variants.append("pause")
            else:
                x = voices.say(text, voice)
            if (i + j) % 4 == 1:
                x = with_noise(x, -40.0, seed + i * 10 + j)
                variants.append("noise")
            # A little silence around the speech, as a phone line has.
            x = np.concatenate([np.zeros(800, np.float32), x, np.zeros(800, np.float32)])
            turns.append(float_to_pcm(x))
        name = f"call{i + 1}-{voice}" + ("-" + "-".join(sorted(set(variants))) if variants else "")
        out.append(Scenario(name, tuple(turns), texts))
    return out
