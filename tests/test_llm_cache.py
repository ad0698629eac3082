"""What each llama.cpp sequence holds, checked on the real model after many calls and turns.

The LLM keeps every call's conversation evaluated in a sequence of one KV cache and reuses it
(the call's next turn, another call's system prompt). If its bookkeeping (``_Slot.tokens``) and
the cache ever disagreed, a reply would be computed from a state no prompt describes: a model
that sees a wrong context copies the caller's words back. These tests run random sequences of
turns, replies cut short, replies started ahead and dropped, and calls ending and starting, and
after each step check every sequence against the model itself: the cache holds exactly as many
positions as the bookkeeping says, and the next-token logits it gives equal those of the same
tokens evaluated from scratch in a fresh context.
"""

from __future__ import annotations

import ctypes
import random
import threading
from typing import Any

import numpy as np
import pytest

from bot.conversation.dialogue import Dialogue, EchoGuard
from bot.engines.llm import LlamaLlm, LlmOptions
from bot.wording import words

SYSTEM = "You are the phone assistant of a bike shop. Answer in one short sentence."
CALLER = (
    "What are your opening hours on Saturday?",
    "Where is your shop?",
    "How much does a basic service cost?",
    "My customer number is 4711, can you check my repair?",
    "I would like to cancel my subscription, please.",
    "Okay, thank you, goodbye.",
    "Can you tell me a fun fact about the moon?",
    "My order has not arrived yet, what should I do?",
)


@pytest.fixture(scope="module")
def llm() -> LlamaLlm:
    llm = LlamaLlm(LlmOptions(seed=11, parallel=4), progress=False)
    llm.warm_up(SYSTEM)
    return llm


class Reference:
    """The same weights in a context of their own: logits of tokens evaluated from scratch."""

    def __init__(self, llm: LlamaLlm) -> None:
        from llama_cpp import Llama

        self.llama = Llama(
            model_path=str(llm.resolved.path), n_ctx=2048, n_threads=2, verbose=False, seed=1
        )

    def logits(self, tokens: list[int]) -> np.ndarray:
        self.llama._ctx.kv_cache_clear()
        self.llama.reset()
        self.llama.eval(tokens)
        return last_logits(self.llama._ctx.ctx, len(self.llama.scores[0]), -1)


