"""QuantMethod for weight-only quantized linear layers: any format, the fastest kernel it has.

The layer is created and loaded in full precision like any other; `process_after_loading`
quantizes it by round-to-nearest (unless an algorithm such as GPTQ already set its quantized
weight with `set_quantized`), then picks the kernel:

- symmetric INT8 per output channel -> with float32 activations on the CPU, the native kernel
  of leanlm/native/qgemm.c; else torch's int8 weight-only matmul;
- INT4 with groups of 32..256 (and output features a multiple of 16) -> torch's int4pack matmul;
- (both only on the CPU: torch has no CUDA build of these two kernels)
- every other format -> codes and scales kept, the weight dequantized into the compute dtype at
  each call (correct, slower; the format table in docs/BENCHMARKS.md says which path is which).
The float weight is dropped once quantized: memory holds only what the format stores.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.formats.base import GroupParams, QuantizedTensor, WeightFormat
from leanlm.native import qgemm
from leanlm.quant import kernels
from leanlm.quant.linear import QuantMethod


class WeightOnlyMethod(QuantMethod):
    """`rotate=True`: the weight is quantized in a block Walsh-Hadamard basis (W H, folded in
    offline) and each activation is rotated the same way online (x H), so x W^T is unchanged
    while outliers are spread across the block before quantization (MR-GPTQ / QuaRot)."""

    def __init__(self, fmt: WeightFormat, group_size: int | None = None, rotate: bool = False,
                 rotate_block: int | None = None, native: bool = True):
        self.fmt, self.group_size, self.rotate = fmt, group_size, rotate
        self.rotate_block = rotate_block  # requested Hadamard block; None: rotation.pick_block's default
        self.rotation = None  # set per layer (the block depends on its input features)
        self.kernel = None  # "int8-native", "int8", "int4" or "dequant", set when quantized
        self.native = native  # may use leanlm/native kernels (False under torch.compile: opaque to inductor)
        self.table: torch.Tensor | None = None  # dequant path: value of each code at unit scale
        self.code_offset = 0                    # first code of the table (-128 for int8 codes)
        self.name = f"{fmt.name}" + (f":g{group_size}" if group_size else "") + ((":rotate" if rotate_block is None else f":rotate{rotate_block}") if rotate else "")

    @classmethod
    def from_spec(cls, fmt: WeightFormat, spec, native: bool = True) -> "WeightOnlyMethod":
        """The method a QuantSpec describes (its group size and rotation)."""
        return cls(fmt, spec.group_size, rotate=spec.rotate, rotate_block=spec.rotate_block, native=native)

    def rotation_for(self, in_features: int):
        if not self.rotate:
            return None
        from leanlm.quant.rotation import Rotation

        if self.rotation is None:
            self.rotation = (Rotation.for_features(in_features) if self.rotate_block is None
                             else Rotation.for_features(in_features, self.rotate_block))
        return self.rotation

    def process_after_loading(self, layer: nn.Module) -> None:
        if getattr(layer, "quantized", None) is None:
            w = layer.weight.data.float()
            rotation = self.rotation_for(w.shape[1])
            if rotation is not None:
                w = rotation.weight(w)
            self.set_quantized(layer, self.fmt.quantize(w, self.group_size))

    def set_quantized(self, layer: nn.Module, q: QuantizedTensor) -> None:
        """Install a quantized weight (from RTN, GPTQ or a checkpoint) and pick its kernel."""
        dtype = layer.weight.dtype if getattr(layer, "weight", None) is not None else layer.compute_dtype
        layer.compute_dtype = dtype
        for buf in ("int8_panels", "int8_w", "int8_scales", "int4_w", "int4_sz"):  # a previous kernel's
            layer._buffers.pop(buf, None)
        layer.__dict__.pop("quantized_meta", None)
        layer.quantized = q
        N, K = q.shape
        kdt = kernels.kernel_dtype_for(dtype, q.codes.device)
        name = q.format
        # kernel operands are buffers: they move with the module and count as its weight bytes
        # torch ships both packed kernels for the CPU only; on CUDA every format dequantizes
        per_channel_int8 = name == "int8" and q.group_size == K and q.zeros is None
        if per_channel_int8 and self.native and qgemm.available(dtype, q.codes.device):
            # float32 activations: the native kernel (no bfloat16 rounding, ~1.4x faster at one
            # row, 2.4x at five). The panels are the only copy of the codes; `layer.quantized`
            # reads them back (Linear.__getattr__).
            layer.register_buffer("int8_panels", qgemm.pack(q.codes.to(torch.int8)), persistent=False)
            layer.register_buffer("int8_scales", q.scales.reshape(-1).float().contiguous(), persistent=False)
            layer.quantized_meta = replace(q, codes=None)
            del layer.quantized
            self.kernel = "int8-native"
        elif per_channel_int8 and q.codes.device.type == "cpu":
            w, scales = kernels.pack_int8(q.codes, q.scales.reshape(-1))
            layer.register_buffer("int8_w", w, persistent=False)
            layer.register_buffer("int8_scales", scales.to(kdt), persistent=False)
            self.kernel = "int8"
        elif (name in ("int4", "int4-sym") and q.group_size in kernels.INT4_GROUPS and N % 16 == 0
              and q.codes.device.type == "cpu"):
            if q.zeros is None:  # symmetric codes -7..7: shift to 1..15, no zero offset
                codes, zeros = q.codes.to(torch.int32) + 8, torch.zeros_like(q.scales)
            else:  # (q - z) * s = (q - 8) * s + (8 - z) * s
                codes, zeros = q.codes.to(torch.int32), (8 - q.zeros) * q.scales
            w, sz = kernels.pack_int4(codes, q.scales, zeros)
            layer.register_buffer("int4_w", w, persistent=False)
            layer.register_buffer("int4_sz", sz.to(kdt), persistent=False)
            self.kernel = "int4"
        else:
            for attr in ("codes", "scales", "zeros", "tensor_scale"):
                if getattr(q, attr) is not None:
                    layer.register_buffer(f"q_{attr}", getattr(q, attr), persistent=False)
            self.kernel = "dequant"
            self.table = self._value_table(q)
        layer._buffers.pop("packed_weight", None)  # a float32 layer's panels, if it had them
        layer.weight = None  # only the quantized form stays in memory

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = self.rotation.activation(x)
        if self.kernel == "int8-native":
            return qgemm.linear(x, layer.int8_panels, layer.int8_scales, layer.out_features, layer.bias)
        if self.kernel == "int8":
            y = kernels.int8_matmul(x, layer.int8_w, layer.int8_scales)
        elif self.kernel == "int4":
            q = layer.quantized
            y = kernels.int4_matmul(x, layer.int4_w, q.group_size, layer.int4_sz, q.shape[0], q.codes.shape[1])
        else:
            return F.linear(x, self.dequantized(layer.quantized).to(x.dtype), layer.bias)
        return y if layer.bias is None else y + layer.bias

    def dequantized(self, q: QuantizedTensor) -> torch.Tensor:
        """The float32 weight: through the code -> value table when the format has one (one
        gather and a multiply), else the format's own decode."""
        if self.table is None:
            return self.fmt.dequantize(q)
        N, K = q.shape
        g = q.group_size
        v = self.table[q.codes.long() - self.code_offset].reshape(N, -1, g)
        if q.zeros is not None:
            v = v - q.zeros.unsqueeze(-1)
        v = v * q.scales.unsqueeze(-1)
        if q.tensor_scale is not None:
            v = v * q.tensor_scale
        return v.reshape(N, -1)[:, :K]

    def _value_table(self, q: QuantizedTensor) -> torch.Tensor | None:
        """Values of every code at unit scale, if decoding is (table[code] - zero) * scale
        (* tensor scale) for this format; checked against the format's decode on this weight."""
        if q.codes.dtype not in (torch.uint8, torch.int8):
            return None
        lo = 0 if q.codes.dtype == torch.uint8 else -128
        codes = torch.arange(lo, lo + 256, device=q.codes.device).to(q.codes.dtype).reshape(1, 256)
        extra = {} if q.tensor_scale is None else {"tensor_scale": torch.ones((), device=q.codes.device)}
        try:
            table = self.fmt.decode(codes, GroupParams(torch.ones(1, 1, device=q.codes.device), None, extra))
        except Exception:  # noqa: BLE001 - a format with another decode rule: use it as it is
            return None
        self.table, self.code_offset = table.reshape(256).float(), lo
        if not torch.equal(self.dequantized(q), self.fmt.dequantize(q)):
            self.table = None
        return self.table
