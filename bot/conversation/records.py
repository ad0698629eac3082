"""What is recorded of each turn: its words, its reply, and when each stage of it happened."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Final

from .. import clock

# The marks of a turn, in the order they normally happen (ms after ``speech_end`` in the log).
MARKS: Final = (
    "speech_end",
    "endpoint",
    "stt_done",
    "llm_first_token",
    "first_clause",
    "tts_first_audio",
    "first_frame_out",
)


@dataclass(slots=True)
class ClauseTiming:
    words: int
    ready: float  # monotonic: the clause's text was complete
    first_audio: float | None = None
    silence: float = 0.0  # seconds the caller heard nothing before it (0 for the first)


@dataclass
class Turn:
    index: int
    marks: dict[str, float] = field(default_factory=dict)  # monotonic times
    transcript: str = ""
    reply: str = ""
    stt_speculative: bool = False
    interrupted: bool = False
    # Whisper's doubt of the words (mean token log-probability) when too low to answer them.
    misheard: float | None = None
    unanswered: bool = False  # the model said nothing: the caller was asked to say it again
    # Ended at max_utterance_s, the voice going on: it is answered all the same.
    max_length: bool = False
    clauses: list[ClauseTiming] = field(default_factory=list)
    # Set once the turn has ended: a reply started ahead of the endpoint waits for it.
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def mark(self, name: str, t: float | None = None) -> None:
        self.marks.setdefault(name, clock.now() if t is None else t)

    def relative_clauses(self) -> list[list[int]]:
        """Per clause: [words, text complete, first audio (ms after speech_end), silence before
        it that the caller heard (ms; 0 for the first clause)]: where a stall came from."""
        base = self.marks.get("speech_end", 0.0)
        out = []
        for c in self.clauses:
            row = [c.words, round((c.ready - base) * 1000)]
            if c.first_audio is not None:
                row += [round((c.first_audio - base) * 1000), round(c.silence * 1000)]
            out.append(row)
        return out

    def relative_ms(self) -> dict[str, float]:
        base = self.marks.get("speech_end")
        if base is None:
            return {}
        return {
            k: round((v - base) * 1000, 1)
            for k, v in sorted(self.marks.items(), key=lambda kv: kv[1])
        }
