"""Text to speech: Kokoro-82M (int8 ONNX on onnxruntime, or the `kokoro` package on PyTorch) and
Piper, each yielding audio in chunks at the call's rate as soon as each chunk is ready.

Theory of operation
-------------------
Kokoro speaks phonemes, not text. Both Kokoro backends share one grapheme-to-phoneme step:
misaki's English G2P (the reference implementation's own), with spaCy's ``en_core_web_sm``
for part-of-speech tags and espeak-ng for words not in its lexicon. The text is split into
sentences (a short first clause gives the first audio soonest), each sentence's phonemes are
mapped through the model's vocabulary, and the voice's style vector is picked by phoneme count,
exactly as ``kokoro.KPipeline`` does. Kokoro speaks at 24 kHz; Piper at its voice's rate. Every
chunk goes through the streaming anti-aliasing resampler to the call's rate (8 or 16 kHz).

Kokoro on onnxruntime streams a sentence's audio in windows: :mod:`bot.engines.kokoro_stream`.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from ..audio import Resampler, float_to_pcm
from ..config import MODEL_PACKS, ModelSettings, default
from . import Activity, DeadlineLock, EngineFailed, ModelUnavailable, devices
from .base import FloatArray, TtsEngine
from .kokoro_stream import KOKORO_RATE, KokoroStreamer
from .models import CATALOG, materialize, resolve

MAX_PHONEMES: Final = 510  # Kokoro's context is 512 tokens, two of them the boundary pads
SENTENCE_SPLIT: Final = re.compile(r"(?<=[.!?;:])\s+|\n+")


@dataclass(frozen=True, slots=True)
class TtsOptions:
    engine: str = MODEL_PACKS["default"]["tts_engine"]  # kokoro | piper
    backend: str = default(ModelSettings, "tts_backend")  # kokoro: onnx | torch
    # catalogue name, path, or HF repo (torch: hexgrad/Kokoro-82M)
    model: str = MODEL_PACKS["default"]["tts"]
    # a voice in the voices file, a .pt/.npy path, or an HF voice name
    voice: str = MODEL_PACKS["default"]["voice"]
    speed: float = 1.0
    threads: int = default(ModelSettings, "threads")
    # Kokoro ONNX: vocode each sentence in windows, the first audio after ~0.3 s of it.
    streaming: bool = default(ModelSettings, "tts_streaming")
    # Kokoro ONNX streaming: the vocoder on onnxruntime ("onnx"), or on PyTorch in bfloat16
    # ("torch", bot/engines/vocoder.py); "auto": torch where the CPU has bfloat16 units.
    vocoder: str = default(ModelSettings, "tts_vocoder")
    device: str = default(ModelSettings, "tts_device")  # Kokoro: auto | cpu | cuda


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_SPLIT.split(text) if s and s.strip()]


def speak(
    engine: TtsEngine,
    text: str,
    rate: int,
    voice: str | None = None,
    *,
    due: float | None = None,
) -> Iterator[bytes]:
    """16-bit PCM at ``rate`` for ``text``, chunk by chunk as the engine produces them."""
    resampler = Resampler(engine.native_rate, rate)
    for chunk in engine.synthesize(text, voice or None, due=due):
        out = resampler.process(chunk)
        if len(out):
            yield float_to_pcm(out)
    tail = resampler.flush()
    if len(tail):
        yield float_to_pcm(tail)


# --- Kokoro -------------------------------------------------------------------------------------


def _spacy_nlp() -> Any:
    """spaCy's en_core_web_sm: the real package if installed, else the offline copy."""
    import spacy

    components = ["tok2vec", "tagger"]
    if spacy.util.is_package("en_core_web_sm"):
        return spacy.load("en_core_web_sm", enable=components)
    model = CATALOG["kokoro-v1.0-int8"]
    config = materialize(model.files["spacy"], model, progress=False)
    return spacy.load(config.parent, enable=components)


# misaki's G2P is built here without its __init__ (see KokoroG2P), as this version allows.
TESTED_MISAKI: Final = "0.9.4"


