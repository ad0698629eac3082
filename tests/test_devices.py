"""Where the local engines compute: the settings for a GPU, on a machine without one (the
tests never need a GPU; the GPU paths were checked on a lent one, docs/performance.md)."""

from __future__ import annotations

import pytest

from bot import config
from bot.engines import ModelUnavailable, devices
from bot.engines.llm import LlamaLlm, LlmOptions
from bot.engines.stt import SttOptions, WhisperStt
from bot.engines.tts import KokoroOnnx, TtsOptions


def test_a_device_is_the_gpu_only_where_asked_for_and_seen() -> None:
    assert devices.choose("k", "auto", True, "") == "cuda"
    assert devices.choose("k", "auto", False, "") == "cpu"
    assert devices.choose("k", "cpu", True, "") == "cpu"
    assert devices.choose("k", "cuda", True, "") == "cuda"
    with pytest.raises(ModelUnavailable, match=r"^models.x = cuda, but install the thing$"):
        devices.choose("models.x", "cuda", False, "install the thing")
    assert devices.stt_compute_type("", "cuda") == "float16"
    assert devices.stt_compute_type("", "cpu") == "int8"
    assert devices.stt_compute_type("int8_float16", "cuda") == "int8_float16"


def test_a_bad_device_setting_stops_start_up_naming_the_key() -> None:
    with pytest.raises(config.ConfigError, match=r"^models.stt_device: must be one of auto"):
        config.load(None, {"VOICEBOT_MODELS_STT_DEVICE": "gpu"})


@pytest.mark.skipif(devices.ctranslate2_cuda(), reason="this machine has a CUDA device")
def test_whisper_asked_for_a_gpu_it_does_not_have_says_so_and_auto_takes_the_cpu() -> None:
    with pytest.raises(ModelUnavailable, match="stt_device = cuda, but CTranslate2 sees no CUDA"):
        WhisperStt(SttOptions(device="cuda"), progress=False)
    stt = WhisperStt(SttOptions(device="auto"), progress=False)
    assert (stt.device, stt.compute_type) == ("cpu", "int8")


def test_llm_gpu_layers_need_a_llama_cpp_built_for_a_gpu() -> None:
    from bot.engines.llama_api import LlamaApi, offloads_to_gpu

    if offloads_to_gpu(LlamaApi().low):
        pytest.skip("this llama-cpp-python offloads to a GPU")
    with pytest.raises(ModelUnavailable, match=r"llm_gpu_layers = -1, but this llama-cpp-python"):
        LlamaLlm(LlmOptions(gpu_layers=-1), progress=False)


@pytest.mark.skipif(devices.onnxruntime_cuda(), reason="onnxruntime has its CUDA provider")
def test_kokoro_asked_for_a_gpu_names_the_package_it_needs() -> None:
    with pytest.raises(ModelUnavailable, match=r"pip install onnxruntime-gpu"):
        KokoroOnnx(TtsOptions(device="cuda"), progress=False)
