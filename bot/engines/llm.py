"""Thinking with llama-cpp-python: streaming chat completions and per-call conversations.

One :class:`LlamaLlm` per process holds the weights and one llama.cpp context; each call has its
own :class:`Dialogue` (system prompt + history). The replies of all calls are decoded
together (continuous batching): each reply has a sequence of the context's KV cache, and every
``llama_decode`` takes one token of each reply in progress plus the prompts of new ones. A
sequence keeps its cache after its reply, so a call's next turn evaluates only the new words;
the system prompt, shared by every call of a profile, is copied between sequences, not
evaluated again: a new turn never waits for another call's whole reply.

llama.cpp moves some weights into "extra" buffer types with CPU-specific layouts (AMX tiles,
repacked Q4). Built on a CPU with AMX, llama-cpp-python 0.3.36 picks the AMX layout and then
crashes the process (SIGSEGV) on the first prompt of more than one token (seen on a Sapphire
Rapids VM). scripts/bootstrap compiles AMX out (``-mno-amx-*``); for a build that has it anyway
(a wheel built elsewhere), ``extra_buffers = "auto"`` turns the extra layouts off (no slower
here).

llama.cpp built with OpenMP (pip's default) runs its thread pool on libgomp, the same library
(by soname) PyTorch uses for Kokoro's vocoder. Once PyTorch's threads exist, libgomp counts more
OpenMP threads than cores and "throttles": llama.cpp's barriers, one per graph node, sleep
instead of spinning, and every prompt runs ~1.5x slower. scripts/bootstrap builds llama.cpp with
``-DGGML_OPENMP=OFF`` (its own thread pool); the stack warns about an OpenMP build beside
PyTorch's vocoder.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from ..config import DEFAULT_SYSTEM_PROMPT, MODEL_PACKS, ModelSettings, default
from . import Activity, EngineFailed, ModelUnavailable
from .base import Message, Usage
from .llama_api import (
    LlamaApi,
    built_with,
    built_with_amx,
    chat_formatter,
    load_params,
    offloads_to_gpu,
)
from .models import resolve

BATCH_TOKENS: Final = 512  # tokens one llama_decode takes: new prompts and one per reply
USER_MARKER: Final = "\x1f"  # where the next user message's words start (see _up_to_next_user)


@dataclass(frozen=True, slots=True)
class LlmOptions:
    # catalogue name, GGUF path, or "owner/repo:file.gguf" on HF
    model: str = MODEL_PACKS["default"]["llm"]
    n_ctx: int = default(ModelSettings, "llm_n_ctx")  # per reply (each sequence's window)
    threads: int = default(ModelSettings, "threads")
    max_tokens: int = default(ModelSettings, "llm_max_tokens")
    temperature: float = 0.2  # low: a business's facts, said as the prompt gives them
    top_p: float = 0.9
    seed: int = -1
    stop: tuple[str, ...] = ()
    # llama.cpp's extra weight layouts: auto (off if built with AMX)
    extra_buffers: str = default(ModelSettings, "llm_extra_buffers")
    parallel: int = default(ModelSettings, "llm_parallel")  # replies decoded together
    gpu_layers: int = default(ModelSettings, "llm_gpu_layers")  # -1: all


@dataclass(eq=False)
class _Slot:
    """One llama.cpp sequence. ``tokens`` are what its KV cache holds, position by position."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    owner: _Generation | None = None
    used: float = 0.0  # when it last served a reply (the least recently used one is taken)
    spare: bool = False  # its conversation is over (see LlamaLlm.forget): taken first


