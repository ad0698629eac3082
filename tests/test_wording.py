"""Numbers as callers say them and as the bot reads them back; word errors."""

from __future__ import annotations

import pytest

from bot.engines.stt import unlooped
from bot.wording import join_digits, spoken_codes, word_errors, words


@pytest.mark.parametrize(
    ("heard", "meant"),
    [
        ("My customer number is four seven one one.", "My customer number is 4711."),
        ("It is 4 7 1 1, thanks", "It is 4711, thanks"),
        ("4, 7, 1, 1.", "4711."),
        ("Number 4-7-1-1 please", "Number 4711 please"),
        ("one oh five", "105"),
        ("Seven Two Nine", "729"),
        # Not a number said digit by digit: left alone.
        ("I have one two", "I have one two"),
        ("Oh, one more thing", "Oh, one more thing"),
        ("from one to five", "from one to five"),
        ("It costs 45 dollars", "It costs 45 dollars"),
    ],
)
def test_spoken_digits_become_one_number(heard: str, meant: str) -> None:
    assert join_digits(heard) == meant


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        ("Your customer number is 4711.", "Your customer number is 4 7 1 1."),
        ("Code 12345, right?", "Code 1 2 3 4 5, right?"),
        # Amounts, years, times and short numbers are read as numbers.
        ("A bike costs $4500.", "A bike costs $4500."),
        ("We opened in 2019.", "We opened in 2019."),
        ("It is 1,000 dollars.", "It is 1,000 dollars."),
        ("Open 9 am to 6 pm at 42 Harbour Road.", "Open 9 am to 6 pm at 42 Harbour Road."),
        ("Pi is 3.1415.", "Pi is 3.1415."),
    ],
)
def test_codes_are_read_back_digit_by_digit(reply: str, said: str) -> None:
    assert spoken_codes(reply) == said


def test_word_errors_count_what_a_caller_would() -> None:
    assert words("Hi, it's 4 7 1 1!") == ["hi", "it's", "4711"]
    assert word_errors("my number is four seven one one", "My number is 4711.") == (0, 4)
    assert word_errors("what are your opening hours", "what are you opening our") == (2, 5)
    assert word_errors("please call me", "") == (3, 3)


@pytest.mark.parametrize(
    ("decoded", "kept"),
    [
        (
            "Can I talk to a person please? Can I talk to a person please? Can I talk",
            "Can I talk to a person please?",
        ),
        ("Thank you. Thank you. Thank you.", "Thank you."),
        ("Hello there. How are you?", "Hello there. How are you?"),
        ("I said no. Then I said no.", "I said no. Then I said no."),
        ("It is one one one.", "It is one one one."),
    ],
)
def test_whisper_looping_is_cut_and_a_caller_repeating_is_not(decoded: str, kept: str) -> None:
    assert unlooped(decoded) == kept
