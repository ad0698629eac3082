"""Settings: defaults, then a TOML file, then ``VOICEBOT_*`` environment variables, validated.

Every value is checked at start-up; the first bad one stops the bot with a :class:`ConfigError`
whose message names the key (``server.port: ...``), which the CLI prints on one line (exit 2).

Environment variables name a section and a key: ``VOICEBOT_SERVER_PORT=9093`` sets
``[server] port``; ``VOICEBOT_PROFILES_ECHO_DELAY_MS=250`` sets ``[profiles.echo] delay_ms``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

ENV_PREFIX: Final = "VOICEBOT_"
# VOICEBOT_* variables that are not settings: the config file itself, and set-up/test paths.
NOT_SETTINGS: Final = frozenset(
    {"VOICEBOT_CONFIG", "VOICEBOT_VENV", "VOICEBOT_MODELS_DIR", "VOICEBOT_ASTERISK_SRC"}
)
DEFAULT_PORT: Final = 9092
# Who the bot is, unless a profile's system_prompt says otherwise.
DEFAULT_SYSTEM_PROMPT: Final = (
    "You are a warm, kind and empathetic voice assistant on a phone call. Answer in one or two "
    "short, natural sentences, as people speak. Never use lists, markdown or emojis."
)


class ConfigError(ValueError):
    """A setting is missing, unknown or invalid; the message starts with the key."""


Check = Callable[[Any], str | None]  # returns why the value is wrong, or None


def _range(lo: float, hi: float) -> Check:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo:g} and {hi:g}, got {v!r}"

    return check


def _nonempty(v: Any) -> str | None:
    return None if str(v).strip() else "must not be empty"


def _setting(default: Any, check: Check | None = None, doc: str = "") -> Any:
    return field(default=default, metadata={"check": check, "doc": doc})


def default(cls: type[Any], name: str) -> Any:
    """The default of setting ``name`` of the settings class ``cls``: the one place a default
    is written (an engine's options and the server's timeouts take theirs from here)."""
    [found] = [f for f in dataclasses.fields(cls) if f.name == name]
    return found.default


def _secret(doc: str) -> Any:
    """A credential: empty unless the environment sets it, and never shown by ``repr()``."""
    return field(default="", repr=False, metadata={"check": None, "doc": doc})


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = _setting("127.0.0.1", _nonempty, "address to listen on (0.0.0.0 for all)")
    port: int = _setting(DEFAULT_PORT, _range(0, 65535), "AudioSocket TCP port (0: any free one)")
    profile: str = _setting("assistant", _nonempty, "profile a call gets (echo: diagnostics)")
    uuid_timeout: float = _setting(5.0, _range(0.1, 60), "seconds a new connection may stay silent")
    idle_timeout: float = _setting(
        10.0,
        _range(0.5, 3600),
        "seconds with no frame either way before the call ends (the bot's own frames count: a "
        "phone with VAD/DTX sends nothing in silence)",
    )
    write_timeout: float = _setting(
        2.0, _range(0.1, 60), "seconds a write may wait on a peer that does not read"
    )


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The HTTP side port: /healthz, /readyz (for a load balancer), /metrics (Prometheus) and
    the call inspector."""

    enabled: bool = _setting(True, None, "serve the side port")
    host: str = _setting("127.0.0.1", _nonempty, "address to listen on (0.0.0.0 for all)")
    port: int = _setting(9180, _range(0, 65535), "TCP port (0: any free one)")
    inspector: bool = _setting(True, None, "serve the call inspector pages (/, /calls/ID)")
    token: str = _setting("", None, "the inspector's access token, needed off loopback")


@dataclass(frozen=True, slots=True)
class PlayoutSettings:
    lead_frames: int = _setting(3, _range(0, 10), "20 ms frames written ahead of real time")
    buffer_seconds: float = _setting(30.0, _range(1, 600), "bot audio that may wait to be played")


@dataclass(frozen=True, slots=True)
class CallLogSettings:
    """Per-call folders: the log, and a recording of both sides (see the README on consent)."""

    dir: str = _setting("calls", _nonempty, "folder for per-call logs")
    record: bool = _setting(True, None, "record each call to call.wav (caller left, bot right)")
    keep_days: int = _setting(0, _range(0, 36500), "remove call folders older than this (0: keep)")


