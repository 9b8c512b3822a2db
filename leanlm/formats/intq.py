"""Integer formats int2..int8, symmetric or asymmetric, per-tensor / per-channel / group-wise.

Names. A name is the spec string: "int{b}" is the default flavour for b bits, and a suffix
names the other one. Defaults: int8 is symmetric (torch's int8 weight-only kernel is
symmetric per channel and a zero point buys nothing at 255 levels); int2, int3 and int4 are
asymmetric (at low bits a zero point wins back a level and the skew of a group, as in the
original GPTQ code and llama.cpp's Q4_1; torch's int4 CPU kernel takes a zero per group).
So: "int8", "int8-asym", "int4", "int4-sym", "int3", "int3-sym", "int2", "int2-sym"; the
redundant "int8-sym" and "int4-asym" are accepted by `from_name` and map to the canonical name.

Symmetric: codes in [-qmax, qmax], qmax = 2^(b-1) - 1 (restricted range: the most negative
code -2^(b-1) is never produced, so +w and -w quantize alike), scale = absmax / qmax,
w_hat = q * scale. Codes are int8.

Asymmetric: codes in [0, 2^b - 1]. The range is widened to include 0 (lo = min(w_min, 0),
hi = max(w_max, 0), as GPTQ does) so the zero point is an exact code in range and zeros stay
exact; scale = (hi - lo) / (2^b - 1), zero = round(-lo / scale), q = round(w / scale) + zero,
w_hat = (q - zero) * scale. GroupParams.zero holds that integer zero point as a float. Codes
are uint8.

Scales are stored in `scale_dtype` (float16 by default, which `bits_per_weight` counts as 16
bits; float32 and bfloat16 are allowed). The fitted scale is rounded *up* to that dtype, so what
a checkpoint saves is exactly what encoded the codes and the largest weight still fits: every
element stays within scale / 2 of its code. An all-zero group gets scale 1 (any scale decodes
it exactly; 1 keeps everything finite). Rounding is half to even, applied to w / scale, which
is computed in float64 so that ties and near-ties are decided exactly.
"""
from __future__ import annotations

import re

import torch

from leanlm.formats.base import GroupParams, WeightFormat

SCALE_DTYPES = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32}


def default_symmetric(bits: int) -> bool:
    """The flavour a bare "int{bits}" names: symmetric for int8, asymmetric below."""
    return bits == 8


def round_up_to_dtype(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest value of `dtype` >= s (s >= 0, float64), returned as float64.

    Raises if a scale does not fit the dtype, rather than storing an infinite scale."""
    r = s.to(dtype)
    r = torch.where(r.double() < s, torch.nextafter(r, torch.full_like(r, float("inf"))), r)
    if not torch.isfinite(r).all():
        raise ValueError(f"a scale of {float(s.max()):.4g} does not fit {dtype}; "
                         f"weights must be finite and scales within range (try scale_dtype=torch.float32)")
    return r.double()


class IntFormat(WeightFormat):
    def __init__(self, bits: int, symmetric: bool | None = None, scale_dtype: torch.dtype = torch.float16):
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"integer formats have 2..8 bits, got {bits!r}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype {scale_dtype} is not one of {list(SCALE_DTYPES)}")
        self.bits = bits
        self.symmetric = default_symmetric(bits) if symmetric is None else bool(symmetric)
        self.scale_dtype = scale_dtype
        suffix = "" if self.symmetric == default_symmetric(bits) else ("-sym" if self.symmetric else "-asym")
        self.name = f"int{bits}{suffix}"
        self.qmax = (1 << (bits - 1)) - 1 if self.symmetric else (1 << bits) - 1
        self.qmin = -self.qmax if self.symmetric else 0

    @classmethod
    def from_name(cls, name: str, **kwargs) -> "IntFormat":
        """"int4", "int4-sym", "int4-asym", ... (see the module docstring)."""
        m = re.fullmatch(r"int([2-8])(-sym|-asym)?", name)
        if not m:
            raise ValueError(f"unknown integer format {name!r}; expected int2..int8, "
                             f"optionally with -sym or -asym")
        sym = None if m.group(2) is None else m.group(2) == "-sym"
        return cls(int(m.group(1)), sym, **kwargs)

    def __repr__(self) -> str:
        return f"IntFormat({self.name!r}, scale_dtype={self.scale_dtype})"

    def fit(self, w: torch.Tensor, state: object = None) -> GroupParams:
        # Only [R, 1] statistics are done in float64: cheap, and exact for float32 inputs.
        if self.symmetric:
            span = w.abs().amax(dim=1, keepdim=True).double()
            zero = None
        else:
            lo = w.amin(dim=1, keepdim=True).clamp(max=0).double()
            span = w.amax(dim=1, keepdim=True).clamp(min=0).double() - lo
        scale = round_up_to_dtype(span / self.qmax, self.scale_dtype)
        scale = torch.where(span == 0, torch.ones_like(scale), scale)
        if not self.symmetric:
            zero = torch.round(-lo / scale).clamp(0, self.qmax).float()
        return GroupParams(scale.float(), zero)

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        q = torch.round(w.double() / params.scale.double())
        if params.zero is not None:
            q = q + params.zero.double()
        return q.clamp(self.qmin, self.qmax).to(torch.int8 if self.symmetric else torch.uint8)

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        q = codes.float()
        if params.zero is not None:
            q = q - params.zero          # small integers: exact in float32
        return q * params.scale

    def bits_per_weight(self, group_size: int) -> float:
        """Code bits + one scale (scale_dtype) and, asymmetric, one `bits`-bit zero point per
        group. Per-channel: pass K; per-tensor: pass N * K."""
        extra = SCALE_DTYPES[self.scale_dtype] + (0 if self.symmetric else self.bits)
        return self.bits + extra / group_size
