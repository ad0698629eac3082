"""Cutting an LLM's reply into clauses for TTS, and trimming the silence TTS puts around them."""

from __future__ import annotations

import re
from typing import Final

from ..audio import leading_silence, trailing_silence

# A clause or a reply that ends a sentence.
SENTENCE_END: Final = re.compile(r"[.!?][\"')]*\s*$")

_CUT_FIRST: Final = re.compile(r"[,;:.!?](?=\s)|[.!?]$")
_CUT_LATER: Final = re.compile(r"[.!?;:](?=\s)|[.!?]$")


class ClauseSplitter:
    """Cuts a token stream into clauses for TTS: the first one short, later ones sentences.

    The first clause ends at the first ``, ; : . ! ?`` (after ``first_min_words`` words), or at a
    word boundary once it has ``first_max_words`` words: the sooner it is complete, the sooner the
    caller hears something, and TTS time grows with its length. The second may be twice as long
    (it is synthesized while the first plays, so it must be ready before the first ends). Later
    clauses end at sentence punctuation, or at a comma once they reach ``max_words``.
    """

    def __init__(
        self, first_min_words: int = 1, first_max_words: int = 5, max_words: int = 12
    ) -> None:
        self.first_min_words = first_min_words
        self.first_max_words = first_max_words
        self.max_words = max_words
        self._buf = ""
        self._clauses = 0

    def feed(self, piece: str) -> list[str]:
        self._buf += piece
        out: list[str] = []
        while True:
            cut = self._find_cut()
            if cut is None:
                return out
            clause, self._buf = self._buf[:cut].strip(), self._buf[cut:]
            if clause:
                out.append(clause)
                self._clauses += 1

    def flush(self) -> str | None:
        clause, self._buf = self._buf.strip(), ""
        return clause or None

    def _find_cut(self) -> int | None:
        short = self._clauses < 2  # the first two clauses are kept short
        limit = self.first_max_words * (self._clauses + 1)
        pattern = _CUT_FIRST if short else _CUT_LATER
        for m in pattern.finditer(self._buf):
            if short and len(self._buf[: m.end()].split()) < self.first_min_words:
                continue
            return m.end()
        words = self._buf.split()
        if short and len(words) > limit:
            # Cut after `limit` whole words (a word is whole once the next one began).
            end = 0
            for word in words[:limit]:
                end = self._buf.index(word, end) + len(word)
            return end
        if not short and len(words) > self.max_words:
            comma = self._buf.rfind(", ")
            if comma > 0:
                return comma + 1
        return None


# --- clause audio -------------------------------------------------------------------------------

# TTS wraps every clause in silence (Kokoro: ~0.3 s before, ~0.4 s after). Between clauses that
# is a stall the caller hears, before the first it is latency. Keep a natural pause only.
KEEP_BEFORE_MS: Final = 40
# Before the answer's first sound: one 5 ms step of the onset search (below -45 dBFS), so that
# the first 20 ms frame out already sounds (20 ms kept made it a silent frame: 20 ms later).
KEEP_BEFORE_FIRST_MS: Final = 5
KEEP_AFTER_SENTENCE_MS: Final = 220
KEEP_AFTER_CLAUSE_MS: Final = 120


class ClauseTrimmer:
    """One clause's audio, piece by piece as the TTS streams it, without the silence the TTS
    put around it, less a natural pause.

    Nothing audible is held back: silence before the first sound is dropped (but the last
    ``KEEP_BEFORE_MS``), and silence at the end of each piece waits for the next one, which
    either goes on speaking (the silence was a pause inside the clause and is played) or the
    clause ends (:meth:`end` returns the pause after it, exactly ``KEEP_AFTER_*_MS`` long).
    """

    def __init__(self, rate: int, text: str, *, first: bool) -> None:
        self.rate = rate
        keep_before = KEEP_BEFORE_FIRST_MS if first else KEEP_BEFORE_MS
        keep_after = KEEP_AFTER_SENTENCE_MS if SENTENCE_END.search(text) else KEEP_AFTER_CLAUSE_MS
        self._before = 2 * round(rate * keep_before / 1000)
        self._after = 2 * round(rate * keep_after / 1000)
        self._heard = False
        self._silence = b""  # held back: before the first sound, or after the latest

    @property
    def heard(self) -> bool:
        """Whether anything audible came yet."""
        return self._heard

    def feed(self, pcm: bytes) -> bytes:
        """The part of ``pcm`` to play now."""
        pcm = self._silence + pcm
        if not self._heard:
            silent = leading_silence(pcm, self.rate, keep_ms=0)
            if silent >= len(pcm) - 2 * (self.rate // 200):  # nothing audible yet
                self._silence = pcm[len(pcm) - min(len(pcm), self._before) :]
                return b""
            self._heard = True
            pcm = pcm[max(0, silent - self._before) :]
        cut = len(pcm) - trailing_silence(pcm, self.rate, keep_ms=0)
        self._silence = pcm[cut:]
        return pcm[:cut]

    def end(self) -> bytes:
        """The pause after the clause (nothing if the clause was silent)."""
        if not self._heard:
            return b""
        pause = self._silence[: self._after]
        return pause + bytes(self._after - len(pause))