# What each [models] pack loads; a key of [models] that is set overrides its pack's.
MODEL_PACKS: Final[dict[str, dict[str, str]]] = {
    "default": {
        "stt": "whisper-tiny.en",
        "llm": "qwen2.5-0.5b",
        "tts": "kokoro-v1.0-int8",
        "tts_engine": "kokoro",
        "voice": "jm_kumo",
    },
    "fast": {
        "stt": "whisper-tiny.en",
        "llm": "smollm2-135m",
        "tts": "piper-joe-medium",
        "tts_engine": "piper",
        "voice": "",
    },
    "quality": {
        "stt": "whisper-base",
        "llm": "qwen2.5-1.5b",
        "tts": "kokoro-v1.0-int8",
        "tts_engine": "kokoro",
        "voice": "jm_kumo",
    },
}


def _url(*schemes: str) -> Check:
    def check(v: Any) -> str | None:
        if v == "":
            return None
        scheme, sep, rest = str(v).partition("://")
        if sep and scheme in schemes and rest.strip("/"):
            return None
        return f"must be a {' or '.join(schemes)}:// address, got {v!r}"

    return check


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"

    return check


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """Which models the engines load. A pack sets all three; the other keys override one."""

    pack: str = _setting("default", _one_of(*MODEL_PACKS), "default | fast | quality")
    stt: str = _setting("", None, "STT model: offline name, path, or Hugging Face name")
    llm: str = _setting(
        "", None, "LLM: offline name, GGUF path, owner/repo:file.gguf, or the server's model name"
    )
    tts: str = _setting("", None, "TTS model: offline name, path, or Hugging Face name")
    stt_engine: str = _setting(
        "whisper", _one_of("whisper", "wyoming"), "whisper (in process) | wyoming (a server)"
    )
    llm_engine: str = _setting(
        "llama", _one_of("llama", "openai"), "llama (in process) | openai (a server's API)"
    )
    tts_engine: str = _setting(
        "",
        _one_of("", "kokoro", "piper", "wyoming"),
        "kokoro | piper (in process) | wyoming (a server) (default: pack's)",
    )
    stt_url: str = _setting("", _url("tcp"), "Wyoming STT server, tcp://host:port")
    llm_url: str = _setting("", _url("http", "https"), "OpenAI-compatible API, http://host:port/v1")
    llm_api_key: str = _setting("", None, "the API's key, for a hosted one")
    llm_llama_fields: bool = _setting(
        True,
        None,
        "send llama.cpp's sampling fields (top_k, min_p, no repeat penalty, cache_prompt); "
        "false for an API that rejects fields it does not know",
    )
    tts_url: str = _setting("", _url("tcp"), "Wyoming TTS server, tcp://host:port")
    connect_timeout_s: float = _setting(3.0, _range(0.1, 60), "seconds to reach a model server")
    read_timeout_s: float = _setting(
        10.0, _range(0.1, 600), "seconds a model server may stay silent mid-answer"
    )
    tts_backend: str = _setting("onnx", _one_of("onnx", "torch"), "Kokoro backend")
    tts_streaming: bool = _setting(True, None, "Kokoro ONNX: first audio before the sentence")
    tts_vocoder: str = _setting(
        "auto",
        _one_of("auto", "onnx", "torch"),
        "Kokoro ONNX streaming: the vocoder on onnxruntime, or on PyTorch in bfloat16 "
        "(auto: torch where the CPU has bfloat16 units)",
    )
    voice: str = _setting("", None, "TTS voice (default: from the pack)")
    threads: int = _setting(
        2, _range(1, 64), "CPU threads an LLM step or a Kokoro run takes alone (beside another: 1)"
    )
    stt_threads: int = _setting(
        1, _range(1, 64), "Whisper's CPU threads (tiny.en: 71 ms a turn on 1, 80 ms on 2)"
    )
    stt_beam_size: int = _setting(1, _range(1, 10), "Whisper beam size")
    stt_device: str = _setting(
        "cpu",
        _one_of("auto", "cpu", "cuda"),
        "Whisper on the CPU or a CUDA GPU (auto: a GPU if seen)",
    )
    stt_compute_type: str = _setting(
        "", None, "Whisper's precision: int8, float16, ... (default: int8 on CPU, float16 on GPU)"
    )
    llm_gpu_layers: int = _setting(
        0, _range(-1, 1000), "LLM layers on the GPU (-1: all; needs a CUDA llama-cpp-python)"
    )
    tts_device: str = _setting(
        "cpu",
        _one_of("auto", "cpu", "cuda"),
        "Kokoro on the CPU or a CUDA GPU (auto: a GPU if seen)",
    )
    llm_max_tokens: int = _setting(50, _range(1, 2048), "longest reply, in tokens")
    llm_n_ctx: int = _setting(2048, _range(256, 32768), "LLM context window, in tokens")
    llm_parallel: int = _setting(4, _range(1, 64), "replies the LLM decodes together")
    llm_extra_buffers: str = _setting(
        "auto",
        _one_of("auto", "on", "off"),
        "llama.cpp's CPU-specific weight layouts (auto: off in a build with AMX)",
    )


