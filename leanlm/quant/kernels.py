"""Packed weight-only matmuls that torch ships for the CPU, behind two small functions.

- INT8 per output channel: `torch._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N])`.
- INT4 group-wise: `aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)` with
  `packed = aten._convert_weight_to_int4pack_for_cpu(q int32 [N, K] in 0..15, 1)` and
  `sz [K / group, N, 2] = (scale, zero)`, dequantizing w = (q - 8) * scale + zero.

Both are fast only with bfloat16 activations on this CPU (float32 activations take a slow path:
int8 53 ms vs 11.6 ms per decode token of the embedded model, ../shared/DESIGN.md), so a float32
model casts the activation to bfloat16 for the matmul and the result back: the weights are
already quantized far below bfloat16's precision, the accumulation stays in float32 inside the
kernel.
"""
from __future__ import annotations

import torch

INT4_GROUPS = (32, 64, 128, 256)  # what the int4pack kernel accepts


def kernel_dtype_for(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The activation dtype the packed kernels run in for a model computing in `dtype`."""
    return torch.bfloat16 if device.type == "cpu" and dtype == torch.float32 else dtype


def kernel_dtype(x: torch.Tensor) -> torch.dtype:
    return kernel_dtype_for(x.dtype, x.device)


def pack_int8(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel codes int8 [N, K] and scales [N] -> the kernel's operands."""
    return codes.to(torch.int8).contiguous(), scales.float().reshape(-1).contiguous()


def int8_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    dt = kernel_dtype(x)
    shape = x.shape
    y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(dt), w, scales if scales.dtype == dt else scales.to(dt))
    return y.to(x.dtype).reshape(*shape[:-1], w.shape[0])


def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes q [N, K] in 0..15 with w = (q - 8) * scale + zero per group, scales and
    zeros [N, K / group] -> (packed weight, sz [K / group, N, 2] float32)."""
    N = q.shape[0]
    if N % 16:
        raise ValueError(f"the int4 kernel needs output features divisible by 16, got {N}")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    sz = torch.stack([scales.float().t(), zeros.float().t()], dim=-1).contiguous()
    return packed, sz


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor, n: int,
                padded_k: int | None = None) -> torch.Tensor:
    """`padded_k`: the weight was zero-padded to whole groups; pad x's features to match."""
    dt = kernel_dtype(x)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(dt)
    if padded_k is not None and padded_k != shape[-1]:
        x2 = torch.nn.functional.pad(x2, (0, padded_k - shape[-1]))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group,
                                                   sz if sz.dtype == dt else sz.to(dt))
    return y.to(x.dtype).reshape(*shape[:-1], n)
