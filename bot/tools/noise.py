"""Backgrounds a caller may call from, made offline: pink noise, babble, and a TV (music with a
talker). Each is a loop of float audio at 8 kHz; :func:`at_snr` scales it under a caller's
speech to a signal-to-noise ratio measured on the speech's voiced frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np

from ..audio import FRAME_SECONDS

RATE: Final = 8000
KINDS: Final = ("pink", "babble", "tv")


def pink(seconds: float, seed: int) -> np.ndarray:
    """Noise with a 1/f spectrum (3 dB less per octave), 300-3400 Hz like the line."""
    n = int(seconds * RATE)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[1:] /= np.sqrt(freqs[1:])
    spectrum[(freqs < 300) | (freqs > 3400)] = 0
    return _unit(np.fft.irfft(spectrum, n))


def babble(talkers: Sequence[np.ndarray], seconds: float, seed: int) -> np.ndarray:
    """Several people talking at once (a cafe): each talker's speech looped from a random
    start, all at the same level."""
    n = int(seconds * RATE)
    rng = np.random.default_rng(seed)
    out = np.zeros(n, dtype=np.float64)
    for speech in talkers:
        x = _unit(speech)
        out += np.resize(np.roll(x, int(rng.integers(len(x)))), n)
    return _unit(out)


def tv(talker: np.ndarray, seconds: float, seed: int) -> np.ndarray:
    """A television in the room: music (chords, a bass line and a beat) under one talker."""
    n = int(seconds * RATE)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / RATE
    music = np.zeros(n)
    beat = 0.5  # seconds
    roots = [220.0, 174.6, 261.6, 196.0]  # A, F, C, G
    for i in range(int(seconds / beat) + 1):
        start, end = int(i * beat * RATE), min(n, int((i + 1) * beat * RATE))
        if start >= n:
            break
        seg = t[start:end] - t[start]
        root = roots[(i // 4) % len(roots)]
        envelope = np.exp(-3 * seg)
        for ratio in (1.0, 1.26, 1.5, 2.0):  # a major chord and its octave
            music[start:end] += envelope * np.sin(2 * np.pi * root * ratio * seg) / ratio
        music[start:end] += 0.8 * envelope * np.sin(2 * np.pi * root / 2 * seg)
        click = min(end - start, int(0.03 * RATE))  # a drum hit on every beat
        music[start : start + click] += rng.standard_normal(click) * np.linspace(1, 0, click)
    speech = np.resize(_unit(talker), n)
    return _unit(_unit(music) + speech)


def at_snr(noise: np.ndarray, speech_rms: float, snr_db: float) -> np.ndarray:
    """``noise`` scaled to ``snr_db`` below a speech level of ``speech_rms``."""
    level = speech_rms / (10 ** (snr_db / 20))
    return (_unit(noise) * level).astype(np.float32)


def voiced_rms(turns: Sequence[np.ndarray], floor_db: float = -45.0) -> float:
    """RMS of the 20 ms frames of ``turns`` with speech in them (above ``floor_db``)."""
    size = int(FRAME_SECONDS * RATE)
    frames = [x[i : i + size] for x in turns for i in range(0, len(x) - size + 1, size)]
    powers = np.array([float(np.mean(f.astype(np.float64) ** 2)) for f in frames])
    voiced = powers[powers > 10 ** (floor_db / 10)]
    return float(np.sqrt(voiced.mean())) if len(voiced) else 0.0


def _unit(x: np.ndarray) -> np.ndarray:
    """Scaled to an RMS of 1."""
    x = np.asarray(x, dtype=np.float64)
    rms = float(np.sqrt(np.mean(x**2)))
    return x / rms if rms > 0 else x
