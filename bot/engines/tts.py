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

Streaming Kokoro (ONNX)
-----------------------
Nine tenths of Kokoro's time goes to its vocoder (the iSTFTNet generator), which turns 80 feature
frames a second into audio with convolutions only. :class:`KokoroOnnx` cuts the one ONNX graph
in two at load time: the *front* (text encoder, durations, F0, the decoder blocks and the
harmonic source) runs once per sentence; the *generator* runs on windows of frames, the first
one short, each with ``CONTEXT_FRAMES`` of real neighbours on either side and a short
cross-fade into the next, so the first audio is out after a fifth of the work. The leading and
trailing pad tokens (about 0.35 s and 0.2 s of silence) are not vocoded at all, beyond
a margin. The generator's instance norms then see a window instead of the sentence: measured,
the spectra differ from the one-shot output by a log-spectral distance of 5.5-7 dB, about as
much as the int8 model differs from the float one (5.2 dB), and a Whisper round trip gives the
same words.

Where the CPU has bfloat16 units (AMX or AVX512-BF16), the generator runs on PyTorch in
bfloat16 instead of onnxruntime's int8 (``TtsOptions.vocoder``, :mod:`bot.engines.vocoder`):
~4x faster here, the first window in ~67 ms instead of ~250 ms. oneDNN prepares its
kernels once per input length (~80 ms the first time), so those windows are vocoded in whole
``BUCKET_FRAMES`` (more real context where the sentence has it: the first window 64 frames with
its context, the next ones up to 256), prepared at load.
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
from . import Activity, DeadlineLock, EngineFailed, ModelUnavailable
from .base import FloatArray, TtsEngine
from .models import CATALOG, materialize, resolve
from .vocoder import TorchVocoder, cpu_has_bf16

