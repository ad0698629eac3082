"""The shipped ``asterisk/`` configuration on a real Asterisk 22, with SIPp as the softphones.

Asterisk is built from source once per machine (``scripts/build-asterisk``); these tests skip
where it cannot be (see ``tests/pbx.py`` for how to enable them) and fail instead in CI. The bot
runs as ``voicebot serve`` with the default model pack, AMI and ARI on, as a user would run it;
each test places real SIP calls and transcribes what the phone heard.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pytest

from bot.audio import float_to_pcm, leading_silence, trailing_silence
from bot.calllog import list_calls, read_call
from bot.engines.stt import WhisperStt
from bot.tools.scenarios import Voices
from bot.tools.subserver import server_process

from .pbx import SECRETS, ULAW_TRAP, Pbx, Ports, asterisk_prefix
from .sip_phone import Line, RtpPhone, answering, finished, free_port, sipp

ROOT: Final = Path(__file__).resolve().parent.parent
IDLE_TIMEOUT: Final = 3.0  # the bot's inbound idle timeout here: a quiet phone outlasts it
QUESTION: Final = "What is the capital of France?"
PERSON: Final = "Can I talk to a person, please?"


@pytest.fixture(scope="module")
def asterisk() -> Path:
    found = asterisk_prefix()
    if isinstance(found, str):
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-Asterisk tests: {found}")
        pytest.skip(found)
    return found


@pytest.fixture(scope="module")
def pbx(asterisk: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pbx]:
    udp = socket.SOCK_DGRAM
    ports = Ports(
        sip=free_port(udp),
        http=free_port(),
        ami=free_port(),
        rtp=31000 + 100 * (os.getpid() % 50),
        bot=free_port(),
        concierge=free_port(),
    )
    pbx = Pbx(asterisk, tmp_path_factory.mktemp("asterisk"), ports)
    pbx.render()
    pbx.start()
    try:
        yield pbx
    finally:
        pbx.stop()


def bot_environment(pbx: Pbx, calls: Path) -> dict[str, str]:
    p = pbx.ports
    return {
        "VOICEBOT_SERVER_HOST": "127.0.0.1",
        "VOICEBOT_SERVER_PORT": str(p.bot),
        "VOICEBOT_SERVER_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
        "VOICEBOT_CALLS_DIR": str(calls),
        "VOICEBOT_PROFILES_CONCIERGE_KIND": "assistant",
        "VOICEBOT_PROFILES_CONCIERGE_PORT": str(p.concierge),
        "VOICEBOT_PROFILES_CONCIERGE_GREETING": "Good evening, this is the hotel concierge.",
        "VOICEBOT_AMI_ENABLED": "true",
        "VOICEBOT_AMI_PORT": str(p.ami),
        "VOICEBOT_AMI_SECRET": SECRETS["AMI_SECRET"],
        "VOICEBOT_ARI_ENABLED": "true",
        "VOICEBOT_ARI_URL": f"http://127.0.0.1:{p.http}",
        "VOICEBOT_ARI_PASSWORD": SECRETS["ARI_PASSWORD"],
        "VOICEBOT_ARI_MEDIA_HOST": f"127.0.0.1:{p.bot}",
    }


@dataclass
class Bot:
    env: dict[str, str]
    calls: Path
    console: Path

    def last_call(self, after: set[Path]) -> list[dict[str, Any]]:
        """The events of the one call whose log appeared since ``after``, once it ended."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            new = [p for p in list_calls(self.calls) if p not in after]
            if new:
                events = read_call(new[0]).events
                if events and events[-1]["event"] == "call_end":
                    return events
            time.sleep(0.1)
        raise AssertionError(f"no ended call log in {self.calls} (new: {new})")

    def known(self) -> set[Path]:
        return set(list_calls(self.calls))


