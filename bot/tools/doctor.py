"""What each engine resolved to, and a real round trip through all three engines."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

import numpy as np

from ..audio import float_to_pcm, resample
from ..config import ModelSettings, Settings
from ..engines import EngineError, ModelUnavailable, models
from ..engines.base import Usage
from ..engines.stack import Engines, describe, options, probe, remote_urls
from ..wording import word_errors

DOCTOR_SENTENCE: Final = "The quick brown fox jumps over the lazy dog."
DOCTOR_QUESTION: Final = "What is the capital of France? Answer in one short sentence."
MAX_WER: Final = 0.5


def models_report(settings: Settings) -> list[dict[str, Any]]:
    """One row per engine: the model, where it resolved (source, path), size, sha256, status;
    for an engine on a server, the server and what it says it serves."""
    m = settings.models
    stt_o, llm_o, tts_o = options(m)
    remote = remote_urls(m)
    rows = []
    for engine, name, job in (
        ("stt", stt_o.model, "stt"),
        ("llm", llm_o.model, "llm"),
        ("tts", tts_o.model, f"tts-{tts_o.engine}"),
    ):
        if engine in remote:
            rows.append(_server_row(m, engine, remote[engine]))
        else:
            rows.append(_local_row(engine, name, job))
    return rows


def _local_row(engine: str, name: str, job: str) -> dict[str, Any]:
    row: dict[str, Any] = {"engine": engine, "model": name}
    try:
        resolved = models.resolve(name.split(":")[0], job)
        row.update(resolved.describe())
        main = resolved.path if resolved.paths else None
        if main is not None and main.is_dir():
            main = main / "model.bin"
        if main is not None and main.is_file():
            row["size"] = main.stat().st_size
            row["sha256"] = resolved.sha256 or models.sha256_file(main)
        row["status"] = "ok" if resolved.source != "huggingface" else "downloads on first use"
    except ModelUnavailable as exc:
        row["status"] = f"missing: {exc}"
    return row


def _server_row(m: ModelSettings, engine: str, url: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "engine": engine,
        "model": f"{m.llm} at {url}" if engine == "llm" and m.llm else url,
        "source": "server",
    }
    try:
        row["status"] = f"ok: {probe(m, engine)}"
    except ModelUnavailable as exc:
        row["status"] = f"unreachable: {exc}"
    return row


def run(settings: Settings, say: Callable[[str], None]) -> dict[str, Any]:
    """Loads and warms the engines, then TTS -> 8 kHz -> STT, and one LLM answer."""
    report: dict[str, Any] = {
        "pack": settings.models.pack,
        "engines": describe(settings.models),
        "ok": False,
    }
    try:
        engines = Engines(settings.models, log=say)
        report["engines"] = engines.where()
        engines.warm_up()
        report["load_s"] = {k: round(v, 3) for k, v in engines.timing.load.items()}
        report["warm_up_s"] = {k: round(v, 3) for k, v in engines.timing.warm_up.items()}
        say("round trip: TTS -> 8 kHz -> STT ...")
        start = time.perf_counter()
        first: float | None = None
        chunks = []
        for chunk in engines.tts.synthesize(DOCTOR_SENTENCE):
            first = first if first is not None else time.perf_counter() - start
            chunks.append(chunk)
        tts_s = time.perf_counter() - start
        audio = np.concatenate(chunks)
        audio_s = len(audio) / engines.tts.native_rate
        pcm = float_to_pcm(resample(audio, engines.tts.native_rate, 8000))
        heard = engines.stt.transcribe(pcm, 8000)
        errors, words = word_errors(DOCTOR_SENTENCE, heard.text)
        report["tts"] = {
            "text": DOCTOR_SENTENCE,
            "first_audio_s": round(first or 0.0, 3),
            "total_s": round(tts_s, 3),
            "audio_s": round(audio_s, 3),
            "real_time_factor": round(tts_s / audio_s, 3),
        }
        report["stt"] = {
            "heard": heard.text,
            "seconds": round(heard.seconds, 3),
            "word_error_rate": round(errors / words, 3),
        }
        say("asking the LLM ...")
        usage = Usage()
        question = [{"role": "user", "content": DOCTOR_QUESTION}]
        reply = "".join(engines.llm.stream(question, usage=usage)).strip()
        report["llm"] = {
            "question": DOCTOR_QUESTION,
            "reply": reply,
            "first_token_s": round(usage.first_token_s or 0.0, 3),
            "total_s": round(usage.total_s, 3),
            "tokens": usage.completion_tokens,
        }
        report["ok"] = errors / words <= MAX_WER and bool(reply)
        if not report["ok"]:
            report["error"] = (
                f"round trip heard {heard.text!r} (word error rate {errors / words:.0%})"
                if errors / words > MAX_WER
                else "the LLM gave an empty reply"
            )
    except EngineError as exc:
        report["error"] = str(exc)
    return report


def render(report: dict[str, Any]) -> str:
    if "load_s" not in report:
        return f"doctor: FAILED: {report.get('error')}"
    lines = [
        "engines: " + ", ".join(f"{k} {v}" for k, v in report["engines"].items()),
        "load:    " + ", ".join(f"{k} {v:.2f} s" for k, v in report["load_s"].items()),
        "warm-up: " + ", ".join(f"{k} {v:.2f} s" for k, v in report["warm_up_s"].items()),
    ]
    if "tts" in report:
        t, s = report["tts"], report["stt"]
        lines.append(
            f"TTS: {t['audio_s']:.2f} s of speech in {t['total_s']:.2f} s "
            f"(first audio {t['first_audio_s']:.2f} s, real-time factor "
            f"{t['real_time_factor']:.2f})"
        )
        lines.append(
            f"STT: heard {s['heard']!r} in {s['seconds']:.2f} s "
            f"(word error rate {s['word_error_rate']:.0%})"
        )
    if "llm" in report:
        m = report["llm"]
        lines.append(
            f"LLM: {m['reply']!r}: first token {m['first_token_s']:.2f} s, "
            f"{m['tokens']} tokens in {m['total_s']:.2f} s"
        )
    lines.append(
        "doctor: all engines work" if report["ok"] else f"doctor: FAILED: {report['error']}"
    )
    return "\n".join(lines)
