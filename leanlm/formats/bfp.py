"""Block floating point: one shared power-of-two exponent per block, m-bit signed mantissas.

The rule (MSFP, Darvish Rouhani et al. 2020; the same as OCP MX's MXINT8 for m = 8):
    e        = floor(log2(max |x| over the block)), clamped to [-127, 127] (E8M0's range);
               an all-zero block gets e = -127
    step     = 2^(e - (m - 2))           (the block's largest value is 1.xxx * 2^e, so with one
                                          sign bit and one integer bit its mantissa uses all m bits)
    mantissa = clamp(round_half_even(x / step), -(2^(m-1) - 1), 2^(m-1) - 1)
    x_hat    = mantissa * step
Mantissas are symmetric (the most negative two's complement code is unused, so they read the
same as sign-magnitude). |x - x_hat| <= step / 2, except for the few values within half a step
of 2^(e+1), which saturate and are off by less than one step. The exponent e is stored as int8;
`BFPFormat` exposes step as the decoded scale. x / step is exact (step is a power of two) and
is computed in float64 so that an extreme exponent cannot overflow the division. Non-finite
inputs are not supported.

`bfp_quantize` / `bfp_dequantize` work on blocks along any dimension of any-rank tensors (the
KV cache uses them on [..., head_dim]); `BFPFormat` is the weight format, one block per group.
"""
from __future__ import annotations

import torch

from leanlm.formats.base import GroupParams, WeightFormat

EXP_MIN, EXP_MAX = -127, 127


def _check_mantissa_bits(m: int) -> None:
    if not isinstance(m, int) or not 2 <= m <= 8:
        raise ValueError(f"BFP mantissas have 2..8 bits (sign included), got {m!r}")


def shared_exponent(absmax: torch.Tensor) -> torch.Tensor:
    """floor(log2(absmax)) as int8, clamped to [-127, 127]; -127 where absmax is 0."""
    _, e = torch.frexp(absmax.float())       # absmax = f * 2^e with f in [0.5, 1): exact
    e = torch.where(absmax > 0, e - 1, torch.full_like(e, EXP_MIN))
    return e.clamp(EXP_MIN, EXP_MAX).to(torch.int8)


def mantissa_step(exponent: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """2^(e - (m - 2)) in float64 (as low as 2^-133, which float32 still holds as a subnormal)."""
    return torch.exp2(exponent.double() - (mantissa_bits - 2))   # exact for integer powers


def _mantissas(x: torch.Tensor, step: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    qmax = (1 << (mantissa_bits - 1)) - 1
    return torch.round(x.double() / step).clamp(-qmax, qmax).to(torch.int8)


def _blocks(x: torch.Tensor, block: int, dim: int) -> torch.Tensor:
    """x with `dim` moved last and split into [..., n_blocks, block]."""
    x = x.movedim(dim, -1)
    if not isinstance(block, int) or block < 1 or x.shape[-1] % block:
        raise ValueError(f"block {block!r} must be a positive divisor of the size {x.shape[-1]} "
                         f"of dimension {dim}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def bfp_quantize(x: torch.Tensor, block: int, mantissa_bits: int,
                 dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of `block` consecutive elements along `dim`. Returns int8 mantissas shaped like x
    and int8 exponents shaped like x with `dim` shrunk to size // block."""
    _check_mantissa_bits(mantissa_bits)
    xb = _blocks(x, block, dim)
    e = shared_exponent(xb.abs().amax(dim=-1, keepdim=True))
    mant = _mantissas(xb, mantissa_step(e, mantissa_bits), mantissa_bits)
    mant = mant.reshape(*xb.shape[:-2], -1).movedim(-1, dim).contiguous()
    return mant, e.squeeze(-1).movedim(-1, dim).contiguous()


def bfp_dequantize(mantissas: torch.Tensor, exponents: torch.Tensor, block: int, mantissa_bits: int,
                   dim: int = -1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `bfp_quantize` (exact: mantissa * 2^k is representable in float32)."""
    _check_mantissa_bits(mantissa_bits)
    mb = _blocks(mantissas, block, dim)
    step = mantissa_step(exponents.movedim(dim, -1).unsqueeze(-1), mantissa_bits).float()
    x = (mb.float() * step).reshape(*mb.shape[:-2], -1)
    return x.movedim(-1, dim).to(dtype)


class BFPFormat(WeightFormat):
    """bfp{m}: one shared exponent per group (the group is the block), m-bit mantissas."""

    def __init__(self, mantissa_bits: int):
        _check_mantissa_bits(mantissa_bits)
        self.bits = mantissa_bits
        self.name = f"bfp{mantissa_bits}"

    def fit(self, w: torch.Tensor, state: object = None) -> GroupParams:
        e = shared_exponent(w.abs().amax(dim=1, keepdim=True))
        return GroupParams(mantissa_step(e, self.bits).float(), extra={"stored": e})

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return _mantissas(w, params.scale.double(), self.bits)

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return codes.float() * params.scale

    def bits_per_weight(self, group_size: int) -> float:
        """Mantissa bits plus one int8 exponent per group."""
        return self.bits + 8 / group_size
