"""The three engines a conversation needs, chosen from settings, loaded once and warmed up."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np

from ..config import DEFAULT_SYSTEM_PROMPT, MODEL_PACKS, ModelSettings
from . import Activity, EngineError
from .base import LlmEngine, SttEngine, TtsEngine
from .llm import LlamaLlm, LlmOptions
from .stt import SttOptions, WhisperStt
from .tts import KokoroTorch, TtsOptions, create

if TYPE_CHECKING:
    from .wyoming import WyomingOptions

WARM_UP_PHRASES: Final = ("Hello!", "Thanks for calling, how can I help you today?", "Goodbye.")


def options(m: ModelSettings) -> tuple[SttOptions, LlmOptions, TtsOptions]:
    pack = MODEL_PACKS[m.pack]
    stt = SttOptions(
        model=m.stt or pack["stt"],
        beam_size=m.stt_beam_size,
        threads=m.stt_threads,
        device=m.stt_device,
        compute_type=m.stt_compute_type,
    )
    llm = LlmOptions(
        model=m.llm or pack["llm"],
        threads=m.threads,
        max_tokens=m.llm_max_tokens,
        n_ctx=m.llm_n_ctx,
        parallel=m.llm_parallel,
        extra_buffers=m.llm_extra_buffers,
        gpu_layers=m.llm_gpu_layers,
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
        device=m.tts_device,
    )
    return stt, llm, tts


def remote_options(m: ModelSettings, url: str, *, voice: str = "") -> WyomingOptions:
    from .wyoming import WyomingOptions

    return WyomingOptions(
        url=url,
        voice=voice,
        connect_timeout_s=m.connect_timeout_s,
        read_timeout_s=m.read_timeout_s,
    )


def make_stt(m: ModelSettings, activity: Activity) -> SttEngine:
    """The STT ``[models]`` chooses: Whisper in this process, or a Wyoming server."""
    if m.stt_engine == "wyoming":
        from .wyoming import WyomingStt

        return WyomingStt(remote_options(m, m.stt_url), activity=activity)
    return WhisperStt(options(m)[0], activity=activity)


def make_llm(m: ModelSettings, model: str, activity: Activity) -> LlmEngine:
    """LLM ``model`` as ``[models]`` runs it: llama.cpp in this process, or a server's
    OpenAI-compatible API (``model`` is then the server's name for it)."""
    if m.llm_engine == "openai":
        from .remote_llm import OpenAiLlm, RemoteLlmOptions

        llm_o = options(m)[1]
        return OpenAiLlm(
            RemoteLlmOptions(
                url=m.llm_url,
                model=m.llm,
                api_key=m.llm_api_key,
                llama_fields=m.llm_llama_fields,
                n_ctx=llm_o.n_ctx,
                max_tokens=llm_o.max_tokens,
                connect_timeout_s=m.connect_timeout_s,
                read_timeout_s=m.read_timeout_s,
            )
        )
    return LlamaLlm(dataclasses.replace(options(m)[1], model=model), activity=activity)


def make_tts(m: ModelSettings, activity: Activity) -> TtsEngine:
    """The TTS ``[models]`` chooses: Kokoro or Piper in this process, or a Wyoming server
    (speaking with ``voice``, or the server's own default)."""
    if m.tts_engine == "wyoming":
        from .wyoming import WyomingTts

        return WyomingTts(remote_options(m, m.tts_url, voice=m.voice), activity=activity)
    return create(options(m)[2], activity=activity)


def remote_urls(m: ModelSettings) -> dict[str, str]:
    """The engines ``[models]`` puts on servers, with their URLs."""
    chosen = {
        "stt": (m.stt_engine == "wyoming", m.stt_url),
        "llm": (m.llm_engine == "openai", m.llm_url),
        "tts": (m.tts_engine == "wyoming", m.tts_url),
    }
    return {engine: url for engine, (remote, url) in chosen.items() if remote}


def probe(m: ModelSettings, engine: str) -> str:
    """What the server of a remote ``engine`` says it serves, in a line; raises
    ModelUnavailable naming the server when it cannot be asked."""
    url = remote_urls(m)[engine]
    if engine == "llm":
        from .remote_llm import OpenAiLlm, RemoteLlmOptions

        llm = OpenAiLlm(RemoteLlmOptions(url, api_key=m.llm_api_key))
        try:
            return llm.check()
        finally:
            llm.close()
    from .wyoming import describe as ask

    info = ask(remote_options(m, url))
    if engine == "stt":
        names = [f"{a.name} ({', '.join(x.name for x in a.models)})" for a in info.asr]
    else:
        names = [f"{t.name} ({len(t.voices)} voices)" for t in info.tts]
    return f"{url} serves {', '.join(names) or 'nothing'}"


def describe(m: ModelSettings) -> dict[str, str]:
    """What each engine runs, as a person reads it ("whisper-tiny.en", "a Wyoming server at
    tcp://...")."""
    stt_o, llm_o, tts_o = options(m)
    local = {"stt": stt_o.model, "llm": llm_o.model, "tts": f"{tts_o.engine} {tts_o.model}"}
    remote = remote_urls(m)
    return {
        engine: f"the server at {remote[engine]}" if engine in remote else name
        for engine, name in local.items()
    }


def openmp_beside_pytorch(llm: LlmEngine, tts: TtsEngine) -> bool:
    """llama.cpp on OpenMP in a process where PyTorch runs the TTS (see bot/engines/llm.py)."""
    streaming = getattr(tts, "streaming", None)
    on_torch = isinstance(tts, KokoroTorch) or getattr(streaming, "vocoder", None) is not None
    return bool(getattr(llm, "openmp", False)) and on_torch


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
        what = describe(settings)
        start = time.perf_counter()
        say(f"loading STT {what['stt']} ...")
        self.stt = make_stt(settings, self.activity)
        self.timing.load["stt"] = time.perf_counter() - start
        start = time.perf_counter()
        say(f"loading LLM {what['llm']} ...")
        self.llm = make_llm(settings, options(settings)[1].model, self.activity)
        self.timing.load["llm"] = time.perf_counter() - start
        start = time.perf_counter()
        say(f"loading TTS {what['tts']} ...")
        self.tts = make_tts(settings, self.activity)
        self.timing.load["tts"] = time.perf_counter() - start
        self._say = say
        if openmp_beside_pytorch(self.llm, self.tts):
            say(
                "warning: llama.cpp was built with OpenMP and the TTS runs on PyTorch: they share "
                "libgomp, which then slows every LLM prompt ~1.5x; rebuild llama-cpp-python with "
                "CMAKE_ARGS=-DGGML_OPENMP=OFF (scripts/bootstrap does)"
            )

    def where(self) -> dict[str, str]:
        """What each engine runs and where it computes ("whisper-tiny.en on cpu (int8)",
        "the server at tcp://...")."""
        found, remote = describe(self.settings), remote_urls(self.settings)
        for job, engine in (("stt", self.stt), ("llm", self.llm), ("tts", self.tts)):
            if job not in remote:
                device = getattr(engine, "device", "cpu")
                precision = getattr(engine, "compute_type", None)
                found[job] += f" on {device}" + (f" ({precision})" if precision else "")
        return found

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
        if not self.llm.warm_up(DEFAULT_SYSTEM_PROMPT).strip():
            raise EngineError("LLM warm-up produced no text")
        self.timing.warm_up["llm"] = time.perf_counter() - start

    def load_llm(self, model: str) -> LlmEngine:
        """Another LLM (a profile's own), with the same settings as this one, warmed up."""
        return load_llm(self.settings, model, self.activity)


def load_llm(settings: ModelSettings, model: str, activity: Activity | None = None) -> LlmEngine:
    """LLM ``model`` with the rest of ``settings``, warmed up."""
    llm = make_llm(settings, model, activity or Activity())
    llm.warm_up(DEFAULT_SYSTEM_PROMPT)
    return llm
