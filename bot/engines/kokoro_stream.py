"""Kokoro's ONNX graph cut in two at load time, its vocoder run on windows of frames.

Nine tenths of Kokoro's time goes to its vocoder (the iSTFTNet generator), which turns 80 feature
frames a second into audio with convolutions only. :class:`KokoroStreamer` cuts the one ONNX graph
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

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import numpy as np

from . import Activity, ModelUnavailable
from .base import FloatArray
from .vocoder import TorchVocoder, cpu_has_bf16

KOKORO_RATE: Final = 24000
KOKORO_HOP: Final = 300  # samples per vocoder input frame (80 frames a second)
# Where the ONNX export's graph is cut (names of the kokoro-onnx v1.0 export).
GEN_FEATURES: Final = "/decoder/decoder/decode.3/Div_4_output_0"
GEN_SOURCE: Final = "/decoder/decoder/generator/Concat_3_output_0"
GEN_STYLE: Final = "/decoder/Slice_output_0"
DURATIONS: Final = "/encoder/Clip_output_0"
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


class Sessions:
    """One part of the graph on onnxruntime, as a session per thread count (a session's
    threads are fixed): each run takes ``threads`` alone, one beside another engine (see
    :class:`bot.engines.Activity`)."""

    def __init__(
        self,
        part: Any,
        threads: int,
        *,
        spinning: bool,
        activity: Activity,
        providers: list[str] | None = None,
    ) -> None:
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
                part.SerializeToString(),
                sess_options=so,
                providers=providers or ["CPUExecutionProvider"],
            )

    def session(self, threads: int) -> Any:
        return self._by_threads[threads]

    def run(self, outputs: Any, feeds: dict[str, Any]) -> Any:
        return self._by_threads[self.activity.threads("tts", self.threads)].run(outputs, feeds)


class KokoroStreamer:
    """Kokoro's ONNX graph as a front and a windowed vocoder (see the module's docstring)."""

    def __init__(
        self, front: Sessions, generator: Sessions | None, vocoder: TorchVocoder | None = None
    ) -> None:
        self.front = front
        self.generator = generator  # onnxruntime's, or None where ``vocoder`` replaces it
        self.vocoder = vocoder

    @classmethod
    def split(
        cls,
        path: Path,
        *,
        vocoder: str,
        threads: int,
        activity: Activity,
        providers: list[str] | None = None,
    ) -> KokoroStreamer | None:
        """Both halves of the model at ``path``; None (one-shot synthesis) for a graph that
        lacks the tensors it is cut at, such as another exporter's. ``vocoder``: see
        :class:`TtsOptions`."""
        import onnx
        import onnx.utils

        model = onnx.load(str(path))
        names = {o for node in model.graph.node for o in node.output}
        if not {GEN_FEATURES, GEN_SOURCE, GEN_STYLE, DURATIONS} <= names:
            return None
        extractor = onnx.utils.Extractor(model)
        inputs = [i.name for i in model.graph.input]
        front = extractor.extract_model(inputs, [GEN_FEATURES, GEN_SOURCE, DURATIONS])

        torch_vocoder = cls._torch_vocoder(model, vocoder, threads, activity)
        if torch_vocoder is not None:
            # onnxruntime's threads spin after each run, which slowed the vocoder's first
            # window right after the front by ~30 ms: they sleep instead here.
            front_part = Sessions(
                front, threads, spinning=False, activity=activity, providers=providers
            )
            streamer = cls(front_part, None, torch_vocoder)
            streamer.warm_up()
            return streamer
        generator = extractor.extract_model(
            [GEN_FEATURES, GEN_SOURCE, GEN_STYLE], [o.name for o in model.graph.output]
        )
        return cls(
            Sessions(front, threads, spinning=True, activity=activity, providers=providers),
            Sessions(generator, threads, spinning=True, activity=activity, providers=providers),
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
            feeds = {GEN_FEATURES: window, GEN_SOURCE: harmonics, GEN_STYLE: style}
            (audio,) = self.generator.run(None, feeds)[:1]
            audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        first = (a - lo) * KOKORO_HOP - before
        return audio[first : (b - lo) * KOKORO_HOP + after].copy()
