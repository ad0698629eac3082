"""Where each local engine computes: the CPU, or a CUDA GPU when asked for and present.

A setting of ``auto`` takes the GPU where the engine's library sees one, ``cuda`` insists on it
(start-up stops naming the setting when there is none), ``cpu`` never uses one. Each library
has its own CUDA build: CTranslate2 (faster-whisper) ships one in its wheel, onnxruntime needs
the ``onnxruntime-gpu`` package, PyTorch a CUDA wheel, llama-cpp-python a build with
``CMAKE_ARGS=-DGGML_CUDA=on``.
"""

from __future__ import annotations

from typing import Final

from . import ModelUnavailable

DEVICES: Final = ("auto", "cpu", "cuda")


def choose(setting: str, want: str, available: bool, missing: str) -> str:
    """``cpu`` or ``cuda`` for ``want`` (a value of DEVICES) given whether the library sees
    a GPU; ``missing`` says what to install when ``cuda`` is demanded and absent."""
    if want not in DEVICES:
        raise ModelUnavailable(f"{setting} must be one of {', '.join(DEVICES)}, not {want!r}")
    if want == "cuda" and not available:
        raise ModelUnavailable(f"{setting} = cuda, but {missing}")
    return "cuda" if want != "cpu" and available else "cpu"


def ctranslate2_cuda() -> bool:
    """CTranslate2 (faster-whisper's runtime) sees a CUDA device."""
    try:
        import ctranslate2

        return int(ctranslate2.get_cuda_device_count()) > 0
    except Exception:  # no CUDA runtime at all
        return False


def onnxruntime_cuda() -> bool:
    """onnxruntime was installed with its CUDA provider (the onnxruntime-gpu package)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def onnx_providers(device: str) -> list[str]:
    """onnxruntime's execution providers for ``device`` (the CPU as the fallback)."""
    if device == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def torch_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def stt_compute_type(setting: str, device: str) -> str:
    """faster-whisper's precision: the setting, or int8 on the CPU and float16 on a GPU."""
    return setting or ("float16" if device == "cuda" else "int8")
