"""Turn taking: voice activity, endpointing, pre-roll, the half-duplex gate and barge-in.

Theory of operation
-------------------
:class:`TurnDetector` is a pure state machine fed one 20 ms frame at a time with the frame's
arrival time; it does no I/O and knows nothing about engines, so it is tested frame by frame.

- **Onset.** A turn starts after ``onset_ms`` of voiced frames (a click is not a turn). The
  ``pre_roll_ms`` of audio before the onset joins the utterance, so the first word is whole.
- **Pauses.** Once the caller has been quiet for ``pause_ms``, :class:`Paused` carries the
  utterance so far: the call starts transcribing it speculatively while the caller may go on.
  If speech resumes, :class:`Resumed` says the speculation is stale.
- **Endpoint.** The turn ends after a hangover of silence. The hangover adapts: after a pause
  the call may tell the detector whether the words so far form a complete turn
  (:meth:`TurnDetector.hint_complete`): complete turns (questions) end after
  ``hangover_complete_ms``,
  trailing ones ("and", "so", a comma) wait ``hangover_incomplete_ms``, so a 300-500 ms pause
  inside a sentence does not make the bot answer. Without a hint, ``hangover_ms`` (650 ms:
  the scenario set's 400 ms breath after a comma is 500-580 ms between voiced frames, the
  voices' own silence around the comma included; at 500 ms the bot answered into it).
- **Noise.** A caller in a cafe or beside a TV is heard over a background the VAD takes for
  speech (babble *is* speech). :class:`NoiseFloor` follows the line's background level (a
  room's noise stays, the caller's speech comes and goes), and a frame counts as the caller's
  voice only if the VAD says speech *and* it is ``noise_margin_db`` above that floor: the
  caller is nearer the phone than the room. On a quiet line the floor is far below speech and
  changes nothing. The floor is the median level of the last 4 s heard between turns (a turn's
  own frames would raise it to the caller's voice); inside a turn the margin is
  ``NOISE_HOLD_DB`` lower, so a word's weaker end does not split the turn (docs/performance.md
  has what the gate does on the quality bench's noisy lines).
- **Too short, too long.** A turn with less than ``min_speech_ms`` of voiced audio is dropped
  (coughs); one longer than ``max_utterance_s`` ends at once so a monologue still gets an answer.
- **Gate and barge-in.** While the bot is speaking the call closes the gate: caller audio does
  not start a turn (it is mostly our own echo). With barge-in enabled, ``barge_in_ms`` of
  sustained speech through a closed gate raises :class:`BargeIn`, and that speech starts the
  next turn (its words are kept).
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np

from ..audio import FRAME_MS, rms_dbfs
from ..config import TurnSettings

__all__ = [
    "BargeIn",
    "Discarded",
    "EndOfTurn",
    "NoiseFloor",
    "Paused",
    "Resumed",
    "SileroVad",
    "SpeechStarted",
    "TurnDetector",
    "TurnEvent",
    "make_vad",
    "Vad",
    "WebRtcVad",
    "looks_complete",
]


class Vad(Protocol):
    def is_speech(self, pcm: bytes, rate: int) -> bool: ...


class WebRtcVad:
    """webrtcvad (the webrtcvad-wheels build): ~2 us per 20 ms frame. Mode 3 is the strictest."""

    def __init__(self, mode: int = 3) -> None:
        import webrtcvad

        self._vad = webrtcvad.Vad(mode)

    def is_speech(self, pcm: bytes, rate: int) -> bool:
        return bool(self._vad.is_speech(pcm, rate))


class SileroVad:
    """Silero VAD v5 on onnxruntime alone (the ONNX file that the silero-vad package ships).

    The model takes 256-sample windows at 8 kHz (512 at 16 kHz) with the previous window's last
    32 (64) samples as context; 20 ms frames are buffered into windows and each frame gets the
    probability of the newest complete window.
    """

    def __init__(self, threshold: float = 0.5, model_path: str | None = None) -> None:
        import onnxruntime as ort

        if model_path is None:
            from ..engines.models import resolve

            model_path = str(resolve("silero-vad", "vad", progress=False).path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            model_path, sess_options=so, providers=["CPUExecutionProvider"]
        )
        self.threshold = threshold
        self._rate = 0
        self.reset(8000)

    def reset(self, rate: int) -> None:
        self._rate = rate
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(32 if rate == 8000 else 64, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self._prob = 0.0

    def is_speech(self, pcm: bytes, rate: int) -> bool:
        if rate != self._rate:
            self.reset(rate)
        window = 256 if rate == 8000 else 512
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        self._pending = np.concatenate([self._pending, x])
        while len(self._pending) >= window:
            chunk, self._pending = self._pending[:window], self._pending[window:]
            inp = np.concatenate([self._context, chunk])[None, :]
            out, self._state = self._session.run(
                None, {"input": inp, "state": self._state, "sr": np.array(rate, dtype=np.int64)}
            )
            self._context = chunk[-len(self._context) :]
            self._prob = float(out.reshape(-1)[0])
        return self._prob >= self.threshold


def make_vad(settings: TurnSettings) -> Vad:
    """A new VAD for one call, as ``[turns] vad`` says."""
    return SileroVad() if settings.vad == "silero" else WebRtcVad(settings.vad_mode)


class NoiseFloor:
    """The line's background level in dBFS: a percentile of the frame levels of the last
    ``window_s`` between the caller's turns (the detector feeds it no frame of a turn)."""

    def __init__(self, window_s: float = 4.0, percentile: float = 50.0) -> None:
        self._levels: collections.deque[float] = collections.deque(
            maxlen=max(1, round(window_s * 1000 / FRAME_MS))
        )
        self._percentile = percentile
        self.level = SILENT_DBFS

    def update(self, db: float) -> None:
        self._levels.append(db)
        self.level = float(np.percentile(self._levels, self._percentile))


