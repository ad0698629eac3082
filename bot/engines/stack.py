"""The three engines a conversation needs, chosen from settings, loaded once and warmed up."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from ..config import MODEL_PACKS, ModelSettings
from . import Activity, EngineError
from .base import TtsEngine
from .llm import LlamaLlm, LlmOptions
from .stt import SttOptions, WhisperStt
from .tts import KokoroTorch, TtsOptions, create

WARM_UP_PHRASES: Final = ("Hello!", "Thanks for calling, how can I help you today?", "Goodbye.")


def options(m: ModelSettings) -> tuple[SttOptions, LlmOptions, TtsOptions]:
    pack = MODEL_PACKS[m.pack]
    stt = SttOptions(model=m.stt or pack["stt"], beam_size=m.stt_beam_size, threads=m.stt_threads)
    llm = LlmOptions(
        model=m.llm or pack["llm"],
        threads=m.threads,
        max_tokens=m.llm_max_tokens,
        n_ctx=m.llm_n_ctx,
        parallel=m.llm_parallel,
        extra_buffers=m.llm_extra_buffers,
    )
    engine = m.tts_engine or pack["tts_engine"]
    tts = TtsOptions(
        engine=engine,
        backend=m.tts_backend,
        model=m.tts or pack["tts"],
        voice=m.voice or pack["voice"],
        threads=m.threads,
        streaming=m.tts_streaming,
        vocoder=m.tts_vocoder,
    )
    return stt, llm, tts


def openmp_beside_pytorch(llm: LlamaLlm, tts: TtsEngine) -> bool:
    """llama.cpp on OpenMP in a process where PyTorch runs the TTS (see bot/engines/llm.py)."""
    streaming = getattr(tts, "streaming", None)
    on_torch = isinstance(tts, KokoroTorch) or getattr(streaming, "vocoder", None) is not None
    return llm.openmp and on_torch


@dataclass
class Timing:
    load: dict[str, float] = field(default_factory=dict)
    warm_up: dict[str, float] = field(default_factory=dict)


class Engines:
    """STT, LLM and TTS for every call of this process (shared; per-call state lives elsewhere)."""

    def __init__(
        self,
        settings: ModelSettings,
        *,
        log: Callable[[str], None] | None = None,
        activity: Activity | None = None,
    ) -> None:
        self.settings = settings
        self.activity = activity or Activity()  # the process's scheduler, shared with calls
        self.timing = Timing()
        say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        stt_o, llm_o, tts_o = options(settings)
        start = time.perf_counter()
        say(f"loading STT {stt_o.model} ...")
        self.stt = WhisperStt(stt_o, activity=self.activity)
        self.timing.load["stt"] = time.perf_counter() - start
        start = time.perf_counter()
        say(f"loading LLM {llm_o.model} ...")
        self.llm = LlamaLlm(llm_o, activity=self.activity)
        self.timing.load["llm"] = time.perf_counter() - start
        start = time.perf_counter()
        say(f"loading TTS {tts_o.engine} {tts_o.model} ...")
        self.tts: TtsEngine = create(tts_o, activity=self.activity)
        self.timing.load["tts"] = time.perf_counter() - start
        self._say = say
        if openmp_beside_pytorch(self.llm, self.tts):
            say(
                "warning: llama.cpp was built with OpenMP and the TTS runs on PyTorch: they share "
                "libgomp, which then slows every LLM prompt ~1.5x; rebuild llama-cpp-python with "
                "CMAKE_ARGS=-DGGML_OPENMP=OFF (scripts/bootstrap does)"
            )

    def warm_up(self) -> None:
        """Runs every engine once: the first inference after load is several times slower."""
        start = time.perf_counter()
        self._say("warming up TTS ...")
        audio = [np.concatenate(list(self.tts.synthesize(p))) for p in WARM_UP_PHRASES]
        with self.activity.running("warm-up"):  # the paths a run takes beside another engine
            for _ in self.tts.synthesize(WARM_UP_PHRASES[1]):
                pass
        self.timing.warm_up["tts"] = time.perf_counter() - start
        start = time.perf_counter()
        self._say("warming up STT ...")
        from ..audio import float_to_pcm

        pcm = float_to_pcm(audio[1])
        self.stt.transcribe(pcm, self.tts.native_rate)
        self.timing.warm_up["stt"] = time.perf_counter() - start
        start = time.perf_counter()
        self._say("warming up LLM ...")
        if not self.llm.warm_up().strip():
            raise EngineError("LLM warm-up produced no text")
        self.timing.warm_up["llm"] = time.perf_counter() - start

    def load_llm(self, model: str) -> LlamaLlm:
        """Another LLM (a profile's own), with the same settings as this one, warmed up."""
        return load_llm(self.settings, model, self.activity)


def load_llm(settings: ModelSettings, model: str, activity: Activity | None = None) -> LlamaLlm:
    """LLM ``model`` with the rest of ``settings``, warmed up."""
    _, llm_options, _ = options(settings)
    llm = LlamaLlm(dataclasses.replace(llm_options, model=model), activity=activity)
    llm.warm_up()
    return llm
