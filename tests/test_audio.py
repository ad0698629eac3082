"""PCM helpers, WAV I/O and the anti-aliasing resampler."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bot.audio import (
    Resampler,
    float_to_pcm,
    is_silent,
    pcm_to_float,
    read_wav,
    resample,
    rms_dbfs,
    silence,
    write_wav,
)


def sine(freq: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def level_db(x: np.ndarray, reference: float = 0.5 / math.sqrt(2)) -> float:
    mid = x[len(x) // 4 : -len(x) // 4]  # skip the filter's edges
    return 20 * math.log10(float(np.sqrt(np.mean(mid**2))) / reference)


def test_3khz_passes_16k_to_8k_with_under_1db_loss() -> None:
    assert level_db(resample(sine(3000, 16000), 16000, 8000)) > -1.0


def test_5khz_is_down_at_least_40db_16k_to_8k() -> None:
    # 5 kHz does not exist at 8 kHz: without the filter it would fold back to 3 kHz.
    assert level_db(resample(sine(5000, 16000), 16000, 8000)) < -40.0


@pytest.mark.parametrize(
    ("src", "dst", "freq"),
    [(8000, 16000, 1000), (24000, 8000, 2500), (22050, 16000, 440), (44100, 8000, 3000)],
)
def test_in_band_tones_keep_their_level_and_length(src: int, dst: int, freq: float) -> None:
    y = resample(sine(freq, src), src, dst)
    assert len(y) == dst
    assert abs(level_db(y)) < 0.5
    # and their frequency: the spectrum peaks where the tone is
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * dst / len(y) - freq) < 2


def test_streaming_in_odd_chunks_equals_one_shot() -> None:
    rng = np.random.default_rng(1)
    x = (0.1 * rng.standard_normal(12345)).astype(np.float32)
    r = Resampler(24000, 8000)
    parts = [r.process(x[i : i + 777]) for i in range(0, len(x), 777)] + [r.flush()]
    np.testing.assert_allclose(np.concatenate(parts), resample(x, 24000, 8000), atol=1e-6)


def test_no_delay_is_added() -> None:
    x = np.zeros(16000, np.float32)
    x[8000] = 1.0
    assert int(np.argmax(resample(x, 16000, 8000))) == 4000
    assert int(np.argmax(resample(x, 16000, 48000))) == 24000


def test_flush_ends_the_stream() -> None:
    r = Resampler(8000, 16000)
    r.flush()
    with pytest.raises(RuntimeError, match="already flushed"):
        r.process(np.zeros(10))
    with pytest.raises(ValueError, match="must be positive"):
        Resampler(0, 8000)


def test_pcm_conversions_and_levels() -> None:
    pcm = float_to_pcm(np.array([0.0, 0.5, -1.0, 2.0]))
    assert np.frombuffer(pcm, "<i2").tolist() == [0, 16384, -32768, 32767]
    assert pcm_to_float(pcm)[1] == 0.5
    assert rms_dbfs(silence(8000)) == -math.inf and is_silent(silence(8000))
    assert rms_dbfs(float_to_pcm(np.ones(160))) == pytest.approx(0.0, abs=0.01)
    assert not is_silent(float_to_pcm(sine(440, 8000, 0.02) * 0.1))


def test_wav_round_trip_with_resampling_and_stereo(tmp_path: Path) -> None:
    import wave

    path = tmp_path / "stereo.wav"
    left = float_to_pcm(sine(440, 16000, 0.5))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        both = np.stack([np.frombuffer(left, "<i2")] * 2, axis=1)
        w.writeframes(both.tobytes())
    pcm = read_wav(str(path), 8000)
    assert len(pcm) == 2 * 4000
    assert abs(level_db(pcm_to_float(pcm))) < 0.5
    mono = tmp_path / "mono.wav"
    write_wav(str(mono), pcm, 8000)
    assert read_wav(str(mono), 8000) == pcm


def test_unsupported_wav_is_refused_clearly(tmp_path: Path) -> None:
    import wave

    path = tmp_path / "8bit.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(bytes(100))
    with pytest.raises(ValueError, match="8-bit samples; only 16-bit PCM"):
        read_wav(str(path), 8000)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not a wav")
    with pytest.raises(ValueError, match="not a PCM WAV file"):
        read_wav(str(junk), 8000)


def test_leading_silence_is_measured_in_5ms_steps_keeping_20ms() -> None:
    from bot.audio import leading_silence

    quiet = bytes(2 * 2400)  # 300 ms at 8 kHz
    loud = float_to_pcm(sine(440, 8000, 0.2))
    cut = leading_silence(quiet + loud, 8000)
    assert cut == 2 * (2400 - 160)  # 300 ms of breath minus the 20 ms kept before the voice
    assert leading_silence(loud, 8000) == 0
    assert leading_silence(quiet, 8000) == len(quiet) - 320  # all quiet: keep 20 ms
