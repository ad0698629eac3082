"""One call's dialogue with the LLM: the system prompt, the turns so far, and a guard against
a small model that answers by repeating the caller."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from ..config import DEFAULT_SYSTEM_PROMPT
from ..engines import EngineFailed
from ..engines.base import LlmEngine, Message, Usage
from ..wording import words

ECHO_MIN_WORDS: Final = 3  # a caller's shorter turn ("Thanks, bye.") may well be said back
ECHO_WORDS: Final = 4  # a reply whose first words are the caller's first this many is an echo
ANSWER_REMINDER: Final = "(Answer the caller in your own words; do not repeat what they said.)"


class EchoGuard:
    """Holds a reply's first pieces while they repeat the caller's first words: released as
    soon as the reply says something else, dropped (``echo``) once it has repeated
    ``ECHO_WORDS`` of them."""

    def __init__(self, user_text: str) -> None:
        self._user = words(user_text)
        self._held: list[str] = []
        self.deciding = len(self._user) >= ECHO_MIN_WORDS
        self.echo = False

    def feed(self, piece: str) -> list[str]:
        """The pieces to say now."""
        if not self.deciding:
            return [piece]
        self._held.append(piece)
        text = "".join(self._held)
        said = words(text)
        # The last word may go on ("canc" of "cancel") while the text ends inside it.
        whole, tail = (said[:-1], said[-1]) if said and text[-1:].isalnum() else (said, "")
        following = self._user[len(whole)] if len(whole) < len(self._user) else ""
        if whole != self._user[: len(whole)] or not following.startswith(tail):
            return self.flush()
        if len(whole) >= min(ECHO_WORDS, len(self._user)):
            self.deciding, self.echo, self._held = False, True, []
        return []

    def flush(self) -> list[str]:
        """The held pieces: the reply said something else, or ended before it could tell."""
        out, self._held, self.deciding = self._held, [], False
        return out


@dataclass
class Dialogue:
    """One call's dialogue: a system prompt and the turns so far, trimmed to the context."""

    llm: LlmEngine
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_tokens: int | None = None
    history: list[Message] = field(default_factory=list)
    reserve: int = 64  # tokens kept free for the chat template's own markers
    # An exchange ``keep`` refused when its reply was complete (see ``keep_held``), with it.
    _held: tuple[Callable[[], bool], str, str] | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def messages(self, user_text: str) -> list[Message]:
        msgs = [*self.history, {"role": "user", "content": user_text}]
        budget = self.llm.n_ctx - (self.max_tokens or self.llm.max_tokens) - self.reserve
        budget -= self.llm.count_tokens(self.system_prompt)
        # Drop the oldest exchanges first; the newest user turn always stays.
        while len(msgs) > 1 and sum(self.llm.count_tokens(m["content"]) + 8 for m in msgs) > budget:
            msgs = msgs[2:] if len(msgs) > 2 else msgs[1:]
        return [{"role": "system", "content": self.system_prompt}, *msgs]

    def reply(
        self,
        user_text: str,
        *,
        usage: Usage | None = None,
        keep: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """Streams the reply. The turn joins the history when the stream ends, also when the
        caller of this generator stops early (a short answer, or barge-in): then the history
        holds what was generated. ``keep``, asked at that moment, can say the exchange has not
        happened yet (a reply started ahead of the caller's last word): it is held until
        ``keep_held`` says it did, and forgotten if the next reply starts first (the caller
        went on); a reply of which nothing was generated leaves no trace either.

        A reply that starts by repeating the caller's words (a small model copying its input,
        which it then keeps doing for the rest of the call once it is in the history) is
        never spoken: its first pieces are held until they say something else, and an echo is
        answered again, greedily, with a reminder after the caller's words."""
        said: list[str] = []
        with self._lock:
            self._held = None
        try:
            for attempt, temperature in enumerate((None, 0.0)):
                text = user_text if attempt == 0 else f"{user_text}\n{ANSWER_REMINDER}"
                guard = EchoGuard(user_text)
                stream = self.llm.stream(
                    self.messages(text),
                    max_tokens=self.max_tokens,
                    usage=usage,
                    temperature=temperature,
                )
                with contextlib.closing(stream):  # an echo frees its sequence at once
                    for piece in stream:
                        for out in guard.feed(piece):
                            said.append(out)
                            yield out
                        if guard.echo:
                            break
                if not guard.echo:
                    for out in guard.flush():
                        said.append(out)
                        yield out
                    return
        finally:
            reply = "".join(said).strip()
            with self._lock:
                kept = bool(reply) and (keep is None or keep())
                if kept:
                    self._remember(user_text, reply)
                elif reply and keep is not None:
                    self._held = (keep, user_text, reply)
            if kept:
                self.llm.prepare(self.messages("")[:-1])

    def keep_held(self, keep: Callable[[], bool]) -> bool:
        """The exchange held for ``keep`` happened after all (its turn ended): into the
        history; whether there was one. (The LLM is not asked to prepare for it here, on the
        event loop's thread: see ``prepare_next``.)"""
        with self._lock:
            if self._held is None or self._held[0] != keep:
                return False
            _, user_text, reply = self._held
            self._held = None
            self._remember(user_text, reply)
            return True

    def prepare_next(self) -> None:
        """Has the LLM evaluate what the next turn's prompt starts with (blocking; a hint)."""
        with contextlib.suppress(EngineFailed):
            self.llm.prepare(self.messages("")[:-1])

    def _remember(self, user_text: str, reply: str) -> None:
        self.history += [
            {"role": "user", "content": user_text},
            {"role": "assistant", "content": reply},
        ]
        # Keep the stored history bounded (the prompt is trimmed again at each turn).
        if len(self.history) > 40:
            del self.history[:2]

    def close(self) -> None:
        """The call is over: its sequence in the LLM may be taken first (see ``forget``)."""
        if self.history:
            with contextlib.suppress(EngineFailed):  # a hint: never what ends a call
                self.llm.forget(self.messages("")[:-1])