@pytest.fixture(scope="module")
def bot(pbx: Pbx, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bot]:
    folder = tmp_path_factory.mktemp("bot")
    env = bot_environment(pbx, folder / "calls")
    console = folder / "console.log"
    with (
        console.open("w") as err,
        server_process("assistant", env, port=pbx.ports.bot, stderr=err),
    ):
        deadline = time.monotonic() + 20
        while "voicebot" not in pbx.rx("ari show apps"):  # ARI connects after the ready line
            assert time.monotonic() < deadline, "the bot's ARI application never registered"
            time.sleep(0.2)
        yield Bot(env, folder / "calls", console)


@pytest.fixture(scope="module")
def line(pbx: Pbx) -> Line:
    return Line(pbx.ports.sip, {"16": SECRETS["SIP_16_PASSWORD"], "17": SECRETS["SIP_17_PASSWORD"]})


@pytest.fixture(scope="module")
def voices() -> Voices:
    return Voices()


@pytest.fixture(scope="module")
def stt() -> WhisperStt:
    return WhisperStt(progress=False)


def spoken(voices: Voices, text: str, *, tail: float = 0.3) -> bytes:
    """``text`` in a caller's voice (not the bot's), then ``tail`` seconds of quiet."""
    x = voices.say(text, "piper")
    pcm = float_to_pcm(np.concatenate([x, np.zeros(round(tail * 8000), np.float32)]))
    return pcm[: len(pcm) - trailing_silence(pcm, 8000)] if tail == 0 else pcm


@dataclass
class Heard:
    greeting: str
    answer: str
    events: list[dict[str, Any]]
    latency_ms: float | None = None  # the caller's last word to the answer's first sound

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


def converse(
    bot: Bot,
    line: Line,
    stt: WhisperStt,
    service: str,
    *,
    say: bytes = b"",
    press: str = "",
    quiet_first: float = 0.0,
    dtx: bool = False,
    hold_ms: int = 16000,
) -> Heard:
    """Extension 16 dials ``service``, hears the greeting, presses ``press`` and/or says
    ``say``, hears the answer, and hangs up after ``hold_ms``; returns the transcripts."""
    before = bot.known()
    failed: AssertionError | None = None
    with RtpPhone(dtx=dtx) as phone:
        call = sipp(
            line, "call", "16", local_port=free_port(socket.SOCK_DGRAM), service=service,
            rtp_port=phone.port, hold_ms=hold_ms, timeout=hold_ms / 1000 + 30,
        )  # fmt: skip
        try:
            phone.wait_connected(within=10)
            greeting = phone.wait_quiet(0.8, within=10)
            time.sleep(quiet_first)
            mark = len(phone.received())
            if press:
                phone.press(press)
            if say:
                phone.say(say)
                spoke = time.monotonic() - trailing_silence(say, 8000, keep_ms=0) / 16000
            answer = phone.wait_quiet(1.5, within=20, since=mark)[mark:] if (say or press) else b""
            answered = phone.first_voice_after(mark)
            latency = (answered - spoke) * 1000 if say and answered else None
        except AssertionError as exc:
            failed = exc
        finally:
            finished(call, within=hold_ms / 1000 + 40)
    if failed:  # what the bot logged of the call says why the phone heard no answer
        raise AssertionError(f"{failed}; the bot's log: {bot.last_call(before)}")
    heard = Heard(transcribe(stt, greeting), transcribe(stt, answer), bot.last_call(before))
    heard.latency_ms = latency
    return heard


def transcribe(stt: WhisperStt, pcm: bytes) -> str:
    """What Whisper hears in ``pcm``, the line's silence around it cut off first."""
    pcm = pcm[leading_silence(pcm, 8000, keep_ms=100) :]
    pcm = pcm[: len(pcm) - trailing_silence(pcm, 8000, keep_ms=200)]
    return stt.transcribe(pcm, 8000).text if pcm else ""


def words(text: str) -> set[str]:
    return {w.strip(".,!?'\"").lower() for w in text.split()} - {""}


