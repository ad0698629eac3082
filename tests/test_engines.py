"""The engines on real weights from the offline model pack (no network)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from bot.asterisk import audiosocket as p
from bot.audio import float_to_pcm, pcm_to_float
from bot.config import AssistantProfile
from bot.conversation.dialogue import Dialogue
from bot.engines import Activity, DeadlineLock, ModelUnavailable
from bot.engines.kokoro_stream import (
    BUCKET_FRAMES,
    CONTEXT_FRAMES,
    FIRST_WINDOW_FRAMES,
    GEN_FEATURES,
    GEN_SOURCE,
    GEN_STYLE,
    KOKORO_HOP,
    KOKORO_RATE,
    PAD_MARGIN_FRAMES,
    KokoroStreamer,
)
from bot.engines.llama_api import built_with, built_with_amx, load_params
from bot.engines.llm import (
    LlamaLlm,
    LlmOptions,
    Usage,
    _common_prefix,
    _held_back,
)
from bot.engines.models import CATALOG, materialize
from bot.engines.stack import openmp_beside_pytorch
from bot.engines.stt import SttOptions, WhisperStt
from bot.engines.tts import (
    KokoroG2P,
    KokoroOnnx,
    KokoroTorch,
    PiperTts,
    TtsOptions,
    sentences,
    speak,
)
from bot.engines.vocoder import TorchVocoder
from bot.tools import noise
from bot.wording import word_errors

from .conftest import fixture_stream

SENTENCE = "Thank you for calling. How can I help you today?"


@pytest.fixture(scope="module")
def activity() -> Activity:
    """One process's engines: what each sizes its threads by."""
    return Activity()


@pytest.fixture(scope="module")
def whisper(activity: Activity) -> WhisperStt:
    return WhisperStt(SttOptions(beam_size=5, threads=2), progress=False, activity=activity)


@pytest.fixture(scope="module")
def g2p() -> KokoroG2P:
    return KokoroG2P()


@pytest.fixture(scope="module")
def kokoro(g2p: KokoroG2P, activity: Activity) -> KokoroOnnx:
    return KokoroOnnx(TtsOptions(), g2p=g2p, progress=False, activity=activity)


@pytest.fixture(scope="module")
def llm(activity: Activity) -> LlamaLlm:
    return LlamaLlm(LlmOptions(seed=7, temperature=0.2), progress=False, activity=activity)


def wer(reference: str, heard: str) -> float:
    errors, words = word_errors(reference, heard)
    return errors / words


# --- STT ----------------------------------------------------------------------------------------


def test_stt_transcribes_a_real_telephone_recording(whisper: WhisperStt) -> None:
    """The caller audio of a real SIP call through Asterisk 22: espeak counting one to five."""
    data, _ = fixture_stream("asterisk22-sip-llama1")
    conn = p.Connection(p.Role.SERVER)
    conn.receive_data(data)
    conn.receive_data(b"")
    pcm = b"".join(e.pcm for e in conn.events() if isinstance(e, p.Audio))
    heard = whisper.transcribe(pcm, 8000)
    text = heard.text.lower()
    assert "test call" in text
    numbers = re.findall(r"\b(?:one|two|three|four|five|[1-5])\b", text)
    assert [n for n in numbers][:5] in (
        ["1", "2", "3", "4", "5"],
        ["one", "two", "three", "four", "five"],
    )
    assert heard.audio_seconds == pytest.approx(12.4)


# --- TTS: round trips through STT ---------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16000])
def test_kokoro_onnx_speaks_words_that_come_back(
    kokoro: KokoroOnnx, whisper: WhisperStt, rate: int
) -> None:
    pcm = b"".join(speak(kokoro, SENTENCE, rate))
    assert len(pcm) > 2 * rate * 1.0  # more than a second of speech
    heard = whisper.transcribe(pcm, rate)
    assert wer(SENTENCE, heard.text) <= 0.2, heard.text


