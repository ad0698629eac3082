"""`voicebot doctor`: every engine loads, warms up, and a real round trip works."""

from __future__ import annotations

import json
import subprocess
import sys

from bot.wording import word_errors

from .conftest import ROOT


def test_doctor_round_trip_on_the_default_pack() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bot", "doctor", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["ok"], report
    assert set(report["load_s"]) == set(report["warm_up_s"]) == {"stt", "llm", "tts"}
    assert report["engines"] == {  # what runs where
        "stt": "whisper-tiny.en on cpu (int8)",
        "llm": "qwen2.5-0.5b on cpu",
        "tts": "kokoro kokoro-v1.0-int8 on cpu",
    }
    assert report["stt"]["word_error_rate"] <= 0.2
    # The model samples its answer; any real answer has words (usually "Paris").
    assert len(report["llm"]["reply"].split()) >= 2 and report["llm"]["tokens"] >= 2
    assert 0 < report["tts"]["first_audio_s"] <= report["tts"]["total_s"]
    assert report["tts"]["audio_s"] > 1.0


def test_doctor_fails_clearly_when_a_model_is_missing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {
        "VOICEBOT_MODELS_LLM": str(tmp_path / "missing.gguf"),
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    out = subprocess.run(
        [sys.executable, "-m", "bot", "doctor"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1
    assert "doctor: FAILED: model" in out.stdout and "missing.gguf" in out.stdout


def test_word_error_rate() -> None:
    assert word_errors("the quick brown fox", "the quick brown fox") == (0, 4)
    assert word_errors("the quick brown fox", "a quick fox jumps") == (3, 4)
    assert word_errors("Hello, world!", "hello world") == (0, 2)
