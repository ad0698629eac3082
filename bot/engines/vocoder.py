"""Kokoro's vocoder (the iSTFTNet generator) on PyTorch in bfloat16, with the ONNX export's weights.

Theory of operation
-------------------
Nine tenths of Kokoro's time goes to its generator: 50 one-dimensional convolutions, run by
onnxruntime as ``ConvInteger`` on int8 weights and dynamically quantized activations, at
about 4 ms per 12.5 ms frame of audio on 2 cores. On a CPU with bfloat16 matrix units (AMX or
AVX512-BF16) oneDNN runs the same convolutions in bfloat16 several times faster, and PyTorch
(already installed for the ``kokoro`` package) hands them to oneDNN.

:meth:`TorchVocoder.from_onnx` reads the generator's weights out of the ONNX graph, by the
module path each node carries in its name (``/decoder/decoder/generator/resblocks.0/convs1.0/
Conv_quant``): int8 weights are dequantized (``(q - zero_point) * scale``), the float ones
(the two upsampling transposed convolutions, ``conv_post``) taken as they are, the
convolutions' padding, stride and dilation read from the nodes. :meth:`TorchVocoder.run` is
the generator's forward pass as the ``kokoro`` package writes it (``Generator.forward`` from the
harmonic source's spectrum on): noise convolutions and AdaIN residual blocks with Snake
activations, two upsamplings, ``conv_post``, then the inverse STFT (n_fft 20, hop 5) in float32.
The style's AdaIN gains and offsets are computed once per style vector.

Measured on the 2-core dev machine (Xeon with AMX): 64 frames (0.8 s of audio) in ~110 ms
instead of ~250 ms on onnxruntime.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from . import ModelUnavailable

_NODE: Final = re.compile(
    r"^/decoder/decoder/generator/(?P<path>(?:resblocks|noise_res|noise_convs|ups|conv_post)"
    r"[^/]*(?:/(?:convs[12]\.\d|adain[12]\.\d))?)/(?:fc/)?"
    r"(?:Conv_quant|Gemm_MatMul_quant|ConvTranspose|Conv)$"
)
N_FFT: Final = 20
HOP: Final = 5
BLOCK_CONVS: Final = 3  # convs1/convs2/adain pairs per AdaIN residual block
KERNELS_PER_STAGE: Final = 3  # resblocks per upsampling stage


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16), as Linux says."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


@dataclass(frozen=True, slots=True)
class _Conv:
    weight: Any  # torch.Tensor
    bias: Any
    stride: int
    padding: int
    dilation: int


class TorchVocoder:
    """Kokoro's generator on PyTorch (see the module's docstring)."""

    def __init__(self, layers: dict[str, Any], threads: int, dtype: str = "bfloat16") -> None:
        import torch

        self._torch = torch
        self.dtype = getattr(torch, dtype)
        self.threads = threads
        self._layers = layers
        self._adain_cache: tuple[bytes, dict[str, tuple[Any, Any]]] | None = None
        n = 0
        while f"resblocks.{n}/convs1.0" in layers:
            n += 1
        self.stages = n // KERNELS_PER_STAGE
        self._window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32)
        # The export's inverse STFT (a transposed convolution) does not divide by the window's
        # overlapped energy as torch.istft does: its output is louder by that sum, 1.5 for a
        # Hann window of 20 at hop 5 (measured against onnxruntime: x1.49-1.50).
        self._gain = float((self._window**2).sum()) / HOP

    @classmethod
    def from_onnx(cls, model: Any, threads: int, dtype: str = "bfloat16") -> TorchVocoder:
        """The generator of the ONNX ``model`` (an ``onnx.ModelProto`` of Kokoro v1.0)."""
        try:
            import torch
        except ImportError as exc:
            raise ModelUnavailable(f"PyTorch is not installed ({exc})") from exc
        from onnx import numpy_helper

        inits = {i.name: i for i in model.graph.initializer}

        def array(name: str) -> npt.NDArray[Any]:
            if name not in inits:
                raise ModelUnavailable(f"Kokoro ONNX: no initializer {name!r}")
            return np.array(numpy_helper.to_array(inits[name]))  # writable, for torch

        def dequantized(q_name: str, zp_name: str) -> npt.NDArray[np.float32]:
            scale_name = q_name.removesuffix("_quantized") + "_scale"
            q = array(q_name).astype(np.float32)
            w = (q - array(zp_name).astype(np.float32)) * array(scale_name)
            return np.asarray(w, dtype=np.float32)

        target = getattr(torch, dtype)
        layers: dict[str, Any] = {}
        for node in model.graph.node:
            m = _NODE.match(node.name)
            if m is None:
                continue
            path = m.group("path")
            attrs = {a.name: a for a in node.attribute}
            if node.op_type == "MatMulInteger":  # an AdaIN's style projection
                w = dequantized(node.input[1], node.input[3])
                b = array(f"decoder.decoder.generator.{path.replace('/', '.')}.fc.bias")
                layers[path] = (torch.from_numpy(w), torch.from_numpy(b))
                continue
            if node.op_type == "ConvInteger":
                w = dequantized(node.input[1], node.input[3])
                bias = f"decoder.decoder.generator.{path.replace('/', '.')}.bias"
            else:  # ConvTranspose, Conv: float weights
                w = array(node.input[1])
                bias = node.input[2]
            pads = list(attrs["pads"].ints) if "pads" in attrs else [0, 0]
            if pads[0] != pads[-1]:
                raise ModelUnavailable(f"Kokoro ONNX: uneven padding in {node.name}")
            layers[path] = _Conv(
                weight=torch.from_numpy(w).to(target).contiguous(),
                bias=torch.from_numpy(array(bias)).to(target),
                stride=int(attrs["strides"].ints[0]) if "strides" in attrs else 1,
                padding=int(pads[0]),
                dilation=int(attrs["dilations"].ints[0]) if "dilations" in attrs else 1,
            )
        for path in [p for p in layers if "/" in p and p.split("/")[1].startswith("convs1")]:
            block, k = path.split("/")[0], path[-1]
            for which in ("1", "2"):
                name = f"decoder.decoder.generator.{block}.alpha{which}.{k}"
                alpha = torch.from_numpy(array(name)).to(target)
                layers[f"{block}/alpha{which}.{k}"] = (alpha, (1.0 / alpha.float()).to(target))
        if (
            "ups.0" not in layers
            or "conv_post" not in layers
            or "resblocks.0/convs1.0" not in layers
        ):
            raise ModelUnavailable("Kokoro ONNX: the generator's layers were not found")
        return cls(layers, threads, dtype)

    # --- forward ---------------------------------------------------------------------------

    def run(
        self,
        features: npt.NDArray[np.float32],
        source: npt.NDArray[np.float32],
        style: npt.NDArray[np.float32],
    ) -> npt.NDArray[np.float32]:
        """Audio at 24 kHz (``frames * 300`` samples) from the decoder's ``features``
        ``[1, 512, frames]``, the harmonic source's spectrum ``source`` ``[1, 22, frames*60+1]``
        and the decoder's style ``[1, 128]``."""
        torch = self._torch
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            adain = self._adain(style)
            x = torch.from_numpy(np.ascontiguousarray(features)).to(self.dtype)
            har = torch.from_numpy(np.ascontiguousarray(source)).to(self.dtype)
            f = torch.nn.functional
            for i in range(self.stages):
                x = f.leaky_relu(x, 0.1)
                x_source = self._conv(har, f"noise_convs.{i}")
                x_source = self._block(x_source, f"noise_res.{i}", adain)
                x = self._conv(x, f"ups.{i}", transposed=True)
                if i == self.stages - 1:
                    x = f.pad(x, (1, 0), mode="reflect")
                x = x + x_source
                xs = None
                for j in range(KERNELS_PER_STAGE):
                    r = self._block(x, f"resblocks.{i * KERNELS_PER_STAGE + j}", adain)
                    xs = r if xs is None else xs + r
                assert xs is not None
                x = xs / KERNELS_PER_STAGE
            x = self._conv(f.leaky_relu(x, 0.01), "conv_post").float()
            half = N_FFT // 2 + 1
            spec = torch.exp(x[:, :half, :])
            phase = torch.sin(x[:, half:, :])
            audio = torch.istft(
                torch.polar(spec, phase),
                N_FFT,
                HOP,
                N_FFT,
                window=self._window,
                center=True,
            )
        return np.asarray(audio.numpy() * self._gain, dtype=np.float32).reshape(-1)

    def _adain(self, style: npt.NDArray[np.float32]) -> dict[str, tuple[Any, Any]]:
        """Every AdaIN's (1 + gamma, beta) for this style, computed once per style vector."""
        key = np.ascontiguousarray(style, dtype=np.float32).tobytes()
        if self._adain_cache is not None and self._adain_cache[0] == key:
            return self._adain_cache[1]
        torch = self._torch
        s = torch.from_numpy(np.ascontiguousarray(style, dtype=np.float32)).reshape(1, -1)
        out: dict[str, tuple[Any, Any]] = {}
        for path, layer in self._layers.items():
            if "/adain" in path:
                w, b = layer
                h = (s @ w + b).reshape(1, -1, 1)
                gamma, beta = torch.chunk(h, 2, dim=1)
                out[path] = ((1 + gamma).to(self.dtype), beta.to(self.dtype))
        self._adain_cache = (key, out)
        return out

    def _conv(self, x: Any, path: str, *, transposed: bool = False) -> Any:
        c: _Conv = self._layers[path]
        f = self._torch.nn.functional
        if transposed:
            return f.conv_transpose1d(x, c.weight, c.bias, stride=c.stride, padding=c.padding)
        return f.conv1d(
            x, c.weight, c.bias, stride=c.stride, padding=c.padding, dilation=c.dilation
        )

    def _block(self, x: Any, block: str, adain: dict[str, tuple[Any, Any]]) -> Any:
        """An AdaIN residual block: three (AdaIN, Snake, dilated conv, AdaIN, Snake, conv)."""
        f = self._torch.nn.functional
        sin = self._torch.sin
        for k in range(BLOCK_CONVS):
            a1, inv1 = self._layers[f"{block}/alpha1.{k}"]
            a2, inv2 = self._layers[f"{block}/alpha2.{k}"]
            g1, b1 = adain[f"{block}/adain1.{k}"]
            g2, b2 = adain[f"{block}/adain2.{k}"]
            xt = g1 * f.instance_norm(x) + b1
            xt = xt + inv1 * sin(a1 * xt) ** 2
            xt = self._conv(xt, f"{block}/convs1.{k}")
            xt = g2 * f.instance_norm(xt) + b2
            xt = xt + inv2 * sin(a2 * xt) ** 2
            xt = self._conv(xt, f"{block}/convs2.{k}")
            x = xt + x
        return x


__all__ = ["TorchVocoder", "cpu_has_bf16"]