@dataclass(eq=False)
class _Generation:
    """One reply on its way. Its consumer's thread reads ``pieces``; a stepping thread fills
    them (see :meth:`LlamaLlm._next`)."""

    prompt: list[int]
    max_tokens: int
    stop: tuple[str, ...]
    sampler: Any
    usage: Usage
    submitted: float
    slot: _Slot | None = None
    todo: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    next_token: int | None = None  # sampled, to evaluate when the consumer wants a piece
    want: bool = False  # the consumer waits for a piece
    pieces: list[str] = field(default_factory=list)
    finish: str | None = None  # "stop" | "length" once the reply is complete
    error: BaseException | None = None
    tokens: int = 0
    text: str = ""  # the reply so far
    sent: int = 0  # characters of ``text`` in ``pieces`` already
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _rank(slot: _Slot, prompt: list[int]) -> tuple[int, int, float]:
    """How good a free slot is for ``prompt``: least of another conversation lost (nothing,
    for a spare one), then the longest prefix kept, then the least recently used."""
    common = _common_prefix(slot.tokens, prompt)
    return 0 if slot.spare else common - len(slot.tokens), common, -slot.used


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may be the start of a stop string."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def _device(gpu_layers: int, low_level: Any) -> str:
    """Where the layers run, as doctor says it; a GPU this build cannot use stops the load."""
    if gpu_layers and not offloads_to_gpu(low_level):
        raise ModelUnavailable(
            f"models.llm_gpu_layers = {gpu_layers}, but this llama-cpp-python has no GPU "
            'offload: reinstall it with CMAKE_ARGS="-DGGML_CUDA=on"'
        )
    return {0: "cpu", -1: "gpu (all layers)"}.get(gpu_layers, f"gpu ({gpu_layers} layers)")