@dataclass(frozen=True, slots=True)
class EchoProfile:
    """Diagnostic profile, like Asterisk's Echo(): plays the caller back after a delay."""

    kind: str = _setting("echo")
    delay_ms: int = _setting(500, _range(0, 10000), "delay before the caller hears themselves")
    port: int = _setting(0, _range(0, 65535), "own AudioSocket port for this profile (0: none)")


@dataclass(frozen=True, slots=True)
class AssistantProfile:
    """The voicebot: listens, understands, thinks and speaks."""

    kind: str = _setting("assistant")
    system_prompt: str = _setting(DEFAULT_SYSTEM_PROMPT, _nonempty, "who the bot is")
    greeting: str = _setting("Hello! How can I help you today?", None, "said when a call connects")
    barge_in: bool = _setting(False, None, "caller speech stops the bot while it talks")
    port: int = _setting(0, _range(0, 65535), "own AudioSocket port for this profile (0: none)")
    voice: str = _setting("", None, "TTS voice for this profile (default: [models] voice)")
    llm: str = _setting("", None, "LLM for this profile (default: [models] llm)")
    knowledge: str = _setting("", None, "facts the bot answers from (hours, address, prices, FAQ)")
    knowledge_file: str = _setting(
        "example",
        None,
        "file of facts (a path, relative to the config file; or a shipped one: example; "
        "empty: none)",
    )
    transfer_extension: str = _setting(
        "operator", None, "dialplan extension a transfer to a person reaches (empty: none)"
    )
    transfer_context: str = _setting("from-voicebot", _nonempty, "... in this dialplan context")
    transfer_message: str = _setting(
        "One moment, I am putting you through to a colleague.", _nonempty, "said before a transfer"
    )
    say_again: str = _setting(
        "Sorry, I didn't catch that. Could you say it again?",
        None,
        "said instead of an answer to likely misheard words, or when none came (empty: off)",
    )
    misheard_below: float = _setting(
        -0.9,
        _range(-10, 0),
        "words are most likely misheard below this mean token log-probability of Whisper's",
    )

    def instructions(self) -> str:
        """The system prompt, and the facts of ``knowledge`` and ``knowledge_file`` after it
        (the file is read here: load() has checked it)."""
        facts = "\n".join(
            part.strip()
            for part in (self.knowledge, _read_knowledge(self.knowledge_file))
            if part.strip()
        )
        if not facts:
            return self.system_prompt
        return f"{self.system_prompt}\n\n{KNOWLEDGE_RULES}\n{facts}"


# Said before a profile's facts: a small model otherwise fills a gap with a plausible guess.
KNOWLEDGE_RULES: Final = (
    "You answer for the business below, from these facts only. If they do not say, say you do "
    "not know and offer to put the caller through to a colleague."
)
KNOWLEDGE_DIR: Final = Path(__file__).parent / "knowledge"
# Every character of the facts is evaluated before a call's first reply and attended to by
# every token after: ~4 characters a token, 1000 tokens is half a reply's context window.
KNOWLEDGE_MAX_CHARS: Final = 4000


def knowledge_path(value: str, base: Path) -> Path | None:
    """Where ``knowledge_file`` points: a shipped file by name, else a path (relative to
    ``base``, the config file's folder)."""
    if not value:
        return None
    shipped = KNOWLEDGE_DIR / f"{value}.md"
    if "/" not in value and shipped.is_file():
        return shipped
    return base / value


def _read_knowledge(value: str) -> str:
    path = knowledge_path(value, Path.cwd())
    return path.read_text(encoding="utf-8") if path is not None else ""


PROFILE_KINDS: Final[dict[str, type[Any]]] = {"echo": EchoProfile, "assistant": AssistantProfile}
Profile = EchoProfile | AssistantProfile