def test_kokoro_yields_the_first_sentence_before_synthesizing_the_rest(
    kokoro: KokoroOnnx, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = kokoro._stream

    def counting(phonemes: str, style: Any) -> Iterator[np.ndarray]:
        calls.append(phonemes)
        return real(phonemes, style)

    monkeypatch.setattr(kokoro, "_stream", counting)
    chunks: Iterator[bytes] = speak(kokoro, "Hello there. This is a second sentence.", 8000)
    first = next(chunks)
    assert len(first) > 0 and len(calls) == 1  # audio is out before sentence two is started
    rest = list(chunks)
    assert len(calls) == 2 and rest


@pytest.mark.parametrize("vocoder", ["onnx", "torch"])
def test_kokoro_streams_a_sentence_in_windows_that_sound_like_the_whole(
    g2p: KokoroG2P,
    whisper: WhisperStt,
    monkeypatch: pytest.MonkeyPatch,
    vocoder: str,
) -> None:
    kokoro = KokoroOnnx(TtsOptions(vocoder=vocoder), g2p=g2p, progress=False)
    streamer = kokoro.streaming
    assert streamer is not None  # the offline pack's graph is the one the cut is made for
    assert kokoro.session is None  # the whole graph is not loaded a second time
    runs: list[int] = []  # frames per vocoder run
    if vocoder == "torch":
        assert streamer.vocoder is not None and streamer.generator is None
        real_vocoder = streamer.vocoder.run

        def counting_vocoder(features: Any, source: Any, style: Any) -> Any:
            runs.append(features.shape[2])
            return real_vocoder(features, source, style)

        monkeypatch.setattr(streamer.vocoder, "run", counting_vocoder)
    else:
        assert streamer.vocoder is None
        real = streamer.generator

        class Counting:
            def run(self, outputs: Any, feeds: dict[str, Any]) -> Any:
                runs.append(next(v for v in feeds.values() if v.ndim == 3).shape[2])
                return real.run(outputs, feeds)

        monkeypatch.setattr(streamer, "generator", Counting())
    sentence = "Our office opens at nine in the morning, and closes at five."
    pieces = kokoro.synthesize(sentence)
    first = next(pieces)
    assert len(runs) == 1  # the first audio after one short window of the vocoder
    assert 0.2 <= len(first) / KOKORO_RATE <= 0.5
    audio = np.concatenate([first, *pieces])
    assert len(runs) >= 2
    if vocoder == "torch":  # whole buckets: each length prepared once, at load
        assert all(n % BUCKET_FRAMES == 0 for n in runs), runs
    whole = KokoroOnnx(TtsOptions(streaming=False), g2p=g2p, progress=False)
    assert whole.streaming is None
    one_shot = np.concatenate(list(whole.synthesize(sentence)))
    # The same speech, less most of the silence the pad tokens would have been vocoded into.
    assert 0.7 * len(one_shot) <= len(audio) < len(one_shot)
    assert np.sqrt(np.mean(audio**2)) == pytest.approx(np.sqrt(np.mean(one_shot**2)), rel=0.3)
    boundary_jumps = np.abs(np.diff(audio)).max()
    assert boundary_jumps < 0.5  # windows are faded into each other, no clicks
    pcm = b"".join(speak(kokoro, sentence, 8000))
    heard = whisper.transcribe(pcm, 8000).text
    assert wer(sentence.replace("nine", "9").replace("five", "5"), heard) <= 0.15, heard


def log_spectral_distance(a: np.ndarray, b: np.ndarray, n: int = 256) -> float:
    """Mean over frames of the RMS difference of the two log spectra, in dB."""

    def spectra(x: np.ndarray) -> np.ndarray:
        window = np.hanning(n)
        frames = [x[i : i + n] * window for i in range(0, len(x) - n, n // 2)]
        return 20 * np.log10(np.abs(np.fft.rfft(frames, axis=1)) + 1e-6)

    return float(np.mean(np.sqrt(np.mean((spectra(a) - spectra(b)) ** 2, axis=1))))


def test_torch_vocoder_sounds_like_onnxruntimes(g2p: KokoroG2P) -> None:
    """The same generator on PyTorch in bfloat16, weights read out of the ONNX graph: as close
    to onnxruntime's int8 run as the int8 model is to its own float version (5.2 dB)."""
    onnx_side = KokoroOnnx(TtsOptions(vocoder="onnx"), g2p=g2p, progress=False)
    torch_side = KokoroOnnx(TtsOptions(vocoder="torch"), g2p=g2p, progress=False)
    a, b = onnx_side.streaming, torch_side.streaming
    assert a is not None and b is not None and a.generator is not None and b.vocoder is not None
    feeds = onnx_side._feeds(g2p("The capital of France is Paris."), onnx_side.style)
    assert feeds is not None
    features, source, _ = a.front.run(None, feeds)
    style = np.ascontiguousarray(feeds["style"][:, :128])
    (reference,) = a.generator.run(
        None, {GEN_FEATURES: features, GEN_SOURCE: source, GEN_STYLE: style}
    )[:1]
    reference = np.asarray(reference, dtype=np.float32).reshape(-1)
    ported = b.vocoder.run(features, source, style)
    assert ported.dtype == np.float32 and len(ported) == len(reference)
    assert len(ported) == features.shape[2] * KOKORO_HOP
    assert log_spectral_distance(reference, ported) < 6.5
    assert np.sqrt(np.mean(ported**2)) == pytest.approx(np.sqrt(np.mean(reference**2)), rel=0.2)
    # A model that is not Kokoro's has no generator to port.
    from onnx import helper

    with pytest.raises(ModelUnavailable, match="generator"):
        TorchVocoder.from_onnx(helper.make_model(helper.make_graph([], "empty", [], [])), 2)


def test_vocoder_choice(
    kokoro: KokoroOnnx, activity: Activity, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    from bot.engines import kokoro_stream

    model = onnx.load(str(kokoro.resolved.path))
    assert KokoroStreamer._torch_vocoder(model, "onnx", 2, activity) is None
    monkeypatch.setattr(kokoro_stream, "cpu_has_bf16", lambda: False)
    assert KokoroStreamer._torch_vocoder(model, "auto", 2, activity) is None  # no bfloat16 units
    assert KokoroStreamer._torch_vocoder(model, "torch", 2, activity) is not None  # asked for
    monkeypatch.setattr(kokoro_stream, "cpu_has_bf16", lambda: True)
    assert KokoroStreamer._torch_vocoder(model, "auto", 2, activity) is not None


def test_kokoro_window_plan_covers_the_speech_once() -> None:
    # 2 frames per duration unit; pads of 14 and 8 units (28 and 16 frames) around the words.
    durations = np.array([14, 3, 5, 20, 30, 40, 8], dtype=np.float32)
    frames = int(2 * durations.sum())
    windows = KokoroStreamer.windows(frames, durations)
    start, end = 28 - PAD_MARGIN_FRAMES, frames - 16 + PAD_MARGIN_FRAMES
    assert windows[0] == (start, start + PAD_MARGIN_FRAMES + FIRST_WINDOW_FRAMES)
    assert windows[-1][1] == end
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:], strict=False))
    sizes = [b - a for a, b in windows]
    assert all(later >= earlier for earlier, later in zip(sizes, sizes[1:-1], strict=False))
    # A clause shorter than one window is one window.
    assert KokoroStreamer.windows(40, np.array([5, 5, 10], dtype=np.float32)) == [(2, 28)]
    # For PyTorch's vocoder the first window is 64 frames with its context, the next ones the
    # longest prepared bucket (256), and a last one only needs its left context.
    long = np.array([14, *[10] * 40, 8], dtype=np.float32)
    bucketed = KokoroStreamer.windows(int(2 * long.sum()), long, bucketed=True)
    sizes = [b - a for a, b in bucketed]
    assert [s + 2 * CONTEXT_FRAMES for s in sizes[:3]] == [BUCKET_FRAMES, 256, 256]
    assert sum(sizes) == bucketed[-1][1] - bucketed[0][0] and 0 < sizes[-1] <= 240
    clause = np.array([14, *[10] * 9, 8], dtype=np.float32)  # ~1.1 s: two windows
    sizes = [b - a for a, b in KokoroStreamer.windows(int(2 * clause.sum()), clause, bucketed=True)]
    assert len(sizes) == 2 and sizes[0] + 2 * CONTEXT_FRAMES == BUCKET_FRAMES


def test_kokoro_graph_without_the_cut_tensors_synthesizes_in_one_piece(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["tokens"], ["audio"])],
        "other-export",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [1, None])],
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, None])],
    )
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert KokoroStreamer.split(path, vocoder="onnx", threads=2, activity=Activity()) is None