class KokoroG2P:
    """misaki's English G2P, built without its run-time download of spaCy's model."""

    def __init__(self, british: bool = False) -> None:
        try:
            from misaki import en, espeak
        except ImportError as exc:  # pragma: no cover - a dependency of kokoro
            raise ModelUnavailable(f"misaki is not installed ({exc})") from exc
        # en.G2P.__init__ would call spacy.cli.download() when en_core_web_sm is not installed
        # under that name: set up the same attributes with the model we found instead.
        g2p = en.G2P.__new__(en.G2P)
        g2p.version = None
        g2p.british = british
        g2p.nlp = _spacy_nlp()
        g2p.lexicon = en.Lexicon(british)
        g2p.fallback = espeak.EspeakFallback(british=british)
        g2p.unk = ""
        self._g2p = g2p
        self._lock = threading.Lock()  # spaCy pipelines are not thread-safe
        try:  # a misaki whose G2P needs more than the attributes set above fails here
            self("Hello.")
        except (AttributeError, TypeError) as exc:
            import misaki

            version = getattr(misaki, "__version__", "?")
            raise ModelUnavailable(
                f"misaki {version}: its English G2P cannot be set up without downloading "
                f"spaCy's model ({exc}); the bot is tested with misaki {TESTED_MISAKI}"
            ) from exc

    def __call__(self, text: str) -> str:
        with self._lock:
            phonemes, _ = self._g2p(text)
        return str(phonemes)


def _chunks(phonemes: str, limit: int = MAX_PHONEMES) -> Iterator[str]:
    """Phoneme strings of at most ``limit`` symbols, cut at spaces when they must be cut."""
    while len(phonemes) > limit:
        cut = phonemes.rfind(" ", 0, limit)
        cut = cut if cut > 0 else limit
        yield phonemes[:cut]
        phonemes = phonemes[cut:].lstrip()
    if phonemes.strip():
        yield phonemes


class _KokoroBase:
    native_rate = KOKORO_RATE

    def __init__(self, options: TtsOptions, g2p: KokoroG2P | None, activity: Activity) -> None:
        self.options = options
        self.g2p = g2p or KokoroG2P()
        self.activity = activity
        self._lock = DeadlineLock()

    def synthesize(
        self, text: str, voice: str | None = None, *, due: float | None = None
    ) -> Iterator[FloatArray]:
        style = self._style(voice or self.options.voice)
        for sentence in sentences(text):
            for phonemes in _chunks(self.g2p(sentence)):
                pieces = self._stream(phonemes, style)
                while True:
                    # One model run at a time; others, due sooner, may run in between.
                    with self._lock.hold(due), self.activity.running("tts"):
                        try:
                            audio = next(pieces, None)
                        except Exception as exc:
                            raise EngineFailed(f"Kokoro failed on {phonemes!r}: {exc}") from exc
                    if audio is None:
                        break
                    yield audio

    def check_voice(self, voice: str) -> None:
        self._style(voice)

    def _style(self, voice: str) -> Any:
        """The voice's style vectors (one per input length), loaded once."""
        raise NotImplementedError

    def _infer(self, phonemes: str, style: Any) -> FloatArray:
        raise NotImplementedError

    def _stream(self, phonemes: str, style: Any) -> Iterator[FloatArray]:
        """The audio of ``phonemes`` in pieces, the first as soon as it can be; by default
        one piece."""
        yield self._infer(phonemes, style)


