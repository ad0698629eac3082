"""llama-cpp-python beyond its public API, in one place, checked when a model loads.

The bot decodes the replies of every call together (``llm.LlamaLlm``), which the public
``Llama`` class does not offer: it needs ``llama_cpp._internals``' batch and sampler wrappers,
the context and vocabulary a ``Llama`` keeps (``_ctx``, ``_model``), functions of the low-level
``llama_cpp.llama_cpp`` module, and ``Llama()`` taking its parameters from patched defaults.
:class:`LlamaApi` looks all of it up at load: a llama-cpp-python without one of them fails
then, saying its version and what it lacks, not in the middle of a call.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

from . import ModelUnavailable

log = logging.getLogger(__name__)

TESTED_VERSION: Final = "0.3.36"  # pyproject.toml pins it
LOW_LEVEL: Final = (
    "LLAMA_DEFAULT_SEED",
    "llama_context_default_params",
    "llama_memory_seq_cp",
    "llama_memory_seq_rm",
    "llama_model_default_params",
    "llama_print_system_info",
    "llama_token_to_piece",
    "llama_vocab_is_eog",
)
INTERNALS: Final = ("LlamaBatch", "LlamaSampler")
LOADED: Final = ("_ctx", "_model")  # what a loaded Llama must hold


def missing(low_level: Any, internals: Any, *, loaded: Any = None) -> list[str]:
    """The names this bot uses that these modules (and a loaded ``Llama``) lack."""
    gone = [f"llama_cpp.llama_cpp.{n}" for n in LOW_LEVEL if not hasattr(low_level, n)]
    gone += [f"llama_cpp._internals.{n}" for n in INTERNALS if not hasattr(internals, n)]
    if loaded is not None:
        gone += [f"Llama.{n}" for n in LOADED if not hasattr(loaded, n)]
    return gone


def unsupported(version: str, gone: list[str]) -> ModelUnavailable:
    return ModelUnavailable(
        f"llama-cpp-python {version} lacks {', '.join(gone)}, which the bot uses (it is tested "
        f"with {TESTED_VERSION}: pip install llama-cpp-python=={TESTED_VERSION})"
    )


class LlamaApi:
    """The parts of llama-cpp-python the batched LLM uses, found and checked."""

    def __init__(self) -> None:
        try:
            import llama_cpp
            import llama_cpp.llama_cpp as low_level  # where Llama() takes its defaults from
            from llama_cpp import _internals
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise ModelUnavailable(f"llama-cpp-python is not installed ({exc})") from exc
        self.version = str(getattr(llama_cpp, "__version__", "?"))
        if gone := missing(low_level, _internals):
            raise unsupported(self.version, gone)
        if self.version != TESTED_VERSION:
            log.warning(
                "llama-cpp-python %s: the bot is tested with %s", self.version, TESTED_VERSION
            )
        self.Llama: Any = llama_cpp.Llama
        self.low: Any = low_level
        self._internals: Any = _internals

    def check_loaded(self, llama: Any) -> None:
        if gone := missing(self.low, self._internals, loaded=llama):
            raise unsupported(self.version, gone)

    def new_batch(self, n_tokens: int) -> Any:
        return self._internals.LlamaBatch(n_tokens=n_tokens, embd=0, n_seq_max=1)

    def new_sampler(self) -> Any:
        return self._internals.LlamaSampler()

    def token_piece(self, vocab: Any, token: int) -> bytes:
        """The bytes of one token (a piece of a UTF-8 character, maybe)."""
        buf = ctypes.create_string_buffer(64)
        n = self.low.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
        if n < 0:  # longer than the buffer: -n bytes
            buf = ctypes.create_string_buffer(-n)
            n = self.low.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]


def built_with(low_level: Any, feature: str) -> bool:
    """Whether this llama.cpp build says ``feature = 1`` in its system info (``AMX_INT8``,
    ``OPENMP``)."""
    try:
        info = low_level.llama_print_system_info()
    except Exception:
        return False
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    return f"{feature} = 1" in text


def built_with_amx(low_level: Any) -> bool:
    """Whether this llama.cpp build uses Intel AMX (it does where it was compiled on a CPU
    with AMX and without ``-mno-amx-*``, as scripts/bootstrap compiles it)."""
    return built_with(low_level, "AMX_INT8")


def offloads_to_gpu(low_level: Any) -> bool:
    """Whether this llama.cpp build can put layers on a GPU (CUDA, Metal, Vulkan, ...)."""
    try:
        return bool(low_level.llama_supports_gpu_offload())
    except Exception:
        return False


_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def load_params(low_level: Any, *, extra_buffers: bool, sequences: int) -> Iterator[None]:
    """``Llama()`` builds its model and context parameters itself from ``llama_cpp.llama_cpp``'s
    defaults: have them use (or not) llama.cpp's extra buffer types, and hold ``sequences``
    sequences in one unified KV cache, while one model loads."""
    model_default = low_level.llama_model_default_params
    context_default = low_level.llama_context_default_params

    def model_params() -> Any:
        p = model_default()
        p.use_extra_bufts = extra_buffers
        return p

    def context_params() -> Any:
        p = context_default()
        p.n_seq_max = sequences
        p.kv_unified = True
        return p

    with _PARAMS_LOCK:
        low_level.llama_model_default_params = model_params
        low_level.llama_context_default_params = context_params
        try:
            yield
        finally:
            low_level.llama_model_default_params = model_default
            low_level.llama_context_default_params = context_default


def chat_formatter(llama: Any) -> Callable[..., Any]:
    """The model's own chat template (GGUF metadata), as ``Llama.create_chat_completion`` uses
    it; ChatML for a model without one."""
    from llama_cpp import llama_chat_format

    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        return llama_chat_format.format_chatml  # type: ignore[no-any-return]
    model = llama._model

    def text(token: int) -> str:
        return str(model.token_get_text(token)) if token != -1 else ""

    return llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token=text(llama.token_eos()), bos_token=text(llama.token_bos())
    )