KOKORO_RATE: Final = 24000
KOKORO_HOP: Final = 300  # samples per vocoder input frame (80 frames a second)
# Where the ONNX export's graph is cut (names of the kokoro-onnx v1.0 export).
_GEN_FEATURES: Final = "/decoder/decoder/decode.3/Div_4_output_0"
_GEN_SOURCE: Final = "/decoder/decoder/generator/Concat_3_output_0"
_GEN_STYLE: Final = "/decoder/Slice_output_0"
_DURATIONS: Final = "/encoder/Clip_output_0"
SOURCE_PER_FRAME: Final = 60  # harmonic-source STFT frames per vocoder frame
FIRST_WINDOW_FRAMES: Final = 24  # 0.3 s: the first audio
CONTEXT_FRAMES: Final = 16  # real neighbours each side of a window
FADE_FRAMES: Final = 2  # cross-fade between windows (25 ms)
PAD_MARGIN_FRAMES: Final = 8  # vocoded silence kept next to the pad tokens (100 ms)
# PyTorch's vocoder (oneDNN) prepares its kernels once per input length, ~80 ms the first time:
# its windows are cut to whole multiples of this many frames (more real context where there is
# some), and the common lengths are prepared at load.
BUCKET_FRAMES: Final = 64
WARM_BUCKETS: Final = 4  # 64, 128, 192 and 256 frames
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
        self.streaming: _KokoroStreamer | None = None
        if options.streaming:
            self.streaming = _KokoroStreamer.split(
                Path(resolved.path),
                vocoder=options.vocoder,
                threads=options.threads,
                activity=activity,
            )
        # The whole graph in one session only where it is run whole (the halves hold it all).
        self.session: Any = None
        if self.streaming is None:
            so = ort.SessionOptions()
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
            self.session = ort.InferenceSession(
                str(resolved.path), sess_options=so, providers=["CPUExecutionProvider"]
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


class _Sessions:
    """One part of the graph on onnxruntime, as a session per thread count (a session's
    threads are fixed): each run takes ``threads`` alone, one beside another engine (see
    :class:`bot.engines.Activity`)."""

    def __init__(self, part: Any, threads: int, *, spinning: bool, activity: Activity) -> None:
        import onnxruntime as ort

        self.threads = threads
        self.activity = activity
        self._by_threads: dict[int, Any] = {}
        for n in sorted({1, threads}):
            so = ort.SessionOptions()
            so.intra_op_num_threads = n
            so.inter_op_num_threads = 1
            if not spinning:
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._by_threads[n] = ort.InferenceSession(
                part.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"]
            )

    def session(self, threads: int) -> Any:
        return self._by_threads[threads]

    def run(self, outputs: Any, feeds: dict[str, Any]) -> Any:
        return self._by_threads[self.activity.threads("tts", self.threads)].run(outputs, feeds)


class _KokoroStreamer:
    """Kokoro's ONNX graph as a front and a windowed vocoder (see the module's docstring)."""

    def __init__(
        self, front: _Sessions, generator: _Sessions | None, vocoder: TorchVocoder | None = None
    ) -> None:
        self.front = front
        self.generator = generator  # onnxruntime's, or None where ``vocoder`` replaces it
        self.vocoder = vocoder

    @classmethod
    def split(
        cls, path: Path, *, vocoder: str, threads: int, activity: Activity
    ) -> _KokoroStreamer | None:
        """Both halves of the model at ``path``; None (one-shot synthesis) for a graph that
        lacks the tensors it is cut at, such as another exporter's. ``vocoder``: see
        :class:`TtsOptions`."""
        import onnx
        import onnx.utils

        model = onnx.load(str(path))
        names = {o for node in model.graph.node for o in node.output}
        if not {_GEN_FEATURES, _GEN_SOURCE, _GEN_STYLE, _DURATIONS} <= names:
            return None
        extractor = onnx.utils.Extractor(model)
        inputs = [i.name for i in model.graph.input]
        front = extractor.extract_model(inputs, [_GEN_FEATURES, _GEN_SOURCE, _DURATIONS])

        torch_vocoder = cls._torch_vocoder(model, vocoder, threads, activity)
        if torch_vocoder is not None:
            # onnxruntime's threads spin after each run, which slowed the vocoder's first
            # window right after the front by ~30 ms: they sleep instead here.
            front_part = _Sessions(front, threads, spinning=False, activity=activity)
            streamer = cls(front_part, None, torch_vocoder)
            streamer.warm_up()
            return streamer
        generator = extractor.extract_model(
            [_GEN_FEATURES, _GEN_SOURCE, _GEN_STYLE], [o.name for o in model.graph.output]
        )
        return cls(
            _Sessions(front, threads, spinning=True, activity=activity),
            _Sessions(generator, threads, spinning=True, activity=activity),
        )

    @staticmethod
    def _torch_vocoder(
        model: Any, choice: str, threads: int, activity: Activity
    ) -> TorchVocoder | None:
        if choice == "onnx" or (choice == "auto" and not cpu_has_bf16()):
            return None
        try:
            return TorchVocoder.from_onnx(model, threads, activity=activity)
        except ModelUnavailable:
            if choice == "torch":
                raise
            return None  # auto: onnxruntime's generator

    def warm_up(self) -> None:
        """Runs the vocoder once on each common window length (see ``BUCKET_FRAMES``), on
        each thread count it takes (oneDNN prepares its kernels per length and thread count:
        the first 256-frame window on one thread took 0.5 s more than the next)."""
        if self.vocoder is None:
            return
        style = np.zeros((1, 128), dtype=np.float32)
        for threads in sorted({1, self.vocoder.threads}):
            for n in range(1, WARM_BUCKETS + 1):
                frames = n * BUCKET_FRAMES
                features = np.zeros((1, 512, frames), dtype=np.float32)
                source = np.zeros((1, 22, frames * SOURCE_PER_FRAME + 1), dtype=np.float32)
                self.vocoder.run(features, source, style, threads=threads)

    def run(self, feeds: dict[str, Any]) -> Iterator[FloatArray]:
        features, source, durations = self.front.run(None, feeds)
        style = np.ascontiguousarray(feeds["style"][:, :128])
        windows = self.windows(
            features.shape[2], durations.reshape(-1), bucketed=self.vocoder is not None
        )
        half = FADE_FRAMES * KOKORO_HOP // 2
        ramp = np.linspace(0.0, 1.0, 2 * half, dtype=np.float32)
        tail: FloatArray | None = None  # the previous window's audio across the boundary
        for i, (a, b) in enumerate(windows):
            last = i == len(windows) - 1
            before = half if tail is not None else 0
            audio = self._vocode(features, source, style, a, b, before, 0 if last else half)
            if tail is not None:
                audio[: 2 * half] = tail * (1.0 - ramp) + audio[: 2 * half] * ramp
            if not last:
                audio, tail = audio[: -2 * half], audio[-2 * half :]
            yield audio

    @staticmethod
    def windows(frames: int, durations: Any, *, bucketed: bool = False) -> list[tuple[int, int]]:
        """The frame windows to vocode: the pads cropped to a margin, the first window short,
        each next one twice as long (it is vocoded while the ones before it play). With
        ``bucketed`` (PyTorch's vocoder, faster per frame the longer the window: 64 / 128 / 256
        frames in ~67 / 125 / 201 ms) the first window of 32 frames is vocoded as 64 with its
        context, and the next ones as the longest prepared bucket (256): the rest of a clause
        of up to ~3 s in one run, with one context instead of two or three."""
        per_unit = frames / max(1.0, float(durations.sum()))  # frames per duration unit
        start = max(0, round(float(durations[0]) * per_unit) - PAD_MARGIN_FRAMES)
        end = min(frames, frames - round(float(durations[-1]) * per_unit) + PAD_MARGIN_FRAMES)
        end = max(end, min(frames, start + 1))
        out: list[tuple[int, int]] = []
        size = FIRST_WINDOW_FRAMES + min(start, PAD_MARGIN_FRAMES)  # speech, past the margin
        longest = WARM_BUCKETS * BUCKET_FRAMES - 2 * CONTEXT_FRAMES
        while start < end:
            if bucketed and out:  # the last window has no right context to vocode
                stop = end if end - start <= longest + CONTEXT_FRAMES else start + longest
            else:
                stop = end if end - start < size + size // 2 else start + size
            out.append((start, stop))
            start, size = stop, 2 * size
        return out

    def _vocode(
        self, features: Any, source: Any, style: Any, a: int, b: int, before: int, after: int
    ) -> FloatArray:
        """Samples ``[a*HOP - before, b*HOP + after)`` of the sentence, from frames ``[a, b)``
        and their context."""
        frames = features.shape[2]
        lo, hi = max(0, a - CONTEXT_FRAMES), min(frames, b + CONTEXT_FRAMES)
        if self.vocoder is not None:  # a whole number of buckets, with more real context
            size = -(-(hi - lo) // BUCKET_FRAMES) * BUCKET_FRAMES
            hi = min(frames, lo + size)
            lo = max(0, hi - size)
        window = np.ascontiguousarray(features[:, :, lo:hi])
        harmonics = np.ascontiguousarray(
            source[:, :, lo * SOURCE_PER_FRAME : hi * SOURCE_PER_FRAME + 1]
        )
        if self.vocoder is not None:
            audio = self.vocoder.run(window, harmonics, style)
        else:
            assert self.generator is not None  # split() makes one where there is no vocoder
            feeds = {_GEN_FEATURES: window, _GEN_SOURCE: harmonics, _GEN_STYLE: style}
            (audio,) = self.generator.run(None, feeds)[:1]
            audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        first = (a - lo) * KOKORO_HOP - before
        return audio[first : (b - lo) * KOKORO_HOP + after].copy()


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
