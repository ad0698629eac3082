"""Settings: defaults, file, environment; a bad value stops start-up naming its key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from bot import config
from bot.config import ConfigError

from .conftest import ROOT


def test_defaults_are_safe() -> None:
    s = config.load(None, {})
    assert s.server.host == "127.0.0.1"  # never listen on every interface unless told to
    assert s.server.port == 9092
    assert s.server.profile == "assistant" and s.profile("echo").delay_ms == 500
    assert s.profile("assistant").barge_in is False and s.turns.vad == "webrtc"
    assert s.playout.lead_frames == 3


def test_file_then_environment(tmp_path: Path) -> None:
    f = tmp_path / "bot.toml"
    f.write_text(
        '[server]\nport = 9100\nhost = "0.0.0.0"\n[profiles.slow]\nkind = "echo"\n'
        "delay_ms = 1000\n[playout]\nbuffer_seconds = 5\n"
    )
    s = config.load(
        f,
        {
            "VOICEBOT_SERVER_PORT": "9200",
            "VOICEBOT_PROFILES_SLOW_DELAY_MS": "50",
            "VOICEBOT_SERVER_PROFILE": "slow",
        },
    )
    assert (s.server.host, s.server.port, s.server.profile) == ("0.0.0.0", 9200, "slow")
    assert s.profile("slow").delay_ms == 50
    assert s.playout.buffer_seconds == 5.0
    assert config.load(None, {"VOICEBOT_CONFIG": str(f)}).server.port == 9100


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[server]\nport = 'x'\n", {}, "server.port: expected int, got 'x'"),
        ("[server]\nport = 70000\n", {}, "server.port: must be between 0 and 65535, got 70000"),
        ("[server]\nprot = 1\n", {}, "server.prot: unknown key (known: host, port, profile, "),
        ("[sever]\nport = 1\n", {}, "sever: unknown section"),
        ("server = 1\n", {}, "server: expected a table, got 1"),
        ("[server]\nport = true\n", {}, "server.port: expected int, got True"),
        ("[server]\nhost = ''\n", {}, "server.host: must not be empty"),
        ("[server]\nprofile = 'nope'\n", {}, "server.profile: 'nope' is not defined"),
        (
            "[profiles.x]\nkind = 'robot'\n",
            {},
            "profiles.x.kind: must be one of echo, assistant, got 'robot'",
        ),
        ("[profiles.echo]\ndelay_ms = -1\n", {}, "profiles.echo.delay_ms: must be between 0 and"),
        (
            "[profiles.assistant]\nmisheard_below = 0.5\n",
            {},
            "profiles.assistant.misheard_below: must be between -10 and 0, got 0.5",
        ),
        ("[server\n", {}, "not valid TOML"),
        ("", {"VOICEBOT_SERVER_PORT": "nine"}, "server.port: expected int, got 'nine'"),
        ("", {"VOICEBOT_SERVR_PORT": "1"}, "VOICEBOT_SERVR_PORT: unknown setting"),
        ("", {"VOICEBOT_PROFILES_NOPE_DELAY_MS": "1"}, "VOICEBOT_PROFILES_NOPE_DELAY_MS: names no"),
        (
            "",
            {"VOICEBOT_PLAYOUT_LEAD_FRAMES": "2.5"},
            "playout.lead_frames: expected int, got '2.5'",
        ),
    ],
)
def test_bad_settings_name_the_key(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    f = tmp_path / "bot.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(f, env)
    assert message in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="config file /nonexistent.toml: No such file"):
        config.load("/nonexistent.toml", {})


def test_serve_stops_on_bad_config_with_one_line_and_exit_2(tmp_path: Path) -> None:
    f = tmp_path / "bot.toml"
    f.write_text("[server]\nport = 'abc'\n")
    result = subprocess.run(
        [sys.executable, "-m", "bot", "serve", "--config", str(f)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr == "voicebot: configuration error: server.port: expected int, got 'abc'\n"
    assert result.stdout == ""


def test_model_settings_and_packs() -> None:
    from bot.engines.stack import options

    env = {"VOICEBOT_MODELS_PACK": "fast", "VOICEBOT_MODELS_THREADS": "1"}
    s = config.load(None, {**env, "VOICEBOT_MODELS_STT_THREADS": "3"})
    stt, llm, tts = options(s.models)
    assert (stt.model, llm.model, tts.engine, tts.model) == (
        "whisper-tiny.en",
        "smollm2-135m",
        "piper",
        "piper-joe-medium",
    )
    assert (stt.threads, llm.threads, tts.threads) == (3, 1, 1)
    assert options(config.load(None, {}).models)[0].threads == 1  # Whisper's own default
    default = options(config.load(None, {}).models)
    assert (default[1].model, default[2].model, default[2].voice) == (
        "qwen2.5-0.5b",
        "kokoro-v1.0-int8",
        "jm_kumo",
    )
    custom = options(
        config.load(
            None, {"VOICEBOT_MODELS_LLM": "/m/x.gguf", "VOICEBOT_MODELS_VOICE": "jf_nezumi"}
        ).models
    )
    assert custom[1].model == "/m/x.gguf" and custom[2].voice == "jf_nezumi"
    with pytest.raises(ConfigError, match="models.pack: must be one of default, fast, quality"):
        config.load(None, {"VOICEBOT_MODELS_PACK": "huge"})
    with pytest.raises(ConfigError, match="models.tts_backend: must be one of onnx, torch"):
        config.load(None, {"VOICEBOT_MODELS_TTS_BACKEND": "tensorflow"})
    assert custom[2].vocoder == "auto"
    vocoder = options(config.load(None, {"VOICEBOT_MODELS_TTS_VOCODER": "onnx"}).models)[2]
    assert vocoder.vocoder == "onnx"
    with pytest.raises(ConfigError, match="models.tts_vocoder: must be one of auto, onnx, torch"):
        config.load(None, {"VOICEBOT_MODELS_TTS_VOCODER": "gpu"})


def test_assistant_profiles_and_turn_settings(tmp_path: Path) -> None:
    f = tmp_path / "bot.toml"
    f.write_text(
        '[profiles.llama2]\nkind = "assistant"\ngreeting = "Hi, Llama two here."\n'
        'barge_in = true\n[turns]\nvad = "silero"\nhangover_ms = 700\n'
    )
    s = config.load(f, {"VOICEBOT_PROFILES_LLAMA2_SYSTEM_PROMPT": "You are terse."})
    p = s.profile("llama2")
    assert (p.kind, p.greeting, p.barge_in, p.system_prompt) == (
        "assistant",
        "Hi, Llama two here.",
        True,
        "You are terse.",
    )
    assert (s.turns.vad, s.turns.hangover_ms, s.turns.pause_ms) == ("silero", 700, 80)
    with pytest.raises(ConfigError, match="turns.vad: must be one of webrtc, silero, got 'x'"):
        config.load(None, {"VOICEBOT_TURNS_VAD": "x"})
    with pytest.raises(ConfigError, match="profiles.assistant.barge_in: expected bool"):
        config.load(None, {"VOICEBOT_PROFILES_ASSISTANT_BARGE_IN": "maybe"})


def test_a_profile_answers_from_its_knowledge(tmp_path: Path) -> None:
    """The shipped assistant knows the example business; a profile's own facts come from a
    file beside the config, inline, or not at all."""
    shipped = config.load(None, {}).profile("assistant")
    assert isinstance(shipped, config.AssistantProfile)
    prompt = shipped.instructions()
    assert prompt.startswith(shipped.system_prompt) and config.KNOWLEDGE_RULES in prompt
    assert "42 Harbour Road" in prompt and "Saturday 10 am to 4 pm" in prompt
    (tmp_path / "shop.md").write_text("We sell ice cream. Open daily 11 am to 9 pm.\n")
    f = tmp_path / "bot.toml"
    f.write_text(
        '[profiles.shop]\nkind = "assistant"\nknowledge_file = "shop.md"\n'
        'knowledge = "Cones cost 3 dollars."\n'
        '[profiles.plain]\nkind = "assistant"\nknowledge_file = ""\n'
    )
    s = config.load(f, {})
    shop, plain = s.profile("shop"), s.profile("plain")
    assert isinstance(shop, config.AssistantProfile) and isinstance(plain, config.AssistantProfile)
    assert shop.knowledge_file == str(tmp_path / "shop.md")
    assert shop.instructions().endswith(
        "Cones cost 3 dollars.\nWe sell ice cream. Open daily 11 am to 9 pm."
    )
    assert plain.instructions() == plain.system_prompt


def test_a_knowledge_file_that_cannot_serve_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"^profiles.assistant.knowledge_file: .*missing.md: No such"
    ):
        config.load(
            None, {"VOICEBOT_PROFILES_ASSISTANT_KNOWLEDGE_FILE": str(tmp_path / "missing.md")}
        )
    big = tmp_path / "big.md"
    big.write_text("Facts. " * 1000)
    with pytest.raises(ConfigError, match=r"^profiles.assistant.knowledge: 7000 characters"):
        config.load(None, {"VOICEBOT_PROFILES_ASSISTANT_KNOWLEDGE_FILE": str(big)})


def test_every_setting_is_documented() -> None:
    """docs/configuration.md carries `voicebot settings` verbatim, so it cannot drift."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    generated = doc.split("<!-- generated: voicebot settings -->\n", 1)[1]
    generated = generated.split("\n<!-- end generated -->", 1)[0]
    assert generated == config.reference()
    classes = {**config.SECTIONS, **config.PROFILE_KINDS}
    for section, cls in classes.items():
        for f in dataclasses.fields(cls):
            if f.name == "kind":
                continue
            assert f"| `{f.name}` |" in generated, f"{section}.{f.name}"
            assert f.metadata.get("doc"), f"{section}.{f.name} has no meaning"


def test_the_settings_classes_hold_the_only_defaults() -> None:
    """What an engine or the server takes when built without settings is what the settings
    give it: the defaults are written once, in bot/config.py."""
    from bot.asterisk.server import Timeouts
    from bot.engines.llm import LlmOptions
    from bot.engines.stack import options
    from bot.engines.stt import SttOptions
    from bot.engines.tts import TtsOptions

    assert options(config.ModelSettings()) == (SttOptions(), LlmOptions(), TtsOptions())
    assert Timeouts.from_settings(config.ServerSettings()) == Timeouts()