@dataclass(frozen=True, slots=True)
class TurnSettings:
    """Turn detection (see bot/conversation/turns.py)."""

    vad: str = _setting("webrtc", _one_of("webrtc", "silero"), "voice activity detector")
    vad_mode: int = _setting(3, _range(0, 3), "webrtcvad aggressiveness (3: strictest)")
    noise_margin_db: float = _setting(
        8.0, _range(0, 40), "caller speech is this much above the line's background (0: off)"
    )
    onset_ms: int = _setting(60, _range(20, 1000), "voiced audio that starts a turn")
    pre_roll_ms: int = _setting(300, _range(0, 2000), "audio kept from before the onset")
    pause_ms: int = _setting(80, _range(20, 2000), "silence that starts speculative STT")
    hangover_ms: int = _setting(650, _range(100, 5000), "silence that ends a turn")
    hangover_complete_ms: int = _setting(250, _range(100, 5000), "... after a question")
    hangover_incomplete_ms: int = _setting(900, _range(100, 5000), "... after a trailing word")
    min_speech_ms: int = _setting(200, _range(20, 5000), "shorter turns are noise")
    min_response_ms: int = _setting(
        600, _range(0, 5000), "an answer is heard no sooner after the caller's last word"
    )
    reply_ahead: bool = _setting(
        True, None, "start the reply at a pause, play it if the pause ends the turn"
    )
    max_utterance_s: float = _setting(15.0, _range(1, 120), "a longer turn ends at once")
    barge_in_ms: int = _setting(200, _range(60, 2000), "caller speech that stops the bot")
    first_clause_words: int = _setting(
        3, _range(1, 30), "longest first clause sent to TTS (shorter: heard sooner)"
    )


@dataclass(frozen=True, slots=True)
class AriSettings:
    """ARI mode: a Stasis application bridges each call to the bot (see bot/asterisk/ari.py)."""

    enabled: bool = _setting(False, None, "connect to Asterisk's REST interface at start-up")
    url: str = _setting("http://127.0.0.1:8088", _nonempty, "Asterisk's HTTP server (http.conf)")
    app: str = _setting("voicebot", _nonempty, "Stasis application name (Stasis(voicebot,...))")
    username: str = _setting("voicebot", _nonempty, "ari.conf user")
    password: str = _secret("ari.conf password (VOICEBOT_ARI_PASSWORD only)")
    media_host: str = _setting(
        "127.0.0.1:9092", _nonempty, "host:port where Asterisk reaches the bot's AudioSocket"
    )
    format: str = _setting("slin16", _one_of("slin", "slin16"), "externalMedia audio format")


@dataclass(frozen=True, slots=True)
class AmiSettings:
    """AMI: hang-up and DTMF events into call logs, transfers, originate (bot/asterisk/ami.py)."""

    enabled: bool = _setting(False, None, "connect to Asterisk's manager interface at start-up")
    host: str = _setting("127.0.0.1", _nonempty, "manager.conf bindaddr")
    port: int = _setting(5038, _range(1, 65535), "manager.conf port")
    username: str = _setting("voicebot", _nonempty, "manager.conf user")
    secret: str = _secret("manager.conf secret (VOICEBOT_AMI_SECRET only)")


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Overload protection (see bot/app.py)."""

    max_calls: int = _setting(4, _range(1, 1000), "calls served at once; others hear 'busy'")
    busy_message: str = _setting(
        "Sorry, all lines are busy. Please call again later.", _nonempty, "said when full"
    )
    apology_message: str = _setting(
        "Sorry, something went wrong on my side. Please call again. Goodbye.",
        _nonempty,
        "said before the bot hangs up on an engine failure",
    )
    shutdown_grace: float = _setting(
        30.0, _range(0, 3600), "seconds calls may go on after SIGTERM before they are ended"
    )


# Settings that hold secrets: read from the environment only, never from the file or a log.
SECRETS: Final = frozenset({"ari.password", "ami.secret", "models.llm_api_key", "http.token"})


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    playout: PlayoutSettings = field(default_factory=PlayoutSettings)
    calls: CallLogSettings = field(default_factory=CallLogSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    turns: TurnSettings = field(default_factory=TurnSettings)
    ari: AriSettings = field(default_factory=AriSettings)
    ami: AmiSettings = field(default_factory=AmiSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    profiles: Mapping[str, Profile] = field(
        default_factory=lambda: {"echo": EchoProfile(), "assistant": AssistantProfile()}
    )

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            raise ConfigError(f"profile {name!r} is not defined") from None


SECTIONS: Final = {
    "server": ServerSettings,
    "http": HttpSettings,
    "playout": PlayoutSettings,
    "calls": CallLogSettings,
    "models": ModelSettings,
    "turns": TurnSettings,
    "ari": AriSettings,
    "ami": AmiSettings,
    "limits": LimitSettings,
}
_TYPES: Final = {"int": int, "float": float, "str": str, "bool": bool}
_TRUE: Final = {"1", "true", "yes", "on"}
_FALSE: Final = {"0", "false", "no", "off"}


class _FromEnv(str):
    """A value from an environment variable: text, parsed by the setting's type."""