SILENT_DBFS: Final = -96.0  # digital silence, as a level a percentile can take


def level_dbfs(pcm: bytes) -> float:
    return max(rms_dbfs(pcm), SILENT_DBFS)


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    t: float


@dataclass(frozen=True, slots=True)
class Paused:
    t: float
    audio: bytes  # the utterance so far (pre-roll included)
    speech_end: float  # arrival time of the last voiced frame
    voiced_frames: int


@dataclass(frozen=True, slots=True)
class Resumed:
    t: float


@dataclass(frozen=True, slots=True)
class EndOfTurn:
    t: float  # when the endpoint was decided
    audio: bytes
    speech_end: float
    voiced_frames: int
    reason: str  # "hangover" | "max length"


@dataclass(frozen=True, slots=True)
class Discarded:
    t: float
    reason: str


@dataclass(frozen=True, slots=True)
class BargeIn:
    t: float


TurnEvent = SpeechStarted | Paused | Resumed | EndOfTurn | Discarded | BargeIn


# Less noise margin inside a turn: a word's weaker end stays in it.
NOISE_HOLD_DB: Final = 3.0
NOISE_PERCENTILE: Final = 50.0  # the background level is the median of the recent frames


# A voiced frame outside our own speech counts as the caller being heard this long (see
# TurnDetector.hearing).
HEARING_S: Final = 0.3
# Words a turn rarely ends on: a caller who stops after one of these is likely to go on.
TRAILING: Final = frozenset(
    [
        "and",
        "but",
        "or",
        "so",
        "because",
        "the",
        "a",
        "an",
        "to",
        "of",
        "with",
        "for",
        "if",
        "that",
        "then",
        "um",
        "uh",
        "er",
        "like",
        "my",
        "your",
        "is",
        "are",
        "was",
        "i",
        "we",
        "you",
        "it",
        "in",
        "on",
        "at",
    ]
)


def looks_complete(text: str) -> bool | None:
    """Whether a (partial) transcript reads as a finished turn; None when it cannot tell."""
    t = text.strip()
    if not t:
        return None
    if t.endswith((",", "-", "...", "…")):
        return False
    words = re.findall(r"[a-z']+", t.lower())
    if words and words[-1] in TRAILING:
        return False
    # A question is a finished turn for a voicebot. A statement may still get an afterthought
    # ("a table for two, ... tonight at eight"), and Whisper ends every fragment with a period,
    # so "." earns no shortcut: the default hangover outlasts a 300-500 ms pause.
    if t.endswith("?"):
        return True
    return None


@dataclass
class _Utterance:
    frames: list[bytes] = field(default_factory=list)
    voiced: int = 0
    silent_run: int = 0  # trailing unvoiced frames
    last_voiced_t: float = 0.0
    paused: bool = False


