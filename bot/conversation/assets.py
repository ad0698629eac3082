"""What every call's conversation shares: the engines, their worker threads, the prompts.

Built once per process by the composition root (:mod:`bot.app`) and handed to each call's
:class:`~bot.conversation.assistant.Assistant`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..audio import resample_pcm
from ..config import AssistantProfile, Settings
from ..engines import Activity, EngineError
from ..engines.base import EngineSet, LlmEngine
from ..engines.tts import speak
from .turns import Vad, make_vad


@dataclass
class Assets:
    """Engines and prompt audio shared by every call of the process."""

    settings: Settings
    engines: EngineSet
    # Engine work of every call runs here (STT, the LLM's stream, TTS).
    executor: ThreadPoolExecutor
    # What the engines are doing, and the replies under way in every call (the engines' own).
    activity: Activity = field(default_factory=Activity)
    # Another LLM for a profile that names one ([profiles.NAME] llm): loads and warms it.
    load_llm: Callable[[str], LlmEngine] | None = None
    vad: Callable[[], Vad] | None = None  # a new VAD for a call (None: from [turns] vad)
    # ("greeting:PROFILE" | "transfer:PROFILE" | "say_again:PROFILE" | "busy" | "apology",
    # rate) -> PCM, synthesized at start-up
    prompts: dict[tuple[str, int], bytes] = field(default_factory=dict)
    llms: dict[str, LlmEngine] = field(default_factory=dict)  # profile -> its own LLM
    # profile -> its system prompt with its facts (read once, at start-up)
    instructions: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.instructions = {
            name: profile.instructions()
            for name, profile in self.settings.profiles.items()
            if isinstance(profile, AssistantProfile)
        }

    def llm_for(self, profile: str) -> LlmEngine:
        return self.llms.get(profile, self.engines.llm)

    def prompt(self, key: str, rate: int) -> bytes:
        return self.prompts.get((key, rate), b"")

    def new_vad(self) -> Vad:
        return self.vad() if self.vad is not None else make_vad(self.settings.turns)

    def prepare(self) -> None:
        """Checks each profile's voice, loads per-profile LLMs, and synthesizes the prompts
        (greetings, transfer hand-overs, the busy message) at 8 and 16 kHz, once, at start."""
        loaded: dict[str, LlmEngine] = {}
        for name, profile in self.settings.profiles.items():
            if not isinstance(profile, AssistantProfile):
                continue
            if profile.voice:
                try:
                    self.engines.tts.check_voice(profile.voice)
                except EngineError as exc:
                    raise EngineError(f"profiles.{name}.voice: {exc}") from exc
            if profile.llm:
                if profile.llm not in loaded:
                    loaded[profile.llm] = self._load_llm(name, profile.llm)
                self.llms[name] = loaded[profile.llm]
            self._synthesize(f"greeting:{name}", profile.greeting, profile.voice)
            if profile.transfer_extension:
                self._synthesize(f"transfer:{name}", profile.transfer_message, profile.voice)
            self._synthesize(f"say_again:{name}", profile.say_again, profile.voice)
        self._synthesize("busy", self.settings.limits.busy_message, "")
        self._synthesize("apology", self.settings.limits.apology_message, "")
        # The first call's prompt starts with its profile's system prompt: have it evaluated.
        default = self.settings.server.profile
        if default in self.instructions:
            self.llm_for(default).warm_up(self.instructions[default])

    def _load_llm(self, name: str, model: str) -> LlmEngine:
        if self.load_llm is None:
            raise EngineError(f"profiles.{name}.llm: this process cannot load another LLM")
        try:
            return self.load_llm(model)
        except EngineError as exc:
            raise EngineError(f"profiles.{name}.llm: {exc}") from exc

    def _synthesize(self, key: str, text: str, voice: str) -> None:
        if not text:
            return
        pcm = b"".join(speak(self.engines.tts, text, 16000, voice or None))
        self.prompts[(key, 16000)] = pcm
        self.prompts[(key, 8000)] = resample_pcm(pcm, 16000, 8000)
