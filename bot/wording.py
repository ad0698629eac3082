"""Words as the bot hears and says them: spoken digits, codes read back, word errors.

Whisper writes a number spoken digit by digit as words or as spaced digits ("four seven one
one", "4, 7, 1, 1"); a caller means one number, and the LLM copies it best written as one
(``join_digits``: 4711). Read back, a code must be said digit by digit: a TTS reads "4711" as
"four thousand seven hundred eleven" (``spoken_codes``: "4 7 1 1").
"""

from __future__ import annotations

import re
from typing import Final

DIGIT_WORDS: Final = {
    "zero": "0",
    "oh": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
}
# A run of single digits (as words or figures), apart by spaces, commas or dashes.
_DIGIT: Final = r"(?:\d|zero|oh|one|two|three|four|five|six|seven|eight|nine)"
_DIGIT_RUN: Final = re.compile(rf"\b{_DIGIT}(?:[\s,.-]+{_DIGIT}\b)+", re.IGNORECASE)
# Four or more digits standing alone: a code, not an amount (no currency, no thousands comma).
_CODE: Final = re.compile(r"(?<![\d$€£,.])\b\d{4,}\b(?![,.]\d)")
_YEAR: Final = re.compile(r"^(19|20)\d\d$")
MIN_DIGITS: Final = 3  # "one two" may be "one to two"; three digits in a row are a number


def join_digits(text: str) -> str:
    """Runs of three or more spoken digits become one number: "four seven one one" -> 4711.
    ("oh" and "o" count as zero only inside a run that has another digit.)"""

    def join(m: re.Match[str]) -> str:
        parts = re.findall(_DIGIT, m.group(0), re.IGNORECASE)
        if len(parts) < MIN_DIGITS or sum(p.lower() == "oh" for p in parts) == len(parts):
            return m.group(0)
        tail = m.group(0)[len(m.group(0).rstrip(",.-")) :]
        return "".join(DIGIT_WORDS.get(p.lower(), p) for p in parts) + tail

    return _DIGIT_RUN.sub(join, text)


def spoken_codes(text: str) -> str:
    """Codes (four or more digits, not an amount or a year) spaced out to be read digit by
    digit: "number 4711." -> "number 4 7 1 1."."""

    def space(m: re.Match[str]) -> str:
        digits = m.group(0)
        return digits if _YEAR.match(digits) else " ".join(digits)

    return _CODE.sub(space, text)


def words(text: str) -> list[str]:
    """Lower-case words and numbers, punctuation dropped, spoken digits joined."""
    return re.findall(r"[a-z0-9']+", join_digits(text).lower())


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """Word-level edit distance and the reference's length in words (for WER)."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)