def test_piper_speaks_words_that_come_back(whisper: WhisperStt) -> None:
    piper = PiperTts(progress=False)
    pcm = b"".join(speak(piper, SENTENCE, 8000))
    heard = whisper.transcribe(pcm, 8000)
    assert wer(SENTENCE, heard.text) <= 0.2, heard.text
    # Whisper is sure of clear words, and doubts what it makes of a hiss ("You").
    threshold = AssistantProfile().misheard_below
    assert heard.confidence is not None and heard.confidence > threshold
    hiss = whisper.transcribe(float_to_pcm(0.1 * noise.pink(2.0, seed=3)), 8000)
    assert hiss.confidence is None or hiss.confidence < threshold, hiss


def test_unknown_voice_names_the_voices(g2p: KokoroG2P) -> None:
    with pytest.raises(ModelUnavailable, match="voices: jf_alpha, .*jm_kumo"):
        KokoroOnnx(TtsOptions(voice="af_nobody"), g2p=g2p, progress=False)


def test_kokoro_pytorch_path_runs_with_random_weights(tmp_path: Path, g2p: KokoroG2P) -> None:
    """No offline checkpoint exists: a KModel from the v1.0 config with random weights."""
    import torch
    from kokoro import KModel

    config = json.loads((Path(__file__).parent / "data" / "kokoro-v1.0-config.json").read_text())
    model = CATALOG["kokoro-v1.0-int8"]
    config["vocab"] = json.loads(materialize(model.files["vocab"], model).read_text())["vocab"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save({}, tmp_path / "empty.pth")
    torch.manual_seed(0)
    random_model = KModel(
        repo_id="hexgrad/Kokoro-82M", config=config, model=str(tmp_path / "empty.pth")
    )
    parts = ["bert", "bert_encoder", "predictor", "text_encoder", "decoder"]
    torch.save({k: getattr(random_model, k).state_dict() for k in parts}, tmp_path / "kokoro.pth")
    torch.save(0.1 * torch.randn(510, 1, 256), tmp_path / "voice.pt")

    engine = KokoroTorch(
        TtsOptions(
            backend="torch", model=str(tmp_path / "kokoro.pth"), voice=str(tmp_path / "voice.pt")
        ),
        g2p=g2p,
    )
    assert engine.native_rate == KOKORO_RATE
    phonemes = g2p("Hi.")
    out = engine.model(phonemes, engine.pack[len(phonemes) - 1], 1.0, return_output=True)
    # iSTFTNet: 600 samples at 24 kHz (25 ms) per predicted duration frame.
    assert len(out.audio) == int(out.pred_dur.sum()) * 600
    chunks = list(engine.synthesize("Hi."))
    assert len(chunks) == 1 and chunks[0].dtype == np.float32
    assert np.isfinite(chunks[0]).all() and np.abs(chunks[0]).max() > 0
    pcm = b"".join(speak(engine, "Hi.", 8000))
    assert len(pcm) // 2 == -(-len(chunks[0]) // 3)  # 24 kHz -> 8 kHz, same duration


def test_sentence_split() -> None:
    assert sentences("Hello there! How are you?  Fine.\nBye") == [
        "Hello there!",
        "How are you?",
        "Fine.",
        "Bye",
    ]


# --- LLM ----------------------------------------------------------------------------------------


def test_llm_warm_up_leaves_the_system_prompt_evaluated(llm: LlamaLlm) -> None:
    """Every call's prompt starts where the warm-up's did: a new reply copies that prefix."""
    assert llm.warm_up("You are Ada, the test line.").strip()
    assert any("You are Ada, the test line." in cached for cached in llm.evaluated())


def test_llm_streams_a_reply_in_pieces(llm: LlamaLlm) -> None:
    usage = Usage()
    pieces = list(llm.stream([{"role": "user", "content": "Say hello to Anna."}], usage=usage))
    assert len(pieces) > 1 and "".join(pieces).strip()
    assert usage.first_token_s is not None and usage.first_token_s <= usage.total_s
    assert usage.completion_tokens == len(pieces) and usage.finish_reason == "stop"


class DecodeSpy:
    """Records each llama_decode's batch: (sequence, position) of every token."""

    def __init__(self, llm: LlamaLlm, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[list[tuple[int, int]]] = []
        decode = llm._ctx.decode

        def spy(batch: Any) -> None:
            b = batch.batch
            self.batches.append([(b.seq_id[i][0], b.pos[i]) for i in range(b.n_tokens)])
            decode(batch)

        monkeypatch.setattr(llm._ctx, "decode", spy)


def test_llm_decodes_concurrent_replies_in_shared_batches(
    llm: LlamaLlm, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = DecodeSpy(llm, monkeypatch)
    replies: dict[int, str] = {}
    start = threading.Barrier(3)

    def ask(i: int) -> None:
        start.wait()
        messages = [{"role": "user", "content": f"Count from {i} to {i + 9}, in words."}]
        replies[i] = "".join(llm.stream(messages, max_tokens=16))

    threads = [threading.Thread(target=ask, args=(i,)) for i in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(replies) == [1, 2, 3] and all(r.strip() for r in replies.values())
    assert max(len({seq for seq, _ in batch}) for batch in spy.batches) >= 2
    # Three replies of 16 tokens, one at a time, take 3 x 16 decodes (prompts included).
    assert len(spy.batches) < 40
    assert all(slot.owner is None for slot in llm._slots) and not llm._running


def test_llm_keeps_each_conversation_in_its_sequence(
    llm: LlamaLlm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call's next turn evaluates only its new words; another call's prompt copies the
    system prompt from the sequence that has it instead of evaluating it."""
    system = {"role": "system", "content": "You are Bea, who answers in five words."}
    first = [system, {"role": "user", "content": "Hello, who is this?"}]
    answer = "".join(llm.stream(first, max_tokens=10))
    spy = DecodeSpy(llm, monkeypatch)
    turn = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "Bye."}]
    assert "".join(llm.stream(turn, max_tokens=4)).strip()
    new_words = len(llm._prompt(turn)) - len(llm._prompt(first))
    prompt_tokens = len(spy.batches[0])
    assert prompt_tokens <= new_words + 12  # the template's markers around the answer
    spy.batches.clear()
    other = [system, {"role": "user", "content": "Good morning, how are you?"}]
    assert "".join(llm.stream(other, max_tokens=4)).strip()
    shared = _common_prefix(llm._prompt(other), llm._prompt(first))  # the system prompt
    assert shared > 10 and len(spy.batches[0]) == len(llm._prompt(other)) - shared


def test_llm_prepares_a_conversations_next_turn_after_each_reply(
    llm: LlamaLlm, monkeypatch: pytest.MonkeyPatch
) -> None:
    conv = Dialogue(llm, system_prompt="You are Cy, the test line.", max_tokens=12)
    assert "".join(conv.reply("Hi, who are you?")).strip()
    assert any(
        "You are Cy" in cached and cached.endswith("<|im_start|>user\n")
        for cached in llm.evaluated()
    )
    spy = DecodeSpy(llm, monkeypatch)
    assert "".join(conv.reply("Thanks.")).strip()
    # Only the caller's words and the assistant's opening are left to evaluate.
    assert len(spy.batches[0]) == llm.count_tokens("Thanks.<|im_end|>\n<|im_start|>assistant\n")


def test_llm_reuses_an_ended_calls_sequence_not_a_live_calls(
    llm: LlamaLlm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four calls fill the four sequences; one ends. A new call takes the ended one's, and the
    live call with the shortest conversation (the cheapest to lose, by the count) keeps its
    own: its next turn evaluates only its new words."""
    assert len(llm._slots) == 4
    for slot in llm._slots:  # what earlier tests left is nobody's
        slot.spare = True
    system = "You are Di, on a test line. Answer briefly."
    short = Dialogue(llm, system_prompt=system, max_tokens=3)
    assert "".join(short.reply("Hi.")).strip()
    others = [Dialogue(llm, system_prompt=system, max_tokens=24) for _ in range(3)]
    for i, conv in enumerate(others):
        assert "".join(conv.reply(f"Tell me a long story about the number {i + 2}.")).strip()
    assert not any(slot.spare for slot in llm._slots)  # one sequence each
    others[0].close()  # that call hung up
    newcomer = Dialogue(llm, system_prompt=system, max_tokens=3)
    assert "".join(newcomer.reply("Good morning.")).strip()
    spy = DecodeSpy(llm, monkeypatch)
    assert "".join(short.reply("Thanks.")).strip()
    assert len(spy.batches[0]) == llm.count_tokens("Thanks.<|im_end|>\n<|im_start|>assistant\n")


def test_llm_stop_strings_end_the_reply_unsaid(llm: LlamaLlm) -> None:
    assert _held_back("The capital is Par", ("Paris",)) == 3
    assert _held_back("The capital is", ("Paris", "is.")) == 2
    assert _held_back("Hello", ("Paris",)) == 0
    messages = [{"role": "user", "content": "What is the capital of France? One sentence."}]
    full = "".join(llm.stream(messages, max_tokens=20))
    assert "Paris" in full
    usage = Usage()
    cut = "".join(llm.stream(messages, max_tokens=20, stop=("Paris",), usage=usage))
    assert "Paris" not in cut and "Par" not in cut[-3:] and usage.finish_reason == "stop"


def test_llm_reply_cut_short_frees_its_sequence(llm: LlamaLlm) -> None:
    messages = [{"role": "user", "content": "Tell me a long story about a cat."}]
    usage = Usage()
    pieces = list(llm.stream(messages, max_tokens=5, usage=usage))
    assert len(pieces) <= 5 and usage.finish_reason == "length"
    stream = llm.stream(messages, max_tokens=40)
    assert next(stream) and next(stream)
    assert sum(slot.owner is not None for slot in llm._slots) == 1
    stream.close()  # the caller barged in
    assert all(slot.owner is None for slot in llm._slots) and not llm._running


def test_llm_without_extra_buffers_loads_and_answers() -> None:
    # What the bot does with a llama.cpp built with AMX (which crashes on such a prompt).
    llm = LlamaLlm(LlmOptions(extra_buffers="off", seed=7), progress=False)
    assert llm.extra_buffers is False
    text = "".join(llm.stream([{"role": "user", "content": "Say hello to Anna."}], max_tokens=8))
    assert text.strip()


def test_load_parameters_are_changed_only_while_a_model_loads() -> None:
    class Params:
        use_extra_bufts = True
        n_seq_max = 1
        kv_unified = False

    low = SimpleNamespace(llama_model_default_params=Params, llama_context_default_params=Params)
    with load_params(low, extra_buffers=False, sequences=4):
        assert low.llama_model_default_params().use_extra_bufts is False
        context = low.llama_context_default_params()
        assert context.n_seq_max == 4 and context.kv_unified is True
    assert low.llama_model_default_params is Params
    assert low.llama_context_default_params is Params
    with load_params(low, extra_buffers=True, sequences=1):
        assert low.llama_model_default_params().use_extra_bufts is True
    low.llama_print_system_info = lambda: b"CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 | "
    assert built_with_amx(low)
    low.llama_print_system_info = lambda: b"CPU : AVX2 = 1 | REPACK = 1 | "
    assert not built_with_amx(low)
    with pytest.raises(ModelUnavailable, match="extra_buffers must be auto, on or off"):
        LlamaLlm(LlmOptions(extra_buffers="maybe"), progress=False)
    with pytest.raises(ModelUnavailable, match="parallel must be 1 or more"):
        LlamaLlm(LlmOptions(parallel=0), progress=False)


def test_openmp_build_is_recognised_and_flagged_beside_a_pytorch_vocoder() -> None:
    low = SimpleNamespace(llama_print_system_info=lambda: b"CPU : AVX2 = 1 | OPENMP = 1 | ")
    assert built_with(low, "OPENMP")
    low.llama_print_system_info = lambda: b"CPU : AVX2 = 1 | LLAMAFILE = 1 | "
    assert not built_with(low, "OPENMP")
    on_torch = SimpleNamespace(streaming=SimpleNamespace(vocoder=object()))
    on_onnx = SimpleNamespace(streaming=SimpleNamespace(vocoder=None))
    one_shot = SimpleNamespace(streaming=None)
    openmp, own_pool = SimpleNamespace(openmp=True), SimpleNamespace(openmp=False)
    assert openmp_beside_pytorch(openmp, on_torch)  # type: ignore[arg-type]
    assert not openmp_beside_pytorch(openmp, on_onnx)  # type: ignore[arg-type]
    assert not openmp_beside_pytorch(openmp, one_shot)  # type: ignore[arg-type]
    assert not openmp_beside_pytorch(own_pool, on_torch)  # type: ignore[arg-type]


def test_numpy_starts_no_spinning_blas_threads_beside_the_engines() -> None:
    """OpenBLAS's idle workers spin after every call (3.8 % of the server's CPU at four calls);
    the process's entry point (``python -m bot``, ``voicebot``) keeps numpy's BLAS on the
    calling thread."""
    code = (
        "import os, bot.__main__, numpy as np; a = np.ones((400, 400), np.float32); a @ a; "
        "print(len(os.listdir('/proc/self/task')))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == 1  # the main thread only


def test_installed_llama_cpp_runs_its_own_thread_pool(llm: LlamaLlm) -> None:
    # scripts/bootstrap builds llama.cpp without OpenMP (see bot/engines/llm.py); a wheel from
    # pip's cache, built with other flags, would silently bring the slow-down back.
    assert llm.openmp is False


def test_llm_runs_one_thread_while_stt_or_tts_computes(llm: LlamaLlm, activity: Activity) -> None:
    import llama_cpp

    def llama_threads() -> tuple[int, int]:
        ctx = llm._llm.ctx
        return llama_cpp.llama_n_threads(ctx), llama_cpp.llama_n_threads_batch(ctx)

    messages = [{"role": "user", "content": "Name a colour."}]
    assert llm.options.threads == 2
    with activity.running("tts"):
        assert activity.beside("llm") and not activity.beside("tts")
        assert "".join(llm.stream(messages, max_tokens=3)).strip()
        assert llama_threads() == (1, 1)
    assert not activity.busy
    assert "".join(llm.stream(messages, max_tokens=3)).strip()
    assert llama_threads() == (2, 2)


def test_stt_and_tts_runs_count_as_activity(
    whisper: WhisperStt, kokoro: KokoroOnnx, activity: Activity, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[bool, bool]] = []  # (beside the LLM, beside the TTS)

    def look() -> None:
        seen.append((activity.beside("llm"), activity.beside("tts")))

    def short(audio: np.ndarray) -> tuple[str, float]:
        look()
        return "hello", -0.1

    assert whisper._short is not None
    monkeypatch.setattr(whisper._short, "transcribe", short)
    assert whisper.transcribe(bytes(8000), 8000).text == "hello"

    def stream(phonemes: str, style: Any) -> Iterator[np.ndarray]:
        for _ in range(2):
            look()
            yield np.zeros(240, dtype=np.float32)

    monkeypatch.setattr(kokoro, "_stream", stream)
    assert len(list(kokoro.synthesize("Hello there."))) == 2
    # Whisper counts beside both; Kokoro beside the LLM, not beside itself.
    assert seen == [(True, True), (True, False), (True, False)]
    assert not activity.busy


def test_kokoro_runs_on_one_thread_beside_another_engine(
    kokoro: KokoroOnnx, activity: Activity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone a Kokoro run takes its threads; beside the LLM or Whisper, one (both the ONNX
    front's session and the PyTorch vocoder)."""
    import torch

    streaming = kokoro.streaming
    assert streaming is not None and kokoro.options.threads == 2
    fronts: list[Any] = []
    torch_threads: list[int] = []
    sessions = streaming.front._by_threads
    for n, session in sessions.items():
        monkeypatch.setitem(sessions, n, _Spy(session, lambda n=n: fronts.append(n)))
    vocoder = streaming.vocoder  # None where the CPU has no bfloat16 units: onnxruntime's
    if vocoder is not None:
        vocode = vocoder.run

        def spy(*args: Any, **kw: Any) -> Any:
            out = vocode(*args, **kw)
            torch_threads.append(torch.get_num_threads())
            return out

        monkeypatch.setattr(vocoder, "run", spy)
    assert list(kokoro.synthesize("Hello there."))
    alone = (list(fronts), set(torch_threads))
    fronts.clear()
    torch_threads.clear()
    with activity.running("llm"):
        assert list(kokoro.synthesize("Hello there."))
    on_torch = vocoder is not None
    assert alone == ([2], {2} if on_torch else set())
    assert (fronts, set(torch_threads)) == ([1], {1} if on_torch else set())


class _Spy:
    def __init__(self, session: Any, called: Any) -> None:
        self._session, self._called = session, called

    def run(self, *args: Any) -> Any:
        self._called()
        return self._session.run(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def test_deadline_lock_serves_the_earliest_due_first() -> None:
    lock = DeadlineLock()
    order: list[str] = []
    threads: list[threading.Thread] = []

    def take(name: str, due: float) -> None:
        with lock.hold(due):
            order.append(name)

    with lock.hold():
        for name, due in (("late", 30.0), ("soon", 10.0), ("tie-first", 20.0), ("tie-next", 20.0)):
            threads.append(threading.Thread(target=take, args=(name, due)))
            threads[-1].start()
            queued = len(threads) + 1  # the holder is still listed until it got the lock
            for _ in range(500):
                if len(lock._waiting) == queued - 1:
                    break
                threading.Event().wait(0.01)
            assert len(lock._waiting) == queued - 1
    for t in threads:
        t.join(10)
    assert order == ["soon", "tie-first", "tie-next", "late"]


def test_kokoro_takes_each_model_run_by_its_due_time(
    kokoro: KokoroOnnx, monkeypatch: pytest.MonkeyPatch
) -> None:
    dues: list[float | None] = []
    hold = kokoro._lock.hold

    def spy(due: float | None = None) -> Any:
        dues.append(due)
        return hold(due)

    monkeypatch.setattr(kokoro._lock, "hold", spy)
    chunks = list(kokoro.synthesize("Hello there, how are you doing today?", due=123.0))
    assert len(chunks) >= 2 and len(dues) >= len(chunks) and set(dues) == {123.0}


def test_llm_honours_max_tokens_and_stop(llm: LlamaLlm) -> None:
    usage = Usage()
    ask = [{"role": "user", "content": "Count from one to twenty in words, separated by commas."}]
    text = "".join(llm.stream(ask, max_tokens=5, usage=usage))
    assert usage.completion_tokens <= 5 and usage.finish_reason == "length"
    full = "".join(llm.stream(ask, max_tokens=60))
    assert "," in full
    stopped = "".join(llm.stream(ask, max_tokens=60, stop=(",",)))
    assert "," not in stopped and stopped.strip() and len(stopped) < len(full)
    assert text.strip()


def test_two_concurrent_conversations_keep_separate_histories(llm: LlamaLlm) -> None:
    anna = Dialogue(
        llm, system_prompt="You are a helpful assistant. The caller is Anna.", max_tokens=20
    )
    bob = Dialogue(llm, system_prompt="You are a pirate. The caller is Bob.", max_tokens=20)
    replies: dict[str, str] = {}

    def talk(name: str, conv: Dialogue) -> None:
        for question in ("Hello, who am I?", "Thanks. Say goodbye."):
            replies[f"{name}:{question}"] = "".join(conv.reply(question))

    threads = [threading.Thread(target=talk, args=a) for a in (("anna", anna), ("bob", bob))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r.strip() for r in replies.values()) and len(replies) == 4
    for name, conv in (("anna", anna), ("bob", bob)):
        assert [m["role"] for m in conv.history] == ["user", "assistant"] * 2
        assert [m["content"] for m in conv.history[1::2]] == [
            replies[f"{name}:Hello, who am I?"].strip(),
            replies[f"{name}:Thanks. Say goodbye."].strip(),
        ]
    assert anna.messages("x")[0]["content"].endswith("Anna.")
    assert bob.messages("x")[0]["content"].endswith("Bob.")


def test_history_is_trimmed_to_the_context_window(llm: LlamaLlm) -> None:
    conv = Dialogue(llm, max_tokens=20)
    long_turn = "word " * 300
    for _ in range(8):
        conv.history += [
            {"role": "user", "content": long_turn},
            {"role": "assistant", "content": "ok"},
        ]
    msgs = conv.messages("What did I say?")
    assert msgs[0]["role"] == "system" and msgs[-1]["content"] == "What did I say?"
    assert len(msgs) < 1 + 16 + 1
    total = sum(llm.count_tokens(m["content"]) for m in msgs)
    assert total < llm.n_ctx - 20
    assert "".join(conv.reply("What did I say?")).strip()  # and it still answers


def test_float_audio_round_trip_sanity(kokoro: KokoroOnnx) -> None:
    pcm = b"".join(speak(kokoro, "Yes.", 16000))
    x = pcm_to_float(pcm)
    assert np.abs(x).max() <= 1.0 and np.abs(x).max() > 0.05


def test_llm_reports_contention_while_another_generation_waits(llm: LlamaLlm) -> None:
    ask = [{"role": "user", "content": "Say one word."}]
    first = llm.stream(ask, max_tokens=3)
    next(first)
    assert not llm.contended  # alone: pausing it would leave the cores to the others
    going = [llm.stream(ask, max_tokens=3) for _ in range(llm.options.parallel - 1)]
    for stream in going:
        next(stream)  # each holds a sequence
    assert llm.contended
    waiter = threading.Thread(target=lambda: list(llm.stream(ask, max_tokens=2)))
    waiter.start()
    for _ in range(500):
        if llm._queue:
            break
        threading.Event().wait(0.01)
    assert llm._queue  # every sequence is taken
    first.close()  # frees a sequence: the waiting generation runs
    waiter.join(60)
    assert not llm._queue and not waiter.is_alive()
    for stream in going:
        stream.close()
    assert not llm.contended


def test_kokoro_speaks_another_voice_of_the_same_model(kokoro: KokoroOnnx) -> None:
    text = "Good evening."
    default = np.concatenate(list(kokoro.synthesize(text)))
    other = np.concatenate(list(kokoro.synthesize(text, "jf_alpha")))
    assert len(other) > 0 and not np.array_equal(default[: len(other)], other[: len(default)])
    with pytest.raises(ModelUnavailable, match=r"voice 'af_nobody' is not in .*jf_alpha"):
        kokoro.check_voice("af_nobody")


def test_a_llama_cpp_without_what_the_bot_uses_is_refused_naming_it() -> None:
    from bot.engines.llama_api import INTERNALS, LOW_LEVEL, LlamaApi, missing, unsupported

    low = types.SimpleNamespace(**{n: None for n in LOW_LEVEL if n != "llama_memory_seq_cp"})
    internals = types.SimpleNamespace(**{n: None for n in INTERNALS})
    gone = missing(low, internals, loaded=types.SimpleNamespace(_model=None))
    assert gone == ["llama_cpp.llama_cpp.llama_memory_seq_cp", "Llama._ctx"]
    message = str(unsupported("0.4.0", gone))
    assert message.startswith(
        "llama-cpp-python 0.4.0 lacks llama_cpp.llama_cpp.llama_memory_seq_cp, Llama._ctx"
    )
    assert "llama-cpp-python==0.3.36" in message
    api = LlamaApi()  # the installed one has everything
    assert api.version == "0.3.36" and missing(api.low, api._internals) == []


def test_a_misaki_whose_g2p_needs_more_set_up_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from misaki import en

    def needs_more(self: Any, text: str) -> Any:
        return self.something_new(text)

    monkeypatch.setattr(en.G2P, "__call__", needs_more)
    with pytest.raises(ModelUnavailable, match=r"^misaki 0\.9\.4: .*something_new"):
        KokoroG2P()
