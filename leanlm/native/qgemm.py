"""INT8 (symmetric, per output channel) linear layers on the packed small-M kernel of qgemm.c.

`pack(codes)` is gemm.pack on int8 codes: 16-column panels [ceil(N/16), K, 16]; `linear(x,
panels, scales, N, bias)` computes x @ (codes * scales[:, None]).T + bias in float32 for any
number of rows. Inside torch.compile the call is the custom op `leanlm::packed_linear_i8`.
"""
from __future__ import annotations

import ctypes

import torch

from leanlm import native
from leanlm.native.gemm import pack, unpack  # noqa: F401  (the same panel layout for int8 codes)

_P, _I = ctypes.c_void_p, ctypes.c_int
_fn = None


def kernel():
    """The C function, or None when native kernels are unavailable."""
    global _fn
    if _fn is None:
        _fn = native.function("qgemm", "qgemm_i8_packed", [_P, _I, _I, _P, _I, _P, _P, _P])
    return _fn


def available(dtype: torch.dtype, device: torch.device) -> bool:
    return (dtype == torch.float32 and torch.device(device).type == "cpu" and native.enabled()
            and kernel() is not None)


def linear_(x: torch.Tensor, panels: torch.Tensor, scales: torch.Tensor, N: int,
            bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] float32 -> [..., N] (eager only; lean, it runs ~120 times per decode step)."""
    if x.dim() != 2:
        return linear_(x.reshape(-1, x.shape[-1]), panels, scales, N, bias).view(*x.shape[:-1], N)
    if not x.is_contiguous():
        x = x.contiguous()
    M = x.shape[0]
    y = x.new_empty((M, N))
    if M:
        (_fn or kernel())(x.data_ptr(), M, x.shape[1], panels.data_ptr(), N, scales.data_ptr(),
                          y.data_ptr(), None if bias is None else bias.data_ptr())
    return y


@torch.library.custom_op("leanlm::packed_linear_i8", mutates_args=())
def packed_linear_i8(x: torch.Tensor, panels: torch.Tensor, scales: torch.Tensor, n: int,
                     bias: torch.Tensor | None) -> torch.Tensor:
    return linear_(x, panels, scales, n, bias)


@packed_linear_i8.register_fake
def _(x, panels, scales, n, bias):
    return x.new_empty(*x.shape[:-1], n)


def linear(x: torch.Tensor, panels: torch.Tensor, scales: torch.Tensor, N: int,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return packed_linear_i8(x, panels, scales, N, bias)
    return linear_(x, panels, scales, N, bias)
