"""`voicebot bench engines`: per engine and backend, each in its own process (for a clean RSS).

Cold load, warm-up, time to first output (first audio chunk, first token, or a whole short
transcript), throughput (real-time factor, tokens per second), and peak resident memory.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

from ..config import ModelSettings

if TYPE_CHECKING:
    from ..engines.llm import LlmOptions
    from ..engines.stt import SttOptions
    from ..engines.tts import TtsOptions

TTS_TEXTS: Final = (
    "Sure, I can help with that.",
    "Your appointment is on Tuesday at three in the afternoon.",
    "I'm sorry to hear that. Let me see what I can do for you right now.",
)
LLM_QUESTIONS: Final = (
    "What time do you open tomorrow?",
    "Can you tell me a fun fact about the moon?",
    "I'd like to book a table for two tonight.",
)
CASES: Final = ("stt", "llm", "tts-kokoro-onnx", "tts-piper")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(case: str, settings: ModelSettings) -> dict[str, Any]:
    from ..engines.stack import options

    stt_o, llm_o, tts_o = options(settings)
    out: dict[str, Any] = {"case": case}
    if case.startswith("tts"):
        _measure_tts(case, tts_o, out)
    elif case == "stt":
        _measure_stt(stt_o, out)
    elif case == "llm":
        _measure_llm(llm_o, out)
    else:
        raise ValueError(f"unknown case {case!r} (cases: {', '.join(CASES)})")
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _measure_tts(case: str, tts_o: TtsOptions, out: dict[str, Any]) -> None:
    from ..engines.tts import create

    if case == "tts-piper":
        tts_o = replace(tts_o, engine="piper", model="piper-joe-medium")
    else:
        tts_o = replace(tts_o, engine="kokoro", backend="onnx")
    start = time.perf_counter()
    engine = create(tts_o, progress=False)
    out["model"] = tts_o.model
    out["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    list(engine.synthesize("Hello!"))
    out["warm_up_s"] = time.perf_counter() - start
    firsts, rtfs = [], []
    for text in TTS_TEXTS:
        t0 = time.perf_counter()
        first = None
        samples = 0
        for chunk in engine.synthesize(text):
            first = first if first is not None else time.perf_counter() - t0
            samples += len(chunk)
        total = time.perf_counter() - t0
        firsts.append(first or total)
        rtfs.append(total / (samples / engine.native_rate))
    out["first_audio_s"] = firsts
    out["real_time_factor"] = statistics.median(rtfs)


def _phone_clips() -> list[bytes]:
    """Speech to transcribe, from the other TTS engine (8 kHz, as on the phone)."""
    import numpy as np

    from ..audio import float_to_pcm, resample
    from ..engines.tts import PiperTts, TtsOptions

    voice = PiperTts(TtsOptions(engine="piper", model="piper-joe-medium"), progress=False)
    clips = []
    for text in TTS_TEXTS:
        audio = np.concatenate(list(voice.synthesize(text)))
        clips.append(float_to_pcm(resample(audio, voice.native_rate, 8000)))
    return clips


def _measure_stt(stt_o: SttOptions, out: dict[str, Any]) -> None:
    from ..engines.stt import WhisperStt

    start = time.perf_counter()
    whisper = WhisperStt(stt_o, progress=False)
    out["model"] = stt_o.model
    out["load_s"] = time.perf_counter() - start
    clips = _phone_clips()
    start = time.perf_counter()
    whisper.transcribe(clips[0], 8000)
    out["warm_up_s"] = time.perf_counter() - start
    seconds, rtfs = [], []
    for pcm in clips:
        t = whisper.transcribe(pcm, 8000)
        seconds.append(t.seconds)
        rtfs.append(t.seconds / t.audio_seconds)
    out["transcribe_s"] = seconds
    out["real_time_factor"] = statistics.median(rtfs)


def _measure_llm(llm_o: LlmOptions, out: dict[str, Any]) -> None:
    from ..conversation.dialogue import Dialogue
    from ..engines.base import Usage
    from ..engines.llm import LlamaLlm

    start = time.perf_counter()
    llm = LlamaLlm(llm_o, progress=False)
    out["model"] = llm_o.model
    out["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    llm.warm_up()
    out["warm_up_s"] = time.perf_counter() - start
    conv = Dialogue(llm, max_tokens=llm_o.max_tokens)
    firsts, rates = [], []
    for question in LLM_QUESTIONS:
        usage = Usage()
        "".join(conv.reply(question, usage=usage))
        firsts.append(usage.first_token_s or usage.total_s)
        decode = usage.total_s - (usage.first_token_s or 0)
        if usage.completion_tokens > 1 and decode > 0:
            rates.append((usage.completion_tokens - 1) / decode)
    out["first_token_s"] = firsts
    out["tokens_per_s"] = statistics.median(rates) if rates else None


def run_all(
    settings: ModelSettings, cases: tuple[str, ...] = CASES, progress: bool = True
) -> list[dict[str, Any]]:
    results = []
    for case in cases:
        if progress:
            print(f"bench engines: {case} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "bot.tools.bench_engines", case, json.dumps(_as_dict(settings))],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            results.append({"case": case, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def _as_dict(settings: ModelSettings) -> dict[str, Any]:
    return {f: getattr(settings, f) for f in settings.__dataclass_fields__}


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'engine':<16} {'model':<18} {'load':>6} {'warm':>6} {'first output (s)':>22} "
        f"{'speed':>14} {'RSS':>8}"
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<16} FAILED: {' '.join(r['error'])}")
            continue
        firsts = r.get("first_audio_s") or r.get("first_token_s") or r.get("transcribe_s") or []
        if "tokens_per_s" in r:
            speed = f"{r['tokens_per_s'] or 0:.1f} tok/s"
        else:
            speed = f"RTF {r['real_time_factor']:.3f}"
        lines.append(
            f"{r['case']:<16} {r['model']:<18} {r['load_s']:>5.2f}s {r['warm_up_s']:>5.2f}s "
            f"{' / '.join(f'{x:.2f}' for x in firsts):>22} {speed:>14} "
            f"{r['peak_rss_mb']:>6.0f}MB"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    case, raw = sys.argv[1], json.loads(sys.argv[2])
    result = _measure(case, ModelSettings(**raw))
    print(json.dumps(result))
