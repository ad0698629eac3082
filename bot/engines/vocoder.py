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

Three rewrites that compute the same thing with less memory traffic (measured on the 2-core
dev machine, Xeon with AMX, the straight port -> this one):

- Every convolution is a 2-D one on ``[1, C, 1, T]`` in channels-last layout, the layout oneDNN
  computes bfloat16 in: ``conv1d`` gave its output back in the default layout, a copy of every
  activation (a fifth of the time).
- AdaIN (instance norm, then the style's gain and offset) is ``batch_norm`` on the batch's own
  statistics with the gain and offset as its affine weights: one kernel instead of three, and
  ``instance_norm`` copied channels-last input first.
- Snake, ``x + sin(alpha x)^2 / alpha``, loses its two scalings: the AdaIN before it is scaled
  by ``alpha`` (``y = alpha x``), the convolution after it gets ``1 / alpha`` folded into its
  weights per input channel, and the block computes ``y + sin(y)^2``.

64 / 128 / 256 frames (0.8 / 1.6 / 3.2 s of audio): 106 / 202 / 451 ms -> 67 / 125 / 201 ms,
the same sound (log-spectral distance to onnxruntime's int8 run 4.46 -> 4.41 dB); onnxruntime
itself takes ~250 ms for 64 frames.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from . import Activity, ModelUnavailable

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


class _OnnxWeights:
    """The initializers of an ONNX graph as numpy arrays, int8 ones dequantized."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self._to_array = numpy_helper.to_array
        self._inits = {i.name: i for i in model.graph.initializer}

    def array(self, name: str) -> npt.NDArray[Any]:
        if name not in self._inits:
            raise ModelUnavailable(f"Kokoro ONNX: no initializer {name!r}")
        return np.array(self._to_array(self._inits[name]))  # writable, for torch

    def dequantized(self, q_name: str, zp_name: str) -> npt.NDArray[np.float32]:
        scale_name = q_name.removesuffix("_quantized") + "_scale"
        q = self.array(q_name).astype(np.float32)
        w = (q - self.array(zp_name).astype(np.float32)) * self.array(scale_name)
        return np.asarray(w, dtype=np.float32)


def _read_layers(model: Any, weights: _OnnxWeights, target: Any) -> dict[str, Any]:
    """The generator's convolutions (float32 weights, ``target`` biases) and AdaIN style
    projections, by path (``resblocks.0/convs1.0``), from the graph's nodes."""
    import torch

    layers: dict[str, Any] = {}
    for node in model.graph.node:
        m = _NODE.match(node.name)
        if m is None:
            continue
        path = m.group("path")
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "MatMulInteger":  # an AdaIN's style projection
            w = weights.dequantized(node.input[1], node.input[3])
            b = weights.array(f"decoder.decoder.generator.{path.replace('/', '.')}.fc.bias")
            layers[path] = (torch.from_numpy(w), torch.from_numpy(b))
            continue
        if node.op_type == "ConvInteger":
            w = weights.dequantized(node.input[1], node.input[3])
            bias = f"decoder.decoder.generator.{path.replace('/', '.')}.bias"
        else:  # ConvTranspose, Conv: float weights
            w = weights.array(node.input[1])
            bias = node.input[2]
        pads = list(attrs["pads"].ints) if "pads" in attrs else [0, 0]
        if pads[0] != pads[-1]:
            raise ModelUnavailable(f"Kokoro ONNX: uneven padding in {node.name}")
        layers[path] = _Conv(
            weight=torch.from_numpy(w),  # float32 until the Snake's 1/alpha is folded in
            bias=torch.from_numpy(weights.array(bias)).to(target),
            stride=int(attrs["strides"].ints[0]) if "strides" in attrs else 1,
            padding=int(pads[0]),
            dilation=int(attrs["dilations"].ints[0]) if "dilations" in attrs else 1,
        )
    return layers


def _fold_snake_alpha(layers: dict[str, Any], weights: _OnnxWeights) -> None:
    """Snake before a resblock's convolution: x + sin(alpha x)^2 / alpha. The AdaIN before it
    is scaled by alpha (see TorchVocoder._adain), so the block computes y + sin(y)^2 with
    y = alpha x, and 1/alpha, per input channel, multiplies the weights here."""
    import torch

    for path in [p for p in layers if "/" in p and p.split("/")[1].startswith("convs")]:
        block, conv = path.split("/")
        which, k = conv[len("convs")], conv[-1]
        name = f"decoder.decoder.generator.{block}.alpha{which}.{k}"
        alpha = torch.from_numpy(weights.array(name)).reshape(-1).float()
        layers[f"{block}/alpha{which}.{k}"] = alpha
        c = layers[path]
        layers[path] = dataclasses.replace(c, weight=c.weight / alpha.reshape(1, -1, 1))


class TorchVocoder:
    """Kokoro's generator on PyTorch (see the module's docstring)."""

    def __init__(
        self,
        layers: dict[str, Any],
        threads: int,
        dtype: str = "bfloat16",
        *,
        activity: Activity | None = None,
    ) -> None:
        import torch

        self.activity = activity or Activity()

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
    def from_onnx(
        cls, model: Any, threads: int, dtype: str = "bfloat16", *, activity: Activity | None = None
    ) -> TorchVocoder:
        """The generator of the ONNX ``model`` (an ``onnx.ModelProto`` of Kokoro v1.0)."""
        try:
            import torch
        except ImportError as exc:
            raise ModelUnavailable(f"PyTorch is not installed ({exc})") from exc
        weights = _OnnxWeights(model)
        target = getattr(torch, dtype)
        layers = _read_layers(model, weights, target)
        _fold_snake_alpha(layers, weights)
        for path, c in list(layers.items()):
            if isinstance(c, _Conv):  # [out, in, 1, k] (transposed: [in, out, 1, k])
                weight = c.weight.to(target).unsqueeze(2)
                layers[path] = dataclasses.replace(
                    c, weight=weight.contiguous(memory_format=torch.channels_last)
                )
        if not {"ups.0", "conv_post", "resblocks.0/convs1.0"} <= layers.keys():
            raise ModelUnavailable("Kokoro ONNX: the generator's layers were not found")
        return cls(layers, threads, dtype, activity=activity)

    # --- forward ---------------------------------------------------------------------------

    def run(
        self,
        features: npt.NDArray[np.float32],
        source: npt.NDArray[np.float32],
        style: npt.NDArray[np.float32],
        *,
        threads: int | None = None,
    ) -> npt.NDArray[np.float32]:
        """Audio at 24 kHz (``frames * 300`` samples) from the decoder's ``features``
        ``[1, 512, frames]``, the harmonic source's spectrum ``source`` ``[1, 22, frames*60+1]``
        and the decoder's style ``[1, 128]``. ``threads``: by default ``self.threads`` alone,
        one beside another engine (see :class:`bot.engines.Activity`)."""
        torch = self._torch
        threads = threads or self.activity.threads("tts", self.threads)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            adain = self._adain(style)
            x, har = (
                torch.from_numpy(np.ascontiguousarray(a))
                .to(self.dtype)
                .unsqueeze(2)
                .contiguous(memory_format=torch.channels_last)
                for a in (features, source)
            )
            f = torch.nn.functional
            for i in range(self.stages):
                x = f.leaky_relu(x, 0.1)
                x_source = self._conv(har, f"noise_convs.{i}")
                x_source = self._block(x_source, f"noise_res.{i}", adain)
                x = self._conv(x, f"ups.{i}", transposed=True)
                if i == self.stages - 1:
                    x = f.pad(x, (1, 0, 0, 0), mode="reflect")
                    x = x.contiguous(memory_format=torch.channels_last)
                x = x + x_source
                xs = None
                for j in range(KERNELS_PER_STAGE):
                    r = self._block(x, f"resblocks.{i * KERNELS_PER_STAGE + j}", adain)
                    xs = r if xs is None else xs + r
                assert xs is not None
                x = xs / KERNELS_PER_STAGE
            x = self._conv(f.leaky_relu(x, 0.01), "conv_post").squeeze(2).float()
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
        """Every AdaIN's batch-norm weight and bias for this style, computed once per style
        vector: alpha (1 + gamma) and alpha beta, alpha the Snake's after it (see from_onnx)."""
        key = np.ascontiguousarray(style, dtype=np.float32).tobytes()
        if self._adain_cache is not None and self._adain_cache[0] == key:
            return self._adain_cache[1]
        torch = self._torch
        s = torch.from_numpy(np.ascontiguousarray(style, dtype=np.float32)).reshape(1, -1)
        out: dict[str, tuple[Any, Any]] = {}
        for path, layer in self._layers.items():
            if "/adain" in path:
                w, b = layer
                gamma, beta = torch.chunk((s @ w + b).reshape(-1), 2)
                alpha = self._layers[path.replace("/adain", "/alpha")]
                out[path] = ((alpha * (1 + gamma)).to(self.dtype), (alpha * beta).to(self.dtype))
        self._adain_cache = (key, out)
        return out

    def _conv(self, x: Any, path: str, *, transposed: bool = False) -> Any:
        """A one-dimensional convolution as a 2-D one on ``[1, C, 1, T]`` in channels-last
        layout, oneDNN's own for bfloat16: conv1d's output came back in it and was copied."""
        c: _Conv = self._layers[path]
        f = self._torch.nn.functional
        if transposed:
            return f.conv_transpose2d(
                x, c.weight, c.bias, stride=(1, c.stride), padding=(0, c.padding)
            )
        return f.conv2d(
            x,
            c.weight,
            c.bias,
            stride=(1, c.stride),
            padding=(0, c.padding),
            dilation=(1, c.dilation),
        )

    def _block(self, x: Any, block: str, adain: dict[str, tuple[Any, Any]]) -> Any:
        """An AdaIN residual block: three (AdaIN, Snake, dilated conv, AdaIN, Snake, conv).

        AdaIN is instance norm with the style's gain and offset: for one utterance that is
        batch norm on batch statistics, with the gain and offset as its affine weights (one
        kernel; instance_norm copied channels-last input first)."""
        f = self._torch.nn.functional
        sin, addcmul = self._torch.sin, self._torch.addcmul
        for k in range(BLOCK_CONVS):
            xt = x
            for which in ("1", "2"):
                weight, bias = adain[f"{block}/adain{which}.{k}"]
                y = f.batch_norm(xt, None, None, weight, bias, True)
                s = sin(y)
                xt = self._conv(addcmul(y, s, s), f"{block}/convs{which}.{k}")
            x = xt + x
        return x


__all__ = ["TorchVocoder", "cpu_has_bf16"]
