"""The small float32 operations of a decoder layer on ops.c (see there for why): RMSNorm, the
residual add fused with the next RMSNorm, SiLU-and-multiply, rotary embedding in place, and
attention over a paged float32 cache with one context length per query row.

Callers use them in eager mode only (`usable(x)`), and keep their torch code for everything else
(other dtypes, torch.compile, no compiler, LEANLM_NATIVE=0). The wrappers are kept lean: a decode
step calls them ~150 times.
"""
from __future__ import annotations

import ctypes
from types import SimpleNamespace

import torch

from leanlm import native

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
_SIGNATURES = {
    "rmsnorm_f32": [_P, _I, _I, _P, _F, _P],
    "add_rmsnorm_f32": [_P, _P, _I, _I, _P, _F, _P, _P],
    "silu_mul_f32": [_P, _I, _I, _P],
    "rope_f32": [_P, _I, _I, _I, _L, _P, _P],
    "rope_unfused_f32": [_P, _I, _I, _I, _L, _P, _P],
    "paged_attention_f32": [_P, _L, _I, _I, _I, _I, _P, _P, _I, _P, _I, _P, _I, _F, _P],
    "decoder_layers_f32": [_P, _I, _P, _P, _I, _P, _P, _P, _P, _I, _P, _P, _P],
}
_RETURNS = {"paged_attention_f32": ctypes.c_int, "decoder_layers_f32": ctypes.c_int}  # 0 or -2 (no memory)
_lib = None
_state: bool | None = None  # whether the library loaded (decided once per process)


def _load() -> bool:
    global _lib, _state
    fns = {name: native.function("ops", name, args, _RETURNS.get(name)) for name, args in _SIGNATURES.items()}
    _state = all(f is not None for f in fns.values())
    _lib = SimpleNamespace(**fns) if _state else None
    return _state


def available() -> bool:
    return native.enabled() and (_state if _state is not None else _load())


def usable(x: torch.Tensor, enabled: bool) -> bool:
    """Whether the native ops apply to activations like x: float32 on the CPU, eager mode.
    `enabled`: the module's `available()`, read once when it was built (not per call)."""
    return enabled and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    N = x.shape[-1]
    _lib.rmsnorm_f32(x.data_ptr(), x.numel() // N, N, weight.data_ptr(), eps, out.data_ptr())
    return out


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + h, rms_norm(x + h) * weight), both new tensors (x is left as it was)."""
    x, h = x.contiguous(), h.contiguous()
    s, out = torch.empty_like(x), torch.empty_like(x)
    N = x.shape[-1]
    _lib.add_rmsnorm_f32(x.data_ptr(), h.data_ptr(), x.numel() // N, N, weight.data_ptr(), eps,
                         s.data_ptr(), out.data_ptr())
    return s, out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[M, 2I] (gate, then up) -> silu(gate) * up, [M, I]."""
    gate_up = gate_up.contiguous()
    M, I2 = gate_up.shape
    out = gate_up.new_empty((M, I2 // 2))
    _lib.silu_mul_f32(gate_up.data_ptr(), M, I2 // 2, out.data_ptr())
    return out


def rope_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
    """Rotate, in place, the first `heads` heads of each row of x [M, W] (row-contiguous, W >=
    heads * head_dim); cos, sin_signed hold M * head_dim values (RotaryEmbedding.tables)."""
    assert x.stride(1) == 1 and cos.is_contiguous() and sin_signed.is_contiguous()
    _lib.rope_f32(x.data_ptr(), x.shape[0], heads, head_dim, x.stride(0), cos.data_ptr(),
                  sin_signed.data_ptr())


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    tables: torch.Tensor, lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """q [R, Hq, D] float32; k/v_cache [slots, Hkv, D] float32 or bfloat16 (both the same);
    tables [R, nblk] int64 block ids; lens [R] int64: row r attends to its first lens[r] tokens
    -> [R, Hq, D] float32."""
    q, tables, lens = q.contiguous(), tables.contiguous(), lens.contiguous()
    if (tables.dtype != torch.long or lens.dtype != torch.long or k_cache.dtype != v_cache.dtype
            or k_cache.dtype not in (torch.float32, torch.bfloat16) or q.dtype != torch.float32):
        raise TypeError("paged_attention: float32 q, int64 tables and lens, float32 or bfloat16 caches "
                        f"(got q {q.dtype}, caches {k_cache.dtype}/{v_cache.dtype}, tables {tables.dtype}, "
                        f"lens {lens.dtype})")
    R, Hq, D = q.shape
    out = torch.empty_like(q)
    _check(_lib.paged_attention_f32(q.data_ptr(), Hq * D, R, Hq, k_cache.shape[1], D, k_cache.data_ptr(),
                                    v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16),
                                    tables.data_ptr(), tables.shape[1], lens.data_ptr(),
                                    block_size, D ** -0.5, out.data_ptr()))
    return out


def rope_unfused_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
    """rope_ rounded as RotaryEmbedding.apply rounds it in torch (no fused multiply-add), in place."""
    assert x.stride(1) == 1 and cos.is_contiguous() and sin_signed.is_contiguous()
    _lib.rope_unfused_f32(x.data_ptr(), x.shape[0], heads, head_dim, x.stride(0), cos.data_ptr(),
                          sin_signed.data_ptr())


def _check(rc: int) -> None:
    if rc == -1:
        raise ValueError("native attention does not handle this head size (bfloat16 pages: head_dim <= 256)")
    if rc == -2:
        raise MemoryError("native attention could not allocate its score buffer")
    if rc:
        raise RuntimeError(f"native decoder layers failed (code {rc})")


def decoder_layers(*args) -> None:
    """ops.c's decoder_layers_f32 (see native/layers.py, which builds its arguments)."""
    _check(_lib.decoder_layers_f32(*args))