class LlamaLlm:
    """The LLM of a process, shared by its calls: ``options.parallel`` replies at a time are
    decoded together, one token each per ``llama_decode`` (continuous batching).

    Batching is cheap on a CPU (one token of four sequences costs ~1.6x one alone, 2 cores).
    Each reply has a llama.cpp sequence of its own
    (a *slot*): a call's next turn finds its previous prompt and reply still evaluated there,
    and a new call's prompt copies the system prompt's cells from a slot that has them. A new
    reply's prompt joins the very next batch, beside the tokens of the replies already going.

    There is no thread of its own: the consumer threads that wait for a piece take turns
    running a step (plan the batch, decode, sample) for every reply; a reply whose consumer is
    not asking (its call is synthesizing, or paused the LLM) sits out and costs nothing.
    """

    def __init__(
        self,
        options: LlmOptions | None = None,
        *,
        progress: bool = True,
        activity: Activity | None = None,
    ) -> None:
        self.options = o = options or LlmOptions()
        self.activity = activity or Activity()
        self._api = api = LlamaApi()
        low_level = api.low
        if o.extra_buffers not in ("auto", "on", "off"):
            raise ModelUnavailable(
                f"extra_buffers must be auto, on or off, not {o.extra_buffers!r}"
            )
        if o.parallel < 1:
            raise ModelUnavailable(f"parallel must be 1 or more, not {o.parallel}")
        self._low = low_level
        # OpenMP: see the module's docstring (Engines warns where it matters).
        self.openmp = built_with(low_level, "OPENMP")
        self.extra_buffers = o.extra_buffers == "on" or (
            o.extra_buffers == "auto" and not built_with_amx(low_level)
        )
        self.device = _device(o.gpu_layers, low_level)
        self.resolved = resolve(
            o.model.split(":")[0] if ":" in o.model else o.model, "llm", progress=progress
        )
        kwargs: dict[str, Any] = dict(
            # One cache for every sequence, each up to n_ctx; a common prefix shares cells.
            n_ctx=o.n_ctx * o.parallel,
            n_batch=BATCH_TOKENS,
            n_threads=o.threads,
            n_threads_batch=o.threads,
            n_gpu_layers=o.gpu_layers,
            verbose=False,
            seed=o.seed,
        )
        try:
            with load_params(low_level, extra_buffers=self.extra_buffers, sequences=o.parallel):
                self._llm: Any = self._load(api.Llama, kwargs)
            api.check_loaded(self._llm)
            self._batch = api.new_batch(BATCH_TOKENS)
            self._format = chat_formatter(self._llm)
        except ModelUnavailable:
            raise
        except Exception as exc:
            raise ModelUnavailable(f"cannot load LLM {o.model!r}: {exc}") from exc
        self._ctx = self._llm._ctx
        self._vocab = self._llm._model.vocab
        self.threads = o.threads  # llama.cpp's threads now (see _fit_threads)
        self._slots = [_Slot(seq) for seq in range(o.parallel)]
        self._queue: list[_Generation] = []  # waiting for a free slot
        self._running: list[_Generation] = []  # each in its slot
        # Guards the lists above and every _Generation's consumer-facing fields. The context,
        # the slots' tokens and the samplers belong to the stepping thread.
        self._cond = threading.Condition()
        self._stepping = False

    def _fit_threads(self) -> None:
        """One thread while STT or TTS computes beside the LLM, else ``options.threads``.

        llama.cpp's threads meet at a barrier after every graph node. Built without OpenMP
        (as scripts/bootstrap builds it), the barrier spins: with another engine's threads on
        the same cores, a descheduled thread keeps the other spinning (docs/performance.md).
        """
        want = self.activity.threads("llm", self.options.threads)
        if want != self.threads:
            self._ctx.set_n_threads(want, want)
            self.threads = want

    def _load(self, llama: Any, kwargs: dict[str, Any]) -> Any:
        o = self.options
        if self.resolved.source == "huggingface":
            repo, _, filename = o.model.partition(":")
            return llama.from_pretrained(repo, filename or "*q4_k_m.gguf", **kwargs)
        return llama(model_path=str(self.resolved.path), **kwargs)

    @property
    def contended(self) -> bool:
        """More than one reply wants the model (decoding, or waiting for a free sequence): a
        reply that pauses itself then frees no core, it only falls behind."""
        return len(self._queue) + len(self._running) > 1

    @property
    def n_ctx(self) -> int:
        """Tokens one reply's prompt and answer may take."""
        return self.options.n_ctx

    @property
    def max_tokens(self) -> int:
        return self.options.max_tokens

    def count_tokens(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def evaluated(self) -> list[str]:
        """What each sequence's cache holds (a diagnostic)."""
        return [
            self._llm.detokenize(s.tokens, special=True).decode(errors="replace")
            for s in self._slots
        ]

    def warm_up(self, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
        """One short generation: the first after load is several times slower than the rest.
        It leaves ``system_prompt`` evaluated in a sequence, where every call's prompt starts
        (a new reply copies that prefix instead of evaluating it: ~0.2 s less)."""
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": "Say hello."},
        ]
        return "".join(self.stream(messages, max_tokens=8))

    def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        stop: tuple[str, ...] | None = None,
        usage: Usage | None = None,
        temperature: float | None = None,
    ) -> Generator[str, None, None]:
        """Streams the reply's text pieces; blocking. ``usage`` is filled in as it goes."""
        o = self.options
        usage = usage if usage is not None else Usage()
        start = time.perf_counter()
        prompt = self._prompt(messages)
        room = o.n_ctx - len(prompt)
        if room < 1:
            raise EngineFailed(f"LLM failed: the prompt takes {len(prompt)} tokens of {o.n_ctx}")
        g = _Generation(
            prompt=prompt,
            max_tokens=min(max_tokens or o.max_tokens, room),
            stop=stop if stop is not None else o.stop,
            sampler=self._sampler(o.temperature if temperature is None else temperature),
            usage=usage,
            submitted=start,
        )
        try:
            with self._submitted(g):
                while (piece := self._next(g)) is not None:
                    if usage.first_token_s is None:
                        usage.first_token_s = time.perf_counter() - start - usage.wait_s
                    usage.completion_tokens += 1
                    yield piece
                usage.finish_reason = g.finish
        finally:
            usage.total_s = time.perf_counter() - start - usage.wait_s
            # g.sampler is freed with g: a step running now may still be sampling with it.

    def prepare(self, messages: list[Message]) -> None:
        """Evaluates what the next turn's prompt will start with, ``messages`` and the
        template's opening of a user message, in the sequence that holds ``messages`` (a reply
        ends before the template's end-of-message marker): ~5 tokens, ~40 ms, the next turn
        will not wait for. Blocking; skipped while a reply waits for a sequence."""
        if self._queue:
            return
        tokens = self._up_to_next_user(messages)
        g = _Generation(tokens, 0, (), None, Usage(), time.perf_counter())
        with self._submitted(g):
            while self._next(g) is not None:
                pass

    def forget(self, messages: list[Message]) -> None:
        """The conversation ``messages`` is over (its call ended): the sequence holding it is
        the first a new reply takes. Ranked like a live one, a longer finished conversation
        was kept and a live call's, idle between two turns, was overwritten: that call's next
        turn evaluated its whole history again (34-65 tokens, one 300-550 ms step on one
        thread, which every other reply waited for; 7 of 32 turns at four calls)."""
        if len(messages) < 2:
            return  # nothing of its own was evaluated
        tokens = self._up_to_next_user(messages)
        system = self._up_to_next_user(messages[:1])
        with self._cond:
            free = [s for s in self._slots if s.owner is None]
            best = max(free, key=lambda s: _common_prefix(s.tokens, tokens), default=None)
            if best is not None and _common_prefix(best.tokens, tokens) > len(system):
                best.spare = True

    # --- the batch ------------------------------------------------------------------------------

    def _prompt(self, messages: list[Message], *, until: str | None = None) -> list[int]:
        """The tokens of ``messages`` in the chat template (those before ``until`` only)."""
        try:
            formatted = self._format(messages=messages)
            text = formatted.prompt
            if until is not None:
                text = text[: text.index(until)]
            return list(
                self._llm.tokenize(
                    text.encode("utf-8"), add_bos=not formatted.added_special, special=True
                )
            )
        except Exception as exc:
            raise EngineFailed(f"LLM failed: cannot format the prompt ({exc})") from exc

    def _up_to_next_user(self, messages: list[Message]) -> list[int]:
        """The tokens of ``messages`` and of the template's opening of the next user message,
        up to where its words will start."""
        opening = {"role": "user", "content": USER_MARKER}
        return self._prompt([*messages, opening], until=USER_MARKER)

    @contextlib.contextmanager
    def _submitted(self, g: _Generation) -> Iterator[None]:
        """``g`` queued for a slot while inside; its slot or queue place freed on the way out."""
        with self._cond:
            self._queue.append(g)
        try:
            yield
        finally:
            with self._cond:
                self._leave(g)
                self._cond.notify_all()

    def _sampler(self, temperature: float) -> Any:
        """What ``Llama.create_chat_completion`` samples with (its defaults, and ours)."""
        o = self.options
        sampler = self._api.new_sampler()
        seed = o.seed if o.seed >= 0 else self._low.LLAMA_DEFAULT_SEED
        if temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(40)
            sampler.add_top_p(o.top_p, 1)
            sampler.add_min_p(0.05, 1)
            sampler.add_temp(temperature)
            sampler.add_dist(seed)
        return sampler

    def _next(self, g: _Generation) -> str | None:
        """``g``'s next piece, or None at its end. While none is there and no other thread is
        stepping, this thread steps (for every reply)."""
        with self._cond:
            while True:
                g.want = True
                if g.error is not None:
                    raise g.error
                if g.pieces:
                    g.want = False
                    return g.pieces.pop(0)
                if g.finish is not None:
                    return None
                if self._stepping:
                    self._cond.wait()
                    continue
                plan = self._plan()
                if not plan:
                    # Admitted with nothing to evaluate (see prepare), or every slot busy
                    # with a reply whose consumer is not asking: wait for one to ask.
                    if g.finish is None:
                        self._cond.wait()
                    continue
                self._stepping = True
                self._cond.release()
                try:
                    sampled = self._step(plan)
                finally:
                    self._cond.acquire()
                    self._stepping = False
                    self._cond.notify_all()
                for gen, token in sampled:
                    self._accept(gen, token)
                for gen, _ in plan:
                    if not gen.max_tokens and not gen.todo:  # evaluated (see prepare)
                        self._leave(gen)

    def _admit(self) -> None:
        """Gives waiting replies the free slots. A slot's cache beyond the prompt's prefix is
        another call's conversation, lost if taken: the slot that loses least is taken (a
        call's own, else an empty one, else the least recently used). The longest prefix
        evaluated in any slot (the system prompt, at least) is copied over, not evaluated."""
        mem = self._ctx.memory
        while self._queue:
            free = [s for s in self._slots if s.owner is None]
            if not free:
                return
            g = self._queue.pop(0)
            slot = max(free, key=functools.partial(_rank, prompt=g.prompt))
            keep = _common_prefix(slot.tokens, g.prompt)
            donor = max(self._slots, key=lambda s: _common_prefix(s.tokens, g.prompt))
            shared = _common_prefix(donor.tokens, g.prompt)
            if shared > keep:
                self._low.llama_memory_seq_rm(mem, slot.seq, -1, -1)
                self._low.llama_memory_seq_cp(mem, donor.seq, slot.seq, 0, shared)
                slot.tokens, keep = donor.tokens[:shared], shared
            if g.max_tokens:
                keep = min(keep, len(g.prompt) - 1)  # the last prompt token gives the logits
            self._low.llama_memory_seq_rm(mem, slot.seq, keep, -1)
            del slot.tokens[keep:]
            g.slot, slot.owner, g.todo = slot, g, g.prompt[keep:]
            slot.spare = False
            if not g.todo:  # nothing to evaluate (see prepare)
                self._leave(g)
                continue
            g.usage.wait_s = time.perf_counter() - g.submitted
            self._running.append(g)

    def _plan(self) -> list[tuple[_Generation, list[int]]]:
        """This step's batch: one token of each reply whose consumer wants one, then the prompts
        still to evaluate (as much as fits)."""
        self._admit()
        plan: list[tuple[_Generation, list[int]]] = []
        room = BATCH_TOKENS
        for g in self._running:
            if not g.todo and g.want and g.next_token is not None:
                plan.append((g, [g.next_token]))
                g.next_token = None
                room -= 1
        for g in self._running:
            if g.todo and room > 0:
                take = g.todo[:room]
                del g.todo[:room]
                plan.append((g, take))
                room -= len(take)
        return plan

    def _step(self, plan: list[tuple[_Generation, list[int]]]) -> list[tuple[_Generation, int]]:
        """One ``llama_decode`` of the plan; the tokens sampled for the replies it completed."""
        batch = self._batch.batch
        n = 0
        outputs: list[tuple[_Generation, int]] = []
        for g, tokens in plan:
            slot = g.slot
            assert slot is not None
            for i, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = len(slot.tokens) + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq
                batch.logits[n] = i == len(tokens) - 1 and not g.todo and g.max_tokens > 0
                n += 1
            slot.tokens += tokens
            if batch.logits[n - 1]:
                outputs.append((g, n - 1))
        batch.n_tokens = n
        try:
            with self.activity.running("llm"):
                self._fit_threads()
                self._ctx.decode(self._batch)
            return [(g, g.sampler.sample(self._ctx, i)) for g, i in outputs]
        except Exception as exc:
            # What the failed step left in these sequences is unknown: start them afresh.
            failure = EngineFailed(f"LLM failed: {exc}")
            for g, _ in plan:
                if g.slot is not None:
                    self._low.llama_memory_seq_rm(self._ctx.memory, g.slot.seq, -1, -1)
                    g.slot.tokens = []
                g.error = failure
            return []

    def _accept(self, g: _Generation, token: int) -> None:
        """A sampled token: a piece of text for the consumer, or the end of the reply."""
        if g.finish is not None or g.error is not None:
            return  # the consumer left while the step ran
        if self._low.llama_vocab_is_eog(self._vocab, token):
            g.finish = "stop"
        else:
            g.tokens += 1
            g.next_token = token
            g.text += g.decoder.decode(self._piece(token))
            for stop in g.stop:
                if (at := g.text.find(stop)) >= 0:
                    g.text, g.finish = g.text[:at], "stop"
            if g.finish is None and g.tokens >= g.max_tokens:
                g.finish = "length"
        if g.finish is not None:
            g.text += g.decoder.decode(b"", final=True)
            end = len(g.text)
        else:
            end = len(g.text) - _held_back(g.text, g.stop)
        if end > g.sent:
            g.pieces.append(g.text[g.sent : end])
            g.sent = end
        if g.finish is not None:
            self._leave(g)

    def _piece(self, token: int) -> bytes:
        return self._api.token_piece(self._vocab, token)

    def _leave(self, g: _Generation) -> None:
        """Frees ``g``'s slot (its cache stays, for the call's next turn) or its queue place."""
        if g in self._queue:
            self._queue.remove(g)
        if g in self._running:
            self._running.remove(g)
        slot = g.slot
        if slot is not None and slot.owner is g:
            slot.owner = None
            slot.used = time.perf_counter()
        g.finish = g.finish or "stop"


__all__ = ["EngineFailed", "LlamaLlm", "LlmOptions", "Usage"]
