"""Float32 linear layers on the packed small-M kernel of sgemm.c (see there for why).

`pack(w)` turns a [N, K] weight into 16-column panels [ceil(N/16), K, 16]; `linear(x, packed, N,
bias)` computes x @ w.T + bias for any number of rows. Prefill (hundreds of rows) runs the same
kernel tiled by 12 rows, within a few percent of MKL at 512 rows on the machines measured, so the
model keeps one copy of each weight. Inside torch.compile the call is the custom op
`leanlm::packed_linear` (opaque to inductor, a shape-only fake for tracing).
"""
from __future__ import annotations

import ctypes

import torch

from leanlm import native

_P, _I = ctypes.c_void_p, ctypes.c_int
_fn = None


def kernel():
    """The C function, or None when native kernels are unavailable."""
    global _fn
    if _fn is None:
        _fn = native.function("sgemm", "sgemm_packed", [_P, _I, _I, _P, _I, _P, _P])
    return _fn


def available(dtype: torch.dtype, device: torch.device) -> bool:
    return (dtype == torch.float32 and torch.device(device).type == "cpu" and native.enabled()
            and kernel() is not None)


def pack(w: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 -> panels [ceil(N/16), K, 16], columns past N zero."""
    N, K = w.shape
    n16 = -(-N // 16) * 16
    if n16 != N:
        w = torch.cat((w, w.new_zeros(n16 - N, K)))
    return w.reshape(n16 // 16, 16, K).transpose(1, 2).contiguous()


def unpack(packed: torch.Tensor, N: int) -> torch.Tensor:
    """The [N, K] weight back from its panels (a copy)."""
    P, K, _ = packed.shape
    return packed.transpose(1, 2).reshape(P * 16, K)[:N].contiguous()


def linear_(x: torch.Tensor, packed: torch.Tensor, N: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] float32 -> [..., N] with the C kernel (eager only). Kept lean: it runs ~120
    times per decode step, so every microsecond of Python here is ~0.1 ms per token."""
    if x.dim() != 2:
        return linear_(x.reshape(-1, x.shape[-1]), packed, N, bias).view(*x.shape[:-1], N)
    if not x.is_contiguous():
        x = x.contiguous()
    M = x.shape[0]
    y = x.new_empty((M, N))
    if M:
        (_fn or kernel())(x.data_ptr(), M, x.shape[1], packed.data_ptr(), N, y.data_ptr(),
                          None if bias is None else bias.data_ptr())
    return y


@torch.library.custom_op("leanlm::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    return linear_(x, packed, n, bias)


@packed_linear.register_fake
def _(x, packed, n, bias):
    return x.new_empty(*x.shape[:-1], n)


def linear(x: torch.Tensor, packed: torch.Tensor, N: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return packed_linear(x, packed, N, bias)
    return linear_(x, packed, N, bias)