class KokoroOnnx(_KokoroBase):
    """The int8 ONNX export of Kokoro-82M v1.0 on onnxruntime (what the offline pack ships)."""

    def __init__(
        self,
        options: TtsOptions | None = None,
        *,
        g2p: KokoroG2P | None = None,
        progress: bool = True,
        activity: Activity | None = None,
    ) -> None:
        options = options or TtsOptions()
        activity = activity or Activity()
        import onnxruntime as ort

        resolved = resolve(options.model, "tts-kokoro", progress=progress)
        self.resolved = resolved
        vocab_path = resolved.paths.get("vocab")
        voices_path = resolved.paths.get("voices")
        if vocab_path is None or voices_path is None:
            model = CATALOG["kokoro-v1.0-int8"]
            vocab_path = vocab_path or materialize(model.files["vocab"], model, progress=False)
            voices_path = voices_path or materialize(model.files["voices"], model, progress=False)
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        self.vocab: dict[str, int] = vocab.get("vocab", vocab)
        self.voices = dict(np.load(voices_path))
        self._voices_path = voices_path
        self.style = self._style(options.voice)
        want = options.device
        self.device = devices.choose(
            "models.tts_device",
            want,
            want != "cpu" and devices.onnxruntime_cuda(),
            "onnxruntime has no CUDA provider (pip install onnxruntime-gpu)",
        )
        providers = devices.onnx_providers(self.device)
        self.streaming: KokoroStreamer | None = None
        if options.streaming:
            self.streaming = KokoroStreamer.split(
                Path(resolved.path),
                # The bfloat16 vocoder is for CPUs: on a GPU onnxruntime runs all of it.
                vocoder="onnx" if self.device == "cuda" else options.vocoder,
                threads=options.threads,
                activity=activity,
                providers=providers,
            )
        # The whole graph in one session only where it is run whole (the halves hold it all).
        self.session: Any = None
        if self.streaming is None:
            so = ort.SessionOptions()
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
            self.session = ort.InferenceSession(
                str(resolved.path), sess_options=so, providers=providers
            )
            entry = self.session
        else:
            entry = self.streaming.front.session(options.threads)  # takes the model's inputs
        self._inputs = {i.name for i in entry.get_inputs()}
        super().__init__(options, g2p, activity)

    def _style(self, voice: str) -> Any:
        if voice not in self.voices:
            raise ModelUnavailable(
                f"Kokoro voice {voice!r} is not in {self._voices_path} "
                f"(voices: {', '.join(sorted(self.voices))})"
            )
        return np.asarray(self.voices[voice], dtype=np.float32).reshape(-1, 256)

    def _feeds(self, phonemes: str, style_pack: Any) -> dict[str, Any] | None:
        tokens = [self.vocab[p] for p in phonemes if p in self.vocab][:MAX_PHONEMES]
        if not tokens:
            return None
        style = style_pack[min(len(tokens), len(style_pack)) - 1].reshape(1, 256)
        return {
            "tokens" if "tokens" in self._inputs else "input_ids": np.array(
                [[0, *tokens, 0]], dtype=np.int64
            ),
            "style": style,
            "speed": np.array([self.options.speed], dtype=np.float32),
        }

    def _infer(self, phonemes: str, style_pack: Any) -> FloatArray:
        feeds = self._feeds(phonemes, style_pack)
        if feeds is None:
            return np.zeros(0, dtype=np.float32)
        (audio,) = self.session.run(None, feeds)[:1]
        return np.asarray(audio, dtype=np.float32).reshape(-1)

    def _stream(self, phonemes: str, style_pack: Any) -> Iterator[FloatArray]:
        if self.streaming is None:
            yield self._infer(phonemes, style_pack)
            return
        feeds = self._feeds(phonemes, style_pack)
        if feeds is not None:
            yield from self.streaming.run(feeds)