def _coerce(key: str, f: dataclasses.Field[Any], raw: Any) -> Any:
    kind: type[Any] = f.type if isinstance(f.type, type) else _TYPES[str(f.type)]
    value: Any = raw
    if isinstance(raw, _FromEnv) and kind is not str:
        text = raw.strip().lower()
        try:
            if kind is bool:
                if text not in _TRUE | _FALSE:
                    raise ValueError
                value = text in _TRUE
            else:
                value = kind(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {kind.__name__}, got {str(raw)!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    check: Check | None = f.metadata.get("check")
    if check is not None and (why := check(value)) is not None:
        raise ConfigError(f"{key}: {why}")
    return str(value) if kind is str else value


def _build(cls: type[Any], prefix: str, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix}: expected a table, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, raw in values.items():
        if name not in fields:
            raise ConfigError(f"{prefix}.{name}: unknown key (known: {', '.join(fields)})")
        kwargs[name] = _coerce(f"{prefix}.{name}", fields[name], raw)
    return cls(**kwargs)


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.setdefault(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table, got {value!r}")
    return value


def _merge_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Fold VOICEBOT_SECTION_KEY variables into the file's tables."""
    # VOICEBOT_PROFILES_NAME_KIND defines a profile NAME; the others then name it.
    variables = sorted(environ.items(), key=lambda kv: (not kv[0].endswith("_KIND"), kv[0]))
    for var, value in variables:
        if not var.startswith(ENV_PREFIX) or var in NOT_SETTINGS:
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        if rest.startswith("profiles_"):
            profiles = _table(data, "profiles")
            name_key = rest[len("profiles_") :]
            if name_key.endswith("_kind") and name_key[: -len("_kind")]:
                profiles.setdefault(name_key[: -len("_kind")], {})
            # Longest name first: profile names may contain underscores themselves.
            known = sorted({*profiles, *PROFILE_KINDS}, key=len, reverse=True)
            name = next((n for n in known if name_key.startswith(n + "_")), None)
            if name is None:
                raise ConfigError(f"{var}: names no defined profile")
            table = profiles.setdefault(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"profiles.{name}: expected a table, got {table!r}")
            table[name_key[len(name) + 1 :]] = _FromEnv(value)
            continue
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(f"{var}: unknown setting (sections: {', '.join(SECTIONS)}, profiles)")
        _table(data, section)[rest[len(section) + 1 :]] = _FromEnv(value)


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from defaults, ``path`` (TOML) and the environment; raises :class:`ConfigError`."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get("VOICEBOT_CONFIG"):
        path = environ["VOICEBOT_CONFIG"]
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {p}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p}: not valid TOML: {exc}") from None
    for key in sorted(SECRETS):
        section, name = key.split(".")
        table = data.get(section)
        if isinstance(table, dict) and name in table:
            var = f"{ENV_PREFIX}{section.upper()}_{name.upper()}"
            raise ConfigError(f"{key}: secrets are read from the environment only; set {var}")
    _merge_env(data, environ)
    for key in data:
        if key not in SECTIONS and key != "profiles":
            raise ConfigError(f"{key}: unknown section (known: {', '.join(SECTIONS)}, profiles)")

    profiles: dict[str, Profile] = {"echo": EchoProfile(), "assistant": AssistantProfile()}
    for name, values in _table(data, "profiles").items():
        prefix = f"profiles.{name}"
        if not isinstance(values, Mapping):
            raise ConfigError(f"{prefix}: expected a table, got {values!r}")
        kind = values.get("kind", name if name in PROFILE_KINDS else None)
        if kind not in PROFILE_KINDS:
            raise ConfigError(
                f"{prefix}.kind: must be one of {', '.join(PROFILE_KINDS)}, got {kind!r}"
            )
        profiles[name] = _build(PROFILE_KINDS[kind], prefix, {**values, "kind": str(kind)})
    base = Path(path).resolve().parent if path else Path.cwd()
    for name, profile in profiles.items():
        if isinstance(profile, AssistantProfile):
            profiles[name] = _with_knowledge(f"profiles.{name}", profile, base)

    settings = Settings(
        server=_build(ServerSettings, "server", _table(data, "server")),
        http=_build(HttpSettings, "http", _table(data, "http")),
        playout=_build(PlayoutSettings, "playout", _table(data, "playout")),
        calls=_build(CallLogSettings, "calls", _table(data, "calls")),
        models=_build(ModelSettings, "models", _table(data, "models")),
        turns=_build(TurnSettings, "turns", _table(data, "turns")),
        ari=_build(AriSettings, "ari", _table(data, "ari")),
        ami=_build(AmiSettings, "ami", _table(data, "ami")),
        limits=_build(LimitSettings, "limits", _table(data, "limits")),
        profiles=profiles,
    )
    _check_links(settings)
    return settings


def _with_knowledge(prefix: str, profile: AssistantProfile, base: Path) -> AssistantProfile:
    """The profile with its knowledge file's absolute path, once it reads and fits."""
    path = knowledge_path(profile.knowledge_file, base)
    if path is None:
        text = ""
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{prefix}.knowledge_file: {path}: {why or exc}") from None
        profile = dataclasses.replace(profile, knowledge_file=str(path))
    size = len(profile.knowledge) + len(text)
    if size > KNOWLEDGE_MAX_CHARS:
        raise ConfigError(
            f"{prefix}.knowledge: {size} characters of facts, over {KNOWLEDGE_MAX_CHARS} "
            "(every reply attends to all of them: keep what callers ask)"
        )
    return profile


def _check_links(settings: Settings) -> None:
    """Checks that need more than one value: ports, credentials that must be present."""
    if settings.server.profile not in settings.profiles:
        raise ConfigError(
            f"server.profile: {settings.server.profile!r} is not defined "
            f"(profiles: {', '.join(settings.profiles)})"
        )
    taken = {settings.server.port: "server.port"} if settings.server.port else {}
    if settings.http.enabled and settings.http.port:
        if settings.http.port in taken:
            raise ConfigError(f"http.port: {settings.http.port} is already server.port")
        taken[settings.http.port] = "http.port"
    for name, profile in settings.profiles.items():
        if profile.port:
            if profile.port in taken:
                raise ConfigError(
                    f"profiles.{name}.port: {profile.port} is already {taken[profile.port]}"
                )
            taken[profile.port] = f"profiles.{name}.port"
    models = settings.models
    for engine, chosen, remote in (
        ("stt", models.stt_engine, "wyoming"),
        ("llm", models.llm_engine, "openai"),
        ("tts", models.tts_engine, "wyoming"),
    ):
        if chosen == remote and not getattr(models, f"{engine}_url"):
            raise ConfigError(f"models.{engine}_url: {engine}_engine is {remote} but no URL is set")
    if settings.ari.enabled and not settings.ari.password:
        raise ConfigError("ari.password: ARI is enabled but VOICEBOT_ARI_PASSWORD is not set")
    if settings.ami.enabled and not settings.ami.secret:
        raise ConfigError("ami.secret: AMI is enabled but VOICEBOT_AMI_SECRET is not set")


# --- reference -----------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f'"{text}"'
    return repr(value)


def _rows(cls: type[Any], section: str, env_section: str) -> list[str]:
    rows = []
    for f in dataclasses.fields(cls):
        if f.name == "kind":
            continue
        var = f"{ENV_PREFIX}{env_section}_{f.name.upper()}"
        default = (
            "(environment only)" if f"{section}.{f.name}" in SECRETS else f"`{_shown(f.default)}`"
        )
        doc = str(f.metadata.get("doc", "")).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {default} | {doc} | `{var}` |")
    return rows


def reference() -> str:
    """Every setting with its default and meaning, as Markdown (docs/configuration.md)."""
    head = ["| key | default | meaning | environment |", "|---|---|---|---|"]
    out: list[str] = []
    for section, cls in SECTIONS.items():
        out += [f"### [{section}]", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            out += [cls.__doc__.strip(), ""]
        out += head + _rows(cls, section, section.upper()) + [""]
    for kind, cls in PROFILE_KINDS.items():
        out += [f'### [profiles.NAME] with kind = "{kind}"', "", (cls.__doc__ or "").strip(), ""]
        out += head + _rows(cls, f"profiles.{kind}", f"PROFILES_{kind.upper()}") + [""]
    return "\n".join(out)