def report(name: str, heard: Heard) -> None:
    """What the phone heard, for the record (-s or the CI log shows it)."""
    turns = [(e["transcript"], e["reply"]) for e in heard.named("turn")]
    print(f"\n[{name}] phone heard greeting: {heard.greeting!r}")
    print(f"[{name}] phone heard answer:   {heard.answer!r}")
    print(f"[{name}] bot's log (transcript, reply): {turns}")
    if heard.latency_ms is not None:
        print(f"[{name}] answer {heard.latency_ms:.0f} ms after the caller's last word")


# --- the tests ----------------------------------------------------------------------------------


def test_asterisk_loads_every_module_of_the_shipped_config(pbx: Pbx, bot: Bot) -> None:
    loaded = pbx.rx("module show")
    shipped = (ROOT / "asterisk" / "modules.conf").read_text()
    wanted = [ln.split("=>")[1].split(";")[0].strip() for ln in shipped.splitlines()
              if ln.startswith("load")]  # fmt: skip
    assert wanted and all(m in loaded for m in wanted), [m for m in wanted if m not in loaded]
    # Asterisk started clean: no module declined, no configuration file missing.
    errors = [line for line in pbx.log().splitlines() if " ERROR[" in line]
    assert errors == []
    # The bot's links are up: AMI logged in, the ARI application registered.
    assert "voicebot" in pbx.rx("manager show connected")
    assert "voicebot" in pbx.rx("ari show apps")


