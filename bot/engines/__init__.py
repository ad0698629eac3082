"""Speech engines: STT (faster-whisper), LLM (llama-cpp-python), TTS (Kokoro, Piper).

Engines know nothing about calls or sockets. Each job has one narrow interface, an options
dataclass, and backends created by name; heavy libraries are imported lazily, models are loaded
once per process, and inference is blocking (the call loop runs it in an executor).
"""

from __future__ import annotations


class EngineError(Exception):
    """Root of the engines' errors."""


class ModelUnavailable(EngineError):
    """A model's weights cannot be found or do not verify; the message says how to get them."""


class EngineFailed(EngineError):
    """An engine raised while running; the call loop apologises and ends the call."""
