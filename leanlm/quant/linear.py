"""QuantMethod: how a Linear layer stores and applies its weight (as vLLM's QuantizeMethodBase).

The model's `Linear` owns one method object. The loader fills `layer.weight` (shard by shard for
fused projections); `process_after_loading` then converts it to whatever the method runs on.
Formats and kernels stay out of the model code: a quantized method is a drop-in replacement.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.native import gemm  # builds nothing until a model asks for the kernel


class QuantMethod:
    """Interface. `create_weights` registers parameters on the layer; `apply` computes x @ W.T + b."""

    name = "base"

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int,
                       bias: bool, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        layer.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
                      if bias else None)

    def process_after_loading(self, layer: nn.Module) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedMethod(QuantMethod):
    name = "none"

    def apply(self, layer, x):
        return F.linear(x, layer.weight, layer.bias)


class OneDNNPrepackedMethod(QuantMethod):
    """bf16/fp16 on CPU: plain F.linear at batch 1 is no faster than fp32 on this hardware, but
    weights reordered once into oneDNN's blocked layout are ~2x faster per call."""

    name = "onednn-prepacked"

    def process_after_loading(self, layer):
        layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.data, 1)

    def apply(self, layer, x):
        if torch.compiler.is_compiling():
            # Inductor cannot lower the prepacked op; with freezing it prepacks F.linear itself.
            return F.linear(x, layer.weight, layer.bias)
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), layer.packed_weight,
                                               layer.bias, "none", [], "")
        return y.reshape(*shape[:-1], y.shape[-1])


class PackedFloat32Method(QuantMethod):
    """float32 on CPU: the weight repacked once into 16-column panels for the native small-M
    kernel (leanlm/native/sgemm.c). Decode and speculative verification (2..16 rows) cost about
    what one row does, and every row's result is independent of the batch. The panels replace
    the [N, K] weight (one copy in memory); `layer.weight` still reads back, as an unpacked copy,
    for the code that needs the matrix (quantizers, xquant's SVD, checkpoints)."""

    name = "packed-f32"

    def process_after_loading(self, layer):
        if "packed_weight" in layer._buffers:
            return
        layer.register_buffer("packed_weight", gemm.pack(layer.weight.data.float()), persistent=False)
        # a tied LM head drops only its own reference: the embedding keeps the matrix
        del layer._parameters["weight"]

    def apply(self, layer, x):
        return gemm.linear(x, layer.packed_weight, layer.out_features, layer.bias)


def onednn_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN's prepacked bf16/fp16 linear runs here: it needs the CPU's native bf16/fp16
    support (AVX-512 BW/VL/DQ or AVX-NE-CONVERT); on an AVX2-only CPU the reorder raises, and
    the layer stays a plain F.linear."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or not torch.backends.mkldnn.is_available():
        return False
    supported = (torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16
                 else torch.ops.mkldnn._is_mkldnn_fp16_supported)
    return bool(supported())


def default_method(dtype: torch.dtype, device: torch.device, compile: bool = False) -> QuantMethod:
    """The fastest unquantized method. With compile=True float32 stays a plain F.linear: inductor's
    freezing prepacks it for MKL inside the graph (36.3 tok/s tg128), while the native kernel
    would be an opaque custom op there (33.4 tok/s, measured back to back); the native kernel's
    gain is at 2..16 rows, which the compiled single-stream decode never has."""
    if onednn_available(dtype, device):
        return OneDNNPrepackedMethod()
    return PackedFloat32Method() if not compile and gemm.available(dtype, device) else UnquantizedMethod()