class KokoroTorch(_KokoroBase):
    """The reference `kokoro` package on PyTorch: KModel with the official checkpoint.

    ``model`` is a local ``.pth`` (with ``config`` a local config.json) or the Hugging Face repo
    ``hexgrad/Kokoro-82M``; ``voice`` a local ``.pt`` voice pack or an official voice name
    (``af_heart``), downloaded from that repo.
    """

    def __init__(
        self,
        options: TtsOptions | None = None,
        *,
        config: str | Path | None = None,
        g2p: KokoroG2P | None = None,
        threads: int | None = None,
        activity: Activity | None = None,
    ) -> None:
        options = options or TtsOptions(
            backend="torch", model="hexgrad/Kokoro-82M", voice="af_heart"
        )
        import torch
        from kokoro import KModel

        torch.set_num_threads(threads or options.threads)
        model_path = Path(options.model).expanduser()
        repo = "hexgrad/Kokoro-82M"
        try:
            if model_path.is_file():
                # The official repo keeps config.json beside kokoro-v1_0.pth.
                config = config or model_path.with_name("config.json")
                cfg: Any = json.loads(Path(config).read_text(encoding="utf-8"))
                self.model = KModel(repo_id=repo, config=cfg, model=str(model_path)).eval()
            else:
                self.model = KModel(repo_id=options.model).eval()
        except Exception as exc:
            raise ModelUnavailable(
                f"cannot load Kokoro (PyTorch) {options.model!r}: {exc}"
            ) from exc
        want = options.device
        self.device = devices.choose(
            "models.tts_device",
            want,
            want != "cpu" and devices.torch_cuda(),
            "PyTorch sees no CUDA device (install a CUDA build of torch)",
        )
        self.model = self.model.to(self.device)
        self._packs: dict[str, Any] = {}
        self.pack = self._style(options.voice)
        self.vocab = self.model.vocab
        super().__init__(options, g2p, activity or Activity())

    def _style(self, voice: str) -> Any:
        """A local ``.pt`` voice pack, or an official voice name from Hugging Face."""
        if voice in self._packs:
            return self._packs[voice]
        import torch

        try:
            path = Path(voice).expanduser()
            if not path.is_file():
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download("hexgrad/Kokoro-82M", f"voices/{voice}.pt"))
            pack = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelUnavailable(f"cannot load Kokoro voice {voice!r}: {exc}") from exc
        self._packs[voice] = pack
        return pack

    def _infer(self, phonemes: str, style_pack: Any) -> FloatArray:
        import torch

        phonemes = "".join(p for p in phonemes if p in self.vocab)[:MAX_PHONEMES]
        if not phonemes:
            return np.zeros(0, dtype=np.float32)
        ref = style_pack[len(phonemes) - 1]
        with torch.inference_mode():
            audio = self.model(phonemes, ref, self.options.speed)
        return np.asarray(audio.detach().cpu().numpy(), dtype=np.float32).reshape(-1)


# --- Piper --------------------------------------------------------------------------------------


class PiperTts:
    """Piper (VITS on onnxruntime): the lowest latency, one chunk per sentence."""

    def __init__(
        self,
        options: TtsOptions | None = None,
        *,
        progress: bool = True,
        activity: Activity | None = None,
    ) -> None:
        options = options or TtsOptions(engine="piper", model="piper-joe-medium", voice="")
        self.activity = activity or Activity()
        try:
            from piper import PiperVoice
            from piper.config import SynthesisConfig
        except ImportError as exc:
            raise ModelUnavailable(
                f"Piper is not installed ({exc}); install it with: voicebot models install fast"
            ) from exc
        self.options = options
        self.resolved = resolve(options.model, "tts-piper", progress=progress)
        config = self.resolved.paths.get("config")
        try:
            self.voice = PiperVoice.load(self.resolved.path, config_path=config)
        except Exception as exc:
            raise ModelUnavailable(f"cannot load Piper voice {options.model!r}: {exc}") from exc
        self.native_rate = int(self.voice.config.sample_rate)
        self._config = SynthesisConfig(length_scale=1.0 / options.speed if options.speed else None)
        self._lock = DeadlineLock()

    def check_voice(self, voice: str) -> None:
        if voice:
            raise ModelUnavailable(
                f"Piper speaks with one voice per model, not {voice!r}: choose the voice with "
                "the model ([models] tts)"
            )

    def synthesize(
        self, text: str, voice: str | None = None, *, due: float | None = None
    ) -> Iterator[FloatArray]:
        self.check_voice(voice or "")
        for sentence in sentences(text):
            with self._lock.hold(due), self.activity.running("tts"):
                try:
                    chunks = list(self.voice.synthesize(sentence, self._config))
                except Exception as exc:
                    raise EngineFailed(f"Piper failed: {exc}") from exc
            for chunk in chunks:
                yield np.asarray(chunk.audio_float_array, dtype=np.float32).reshape(-1)


def create(
    options: TtsOptions, *, progress: bool = True, activity: Activity | None = None
) -> TtsEngine:
    """The TTS engine these options name."""
    if options.engine == "piper":
        return PiperTts(options, progress=progress, activity=activity)
    if options.engine != "kokoro":
        raise ModelUnavailable(f"unknown TTS engine {options.engine!r} (kokoro, piper)")
    if options.backend == "onnx":
        return KokoroOnnx(options, progress=progress, activity=activity)
    if options.backend == "torch":
        return KokoroTorch(options, activity=activity)
    raise ModelUnavailable(f"unknown Kokoro backend {options.backend!r} (onnx, torch)")