class TurnDetector:
    def __init__(
        self, vad: Vad, rate: int, settings: TurnSettings | None = None, *, barge_in: bool = False
    ) -> None:
        self.vad = vad
        self.rate = rate
        self.s = settings or TurnSettings()
        self.barge_in = barge_in
        self._pre_roll: collections.deque[bytes] = collections.deque(
            maxlen=max(1, self.s.pre_roll_ms // FRAME_MS)
        )
        self._onset_run = 0
        self._gated_run = 0
        self._utt: _Utterance | None = None
        self._hint: bool | None = None
        self._voice_at: float | None = None  # the last voiced frame outside our own speech
        self.noise = NoiseFloor(percentile=NOISE_PERCENTILE)

    @property
    def in_speech(self) -> bool:
        return self._utt is not None

    def hearing(self, t: float) -> bool:
        """The caller is speaking, or was heard within ``HEARING_S`` before ``t`` outside our
        own speech (a voice that may yet become a turn: the onset counts voiced frames in a
        row, and the first syllables of a word are not all voiced)."""
        return self._utt is not None or (
            self._voice_at is not None and t - self._voice_at < HEARING_S
        )

    def hint_complete(self, complete: bool | None) -> None:
        """Adapts the current pause's hangover (from a speculative transcript)."""
        self._hint = complete

    def reset(self) -> None:
        self._voice_at = None
        self._utt = None
        self._onset_run = 0
        self._gated_run = 0
        self._hint = None
        self._pre_roll.clear()

    def _frames(self, ms: float) -> int:
        return max(1, round(ms / FRAME_MS))

    def _hangover_frames(self) -> int:
        ms = (
            {True: self.s.hangover_complete_ms, False: self.s.hangover_incomplete_ms}.get(
                self._hint, self.s.hangover_ms
            )
            if self._hint is not None
            else self.s.hangover_ms
        )
        return self._frames(ms)

    def feed(self, pcm: bytes, t: float, *, gated: bool = False) -> list[TurnEvent]:
        """One frame of caller audio that arrived at ``t``. ``gated``: the bot is speaking."""
        voiced = self._voiced(pcm)
        utt = self._utt
        if utt is None:
            return self._idle(pcm, t, voiced, gated)
        events: list[TurnEvent] = []
        utt.frames.append(pcm)
        if voiced:
            utt.voiced += 1
            utt.last_voiced_t = t
            if utt.paused:
                utt.paused = False
                self._hint = None
                events.append(Resumed(t))
            utt.silent_run = 0
        else:
            utt.silent_run += 1
        if len(utt.frames) * FRAME_MS >= self.s.max_utterance_s * 1000:
            events.append(self._end(t, "max length"))
            return events
        if not voiced and not utt.paused and utt.silent_run == self._frames(self.s.pause_ms):
            utt.paused = True
            events.append(Paused(t, b"".join(utt.frames), utt.last_voiced_t, utt.voiced))
        if not voiced and utt.silent_run >= self._hangover_frames():
            events.append(self._end(t, "hangover"))
        return events

    def _voiced(self, pcm: bytes) -> bool:
        """The VAD hears speech, above the background (the floor before this frame)."""
        db = level_dbfs(pcm)
        margin = self.s.noise_margin_db
        if self._utt is not None:  # hysteresis: a word's weaker end stays in the turn
            margin -= NOISE_HOLD_DB
        loud = self.s.noise_margin_db <= 0 or db >= self.noise.level + margin
        if self._utt is None:  # the caller's own voice is not the room's
            self.noise.update(db)
        speech = self.vad.is_speech(pcm, self.rate)  # every frame: a VAD may keep state
        return loud and speech

    def _idle(self, pcm: bytes, t: float, voiced: bool, gated: bool) -> list[TurnEvent]:
        if gated:
            # What we hear while we speak is mostly our own echo: it starts no turn and is kept
            # only as the words of a caller who keeps talking over us (barge-in).
            self._onset_run = 0
            if not voiced or not self.barge_in:
                self._gated_run = 0
                self._pre_roll.clear()
                return []
            if self._gated_run == 0:
                self._pre_roll.clear()
            self._gated_run += 1
            self._pre_roll.append(pcm)
            if self._gated_run >= self._frames(self.s.barge_in_ms):
                # Sustained speech over the bot: stop it and keep these words as the next turn.
                frames = list(self._pre_roll)
                self._start(frames, t, len(frames))
                self._gated_run = 0
                return [BargeIn(t), SpeechStarted(t)]
            return []
        self._gated_run = 0
        self._pre_roll.append(pcm)
        self._onset_run = self._onset_run + 1 if voiced else 0
        if voiced:
            self._voice_at = t
        if self._onset_run >= self._frames(self.s.onset_ms):
            self._start(list(self._pre_roll), t, self._onset_run)
            return [SpeechStarted(t)]
        return []

    def _start(self, frames: list[bytes], t: float, voiced: int) -> None:
        self._utt = _Utterance(frames=frames, voiced=voiced, last_voiced_t=t)
        self._pre_roll.clear()
        self._onset_run = 0
        self._hint = None

    def _end(self, t: float, reason: str) -> EndOfTurn | Discarded:
        utt = self._utt
        assert utt is not None
        self._utt = None
        self._hint = None
        if utt.voiced * FRAME_MS < self.s.min_speech_ms:
            return Discarded(
                t, f"{utt.voiced * FRAME_MS} ms of speech is under {self.s.min_speech_ms} ms"
            )
        # Trailing silence past the last voiced frame adds nothing for STT but cost: keep 100 ms.
        keep = len(utt.frames) - max(0, utt.silent_run - self._frames(100))
        return EndOfTurn(t, b"".join(utt.frames[:keep]), utt.last_voiced_t, utt.voiced, reason)