def last_logits(ctx: Any, n_vocab: int, i: int) -> np.ndarray:
    from llama_cpp import llama_cpp as low

    row = ctypes.cast(low.llama_get_logits_ith(ctx, i), ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(row, (n_vocab,)).copy()


def cached_logits(llm: LlamaLlm, seq: int, tokens: list[int]) -> np.ndarray:
    """The sequence's next-token logits: its last token evaluated again on what the cache
    holds before it (which leaves the cache as it was)."""
    low, ctx = llm._low, llm._ctx
    low.llama_memory_seq_rm(ctx.memory, seq, len(tokens) - 1, -1)
    batch = llm._batch.batch
    batch.token[0], batch.pos[0] = tokens[-1], len(tokens) - 1
    batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = 1, seq, True
    batch.n_tokens = 1
    ctx.decode(llm._batch)
    return last_logits(ctx.ctx, low.llama_vocab_n_tokens(llm._vocab), 0)


def audit(llm: LlamaLlm, ref: Reference) -> None:
    """Every sequence's cache is what its bookkeeping says, token for token."""
    assert not llm._running and not llm._queue and all(s.owner is None for s in llm._slots)
    for slot in llm._slots:
        top = llm._low.llama_memory_seq_pos_max(llm._ctx.memory, slot.seq)
        assert top + 1 == len(slot.tokens), f"sequence {slot.seq}: {top + 1} cached positions"
        if len(slot.tokens) < 2:
            continue
        got, want = cached_logits(llm, slot.seq, slot.tokens), ref.logits(slot.tokens)
        # Batched and lone evaluation round differently (a few hundredths): the same next
        # token stays on top, give or take a near tie. A wrong context is far off.
        assert got[int(want.argmax())] >= got.max() - 0.5, f"sequence {slot.seq}"
        assert np.corrcoef(got, want)[0, 1] > 0.99, f"sequence {slot.seq}"


def holds(llm: LlamaLlm, conv: Dialogue) -> bool:
    """Some sequence holds exactly the call's prompt built from scratch, up to where the
    caller's next words will go."""
    want = llm._up_to_next_user(conv.messages("")[:-1])
    return any(slot.tokens == want for slot in llm._slots)


def test_every_sequence_holds_what_its_bookkeeping_says_after_random_calls(
    llm: LlamaLlm,
) -> None:
    ref = Reference(llm)
    rng = random.Random(5)
    live: list[Dialogue] = []
    for step in range(40):
        op = rng.choice(["start", "turn", "turn", "cut", "ahead", "end", "together"])
        if op == "start" or not live:
            live.append(Dialogue(llm, system_prompt=SYSTEM, max_tokens=16))
        conv = rng.choice(live)
        if op in ("turn", "start"):
            assert "".join(conv.reply(rng.choice(CALLER))).strip()
        elif op == "cut":  # the caller barged in after a few pieces
            stream = conv.reply(rng.choice(CALLER))
            for _ in range(rng.randint(1, 4)):
                next(stream, None)
            stream.close()
        elif op == "ahead":  # a reply started at a pause, dropped when the caller went on
            before = list(conv.history)
            stream = conv.reply(rng.choice(CALLER), keep=lambda: False)
            for _ in range(rng.randint(1, 6)):
                next(stream, None)
            stream.close()
            assert conv.history == before
        elif op == "end":
            conv.close()
            live.remove(conv)
        elif op == "together" and len(live) >= 2:
            pair = rng.sample(live, 2)
            threads = [
                threading.Thread(target=lambda c=c: "".join(c.reply(rng.choice(CALLER))))
                for c in pair
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        if len(live) > 3:  # four sequences: a fifth live call would take a live call's
            live.pop(0).close()
        audit(llm, ref)
        # A call whose last step was a whole reply finds its conversation ready to go on.
        if op in ("turn", "start") and conv in live:
            assert holds(llm, conv), f"step {step}: {op}"


def test_no_reply_repeats_the_callers_words_over_many_calls(llm: LlamaLlm) -> None:
    replies: list[tuple[str, str]] = []
    rng = random.Random(9)
    for _ in range(8):
        conv = Dialogue(llm, system_prompt=SYSTEM, max_tokens=24)
        for text in rng.sample(CALLER, 4):
            replies.append((text, "".join(conv.reply(text)).strip()))
        conv.close()
    assert all(reply for _, reply in replies)
    echoes = [(t, r) for t, r in replies if words(r)[:4] == words(t)[:4]]
    assert not echoes


class Scripted:
    """An LLM double whose replies are given: the guard's decisions, without sampling."""

    def __init__(self, *replies: list[str]) -> None:
        self.replies = list(replies)
        self.prompts: list[list[dict[str, str]]] = []
        self.max_tokens = 50
        self.n_ctx = 2048

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(self, messages: list[dict[str, str]], **_: Any) -> Any:
        self.prompts.append(messages)
        yield from self.replies.pop(0)

    def prepare(self, messages: list[dict[str, str]]) -> None:
        pass


def test_an_echo_is_never_said_and_is_answered_again() -> None:
    text = "I would like to cancel my subscription, please."
    llm = Scripted(["I would", " like to", " cancel my", " subscription"], ["Of course", "."])
    conv = Dialogue(llm, system_prompt=SYSTEM)  # type: ignore[arg-type]
    assert "".join(conv.reply(text)) == "Of course."
    assert "repeat" in llm.prompts[1][-1]["content"]  # the second try is reminded
    assert conv.history[-2:] == [
        {"role": "user", "content": text},
        {"role": "assistant", "content": "Of course."},
    ]


def test_echo_guard_holds_only_what_repeats_the_caller() -> None:
    guard = EchoGuard("What are your opening hours?")
    assert guard.feed("What") == []  # may still be the caller's first word
    assert guard.feed(" time") == ["What", " time"]  # said something else: out at once
    assert guard.feed(" is it") == [" is it"] and not guard.echo
    short = EchoGuard("Thanks, bye.")  # a short turn may be said back
    assert short.feed("Thanks") == ["Thanks"]


def test_a_reply_with_nothing_said_leaves_no_trace() -> None:
    llm = Scripted([])
    conv = Dialogue(llm, system_prompt=SYSTEM)  # type: ignore[arg-type]
    assert "".join(conv.reply("Hello there, anyone?")) == ""
    assert conv.history == []


def test_a_reply_complete_before_its_turn_ended_joins_the_history_once_it_does() -> None:
    """A reply started ahead of the caller's endpoint may be generated whole before it: it is
    held, and joins the history when its turn ends; the next reply drops a held one (the
    caller went on, and that answer was never heard)."""
    llm = Scripted(["Yes", "."], ["No", "."], ["Maybe", "."])
    conv = Dialogue(llm, system_prompt=SYSTEM)  # type: ignore[arg-type]
    ended = threading.Event()
    assert "".join(conv.reply("Open today?", keep=ended.is_set)) == "Yes."
    assert conv.history == []  # not yet: the caller may go on
    ended.set()
    assert conv.keep_held(ended.is_set) and not conv.keep_held(ended.is_set)
    assert conv.history[-2:] == [
        {"role": "user", "content": "Open today?"},
        {"role": "assistant", "content": "Yes."},
    ]
    dropped = threading.Event()
    assert "".join(conv.reply("Open on Sunday?", keep=dropped.is_set)) == "No."
    "".join(conv.reply("Open on Sunday, then?", keep=None))  # the caller went on
    assert not conv.keep_held(dropped.is_set)
    assert [m["content"] for m in conv.history] == [
        "Open today?",
        "Yes.",
        "Open on Sunday, then?",
        "Maybe.",
    ]