def test_check_asterisk_passes_the_rendered_live_folder(pbx: Pbx, bot: Bot, tmp_path: Path) -> None:
    live = tmp_path / "etc"
    shutil.copytree(pbx.etc, live)
    conf = live / "extensions.conf"
    conf.write_text(conf.read_text().replace(ULAW_TRAP, ""))  # the test-only trap
    done = subprocess.run(
        [sys.executable, "-m", "bot", "check-asterisk", str(live), "--bot-host", "127.0.0.1"],
        env={**os.environ, **bot.env},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_llama1_greets_and_answers_a_spoken_question(
    bot: Bot, line: Line, stt: WhisperStt, voices: Voices
) -> None:
    heard = converse(bot, line, stt, "Llama1", say=spoken(voices, QUESTION))
    report("Llama1", heard)
    assert "help" in words(heard.greeting), heard.greeting
    [turn] = heard.named("turn")
    assert "capital" in turn["transcript"].lower()
    # The phone heard the reply the bot logged (Whisper hears most of its words back).
    reply = words(turn["reply"])
    assert len(reply & words(heard.answer)) >= len(reply) // 2, (turn["reply"], heard.answer)
    # The phone hung up: Asterisk's own word on it is in the log, before the one call_end.
    names = [e["event"] for e in heard.events]
    assert "asterisk_channel" in names and "asterisk_hangup" in names
    assert names[-1] == "call_end" and names.count("call_end") == 1
    assert heard.events[-1]["reason"] == "caller hung up"


@pytest.mark.parametrize(
    ("service", "greeting", "rate"),
    [("Llama1w", "help", 16000), ("Llama2", "concierge", 8000), ("Llama1ari", "help", 16000)],
)
def test_every_llama_answers(
    bot: Bot, line: Line, stt: WhisperStt, voices: Voices, service: str, greeting: str, rate: int
) -> None:
    heard = converse(bot, line, stt, service, say=spoken(voices, QUESTION))
    report(service, heard)
    assert greeting in words(heard.greeting), heard.greeting
    [fmt] = heard.named("audio_format")
    assert fmt["rate"] == rate and fmt["encoding"] == "slin"
    [turn] = heard.named("turn")
    assert "capital" in turn["transcript"].lower() and len(words(heard.answer)) >= 2
    assert heard.named("asterisk_hangup"), [e["event"] for e in heard.events]


@pytest.mark.parametrize("how", ["dtmf", "speech"])
def test_a_caller_who_wants_a_person_reaches_17(
    bot: Bot, line: Line, stt: WhisperStt, voices: Voices, how: str
) -> None:
    with answering(line, "17") as (colleague, desk):
        heard = converse(
            bot, line, stt, "Llama1",
            press="0" if how == "dtmf" else "",
            say=spoken(voices, PERSON) if how == "speech" else b"",
            hold_ms=14000,
        )  # fmt: skip
        finished(colleague, within=30)  # 17 answered, then got the caller's BYE
        assert desk.peer is not None, "17 answered but no audio reached it"
    report(f"transfer-{how}", heard)
    [transfer] = heard.named("transfer")
    assert "operator" in str(transfer), transfer
    assert {"one", "moment"} <= words(heard.answer), heard.answer  # the hand-over, heard
    if how == "dtmf":
        assert [e["digit"] for e in heard.named("dtmf")] == ["0"]
        assert [e["digit"] for e in heard.named("asterisk_dtmf")] == ["0"]
    assert heard.events[-1]["event"] == "call_end"


def test_voicebot_originate_calls_the_phone(
    bot: Bot, line: Line, pbx: Pbx, stt: WhisperStt
) -> None:
    before = bot.known()
    with answering(line, "16") as (phone_sip, phone):
        done = subprocess.run(
            [sys.executable, "-m", "bot", "originate", "PJSIP/16", "--profile", "assistant"],
            env={**os.environ, **bot.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        phone.wait_connected(within=10)
        greeting = phone.wait_quiet(0.8, within=10)
        pbx.rx("channel request hangup all")
        finished(phone_sip, within=20)
    heard = transcribe(stt, greeting)
    print(f"\n[originate] phone heard: {heard!r}")
    assert "help" in words(heard), heard
    events = bot.last_call(before)
    assert [e for e in events if e["event"] == "asterisk_hangup"]


def test_a_phone_that_sends_nothing_in_silence(
    bot: Bot, line: Line, stt: WhisperStt, voices: Voices
) -> None:
    """The phone sends RTP only while its user speaks: none before the question (longer than
    the bot's idle timeout), none after its last word."""
    heard = converse(
        bot, line, stt, "Llama1", say=spoken(voices, QUESTION, tail=0),
        quiet_first=IDLE_TIMEOUT + 1, dtx=True, hold_ms=20000,
    )  # fmt: skip
    report("dtx", heard)
    [greeting] = heard.named("greeting")
    start = heard.named("call_start")[0]["t"]
    assert greeting["t"] - start <= 0.3, greeting  # the greeting did not wait for the phone
    assert "help" in words(heard.greeting)
    [turn] = heard.named("turn")
    assert "capital" in turn["transcript"].lower() and len(words(heard.answer)) >= 2
    assert heard.events[-1]["reason"] == "caller hung up"
    end = heard.events[-1]
    first = heard.named("audio_format")[0]["t"]
    print(f"[dtx] Asterisk's first frame at {first} s; frames in {end['frames_in']}, filled "
          f"{end['inbound_filled']}, call {end['duration']} s")  # fmt: skip
    assert end["inbound_filled"] > 0  # Asterisk sent nothing while the phone was quiet


def test_a_dial_without_codec_option_is_named_and_decoded(
    bot: Bot, line: Line, stt: WhisperStt, voices: Voices
) -> None:
    heard = converse(bot, line, stt, "Llama1ulaw", say=spoken(voices, QUESTION))
    report("ulaw", heard)
    [fmt] = heard.named("audio_format")
    assert fmt == {**fmt, "rate": 8000, "frame_bytes": 160, "encoding": "ulaw"}
    [warning] = heard.named("warning")
    assert "c(slin)" in warning["message"]
    assert "c(slin)" in bot.console.read_text()
    assert "help" in words(heard.greeting), heard.greeting
    [turn] = heard.named("turn")
    assert "capital" in turn["transcript"].lower()
    json.dumps(heard.events)  # the log stays plain JSON
