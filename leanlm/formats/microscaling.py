"""Microscaling formats: OCP MX v1.0 (MXFP8 / MXFP6 / MXFP4) and NVIDIA's NVFP4.

MX (OCP Microscaling Formats Specification v1.0, section 6.3): a block of 32 consecutive weights
along K shares one E8M0 scale X = 2**shared_exp, where

    shared_exp = floor(log2(max |w|)) - emax_elem         (emax: E4M3 8, E5M2 15, E3M2 4, E2M3 2, E2M1 2)
    code_i     = element_round(w_i / X)                    (ties to even, saturating to ±elem max)

so the block's largest value lands in the element format's top binade (and may saturate there:
absmax 7 in MXFP4 gets X = 1 and 7 -> 6). E8M0 is stored as a uint8 biased exponent (bias 127,
0x00 = 2**-127 ... 0xFE = 2**127, 0xFF = NaN). shared_exp is clamped to [-127, 127]; a block
of zeros gets byte 0x00 and codes 0; a block containing NaN or inf gets 0xFF and decodes to NaN
(the spec: a NaN scale makes the whole block NaN). `GroupParams.scale` is the decoded 2**shared_exp
(float32) and `extra["stored"]` the bytes.

NVFP4 (NVIDIA's recipe): blocks of 16, E2M1 elements, an FP8 E4M3 block scale and a float32
per-tensor scale computed by `prepare(W)`:

    tensor_scale = absmax(W) / (448 * 6)                  (1.0 for an all-zero W)
    block_scale  = e4m3_round(block_absmax / 6 / tensor_scale)
    code_i       = e2m1_round(w_i / (block_scale * tensor_scale))
    w_hat_i      = (e2m1(code_i) * block_scale) * tensor_scale

`GroupParams.scale` is the decoded E4M3 block scale (NOT multiplied by the tensor scale),
`extra["stored"]` its E4M3 byte, `extra["tensor_scale"]` the 0-d float32 tensor scale.
A block whose scale rounds to 0 (absmax far below the tensor's) decodes to zeros.

Names: "mxfp8" (E4M3), "mxfp8-e5m2", "mxfp6-e3m2", "mxfp6-e2m3", "mxfp4" (E2M1), "nvfp4".
bits_per_weight: element bits + 8 / block (mxfp4 4.25, mxfp6 6.25, mxfp8 8.25, nvfp4 4.5; the
one float32 tensor scale of NVFP4 is not counted).
"""
from __future__ import annotations

import torch

from leanlm.formats.base import GroupParams, WeightFormat
from leanlm.formats.minifloat import (FP4_E2M1, FP6_E2M3, FP6_E3M2, FP8_E4M3, FP8_E5M2, Minifloat,
                                      floor_log2, pow2)

E8M0_BIAS = 127
E8M0_NAN = 0xFF


def e8m0_decode(stored: torch.Tensor) -> torch.Tensor:
    """float32 2**(byte - 127), NaN for 0xFF. Built in float64 because 2**-127 is subnormal in float32."""
    b = stored.to(torch.int32)
    v = pow2(b - E8M0_BIAS, torch.float64).float()
    return torch.where(b == E8M0_NAN, float("nan"), v)


def mx_shared_exponent(absmax: torch.Tensor, elem: Minifloat) -> torch.Tensor:
    """E8M0 bytes (uint8) of the spec's shared exponent for blocks with the given absmax."""
    exp = (floor_log2(absmax) - elem.emax).clamp(-E8M0_BIAS, E8M0_BIAS)
    stored = exp + E8M0_BIAS
    stored = torch.where(absmax == 0, 0, stored)                 # log2(0) = -inf, clamped to 2**-127
    stored = torch.where(torch.isfinite(absmax), stored, E8M0_NAN)
    return stored.to(torch.uint8)


class MXFormat(WeightFormat):
    """OCP MX: 32 elements of `elem` sharing one E8M0 power-of-two scale."""

    fixed_group = 32

    def __init__(self, name: str, elem: Minifloat):
        self.name, self.elem, self.bits = name, elem, elem.bits

    def fit(self, w: torch.Tensor, state: object = None) -> GroupParams:
        stored = mx_shared_exponent(w.abs().amax(dim=1, keepdim=True).float(), self.elem)
        return GroupParams(e8m0_decode(stored), extra={"stored": stored})

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        # Division by a power of two is exact, so the only rounding is the element format's.
        return self.elem.encode(w.float() / params.scale)

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return self.elem.decode(codes) * params.scale

    def bits_per_weight(self, group_size: int | None = None) -> float:
        return self.bits + 8 / self.fixed_group


class NVFP4(WeightFormat):
    """NVIDIA FP4: 16 E2M1 elements per E4M3 block scale, times a float32 tensor scale."""

    name, bits, fixed_group = "nvfp4", 4, 16
    elem, block_scale_format = FP4_E2M1, FP8_E4M3

    def prepare(self, w: torch.Tensor) -> torch.Tensor:
        """The per-tensor scale: maps absmax(W) onto the largest block scale times the largest element."""
        ts = w.abs().amax().float() / (self.block_scale_format.max_value * self.elem.max_value)
        return torch.where(ts == 0, torch.ones_like(ts), ts)    # any value works for an all-zero W

    def fit(self, w: torch.Tensor, state: object = None) -> GroupParams:
        # Without prepare()'s state (a caller fitting one group alone) the rows given set the tensor scale.
        ts = self.prepare(w) if state is None else torch.as_tensor(state, dtype=torch.float32, device=w.device)
        absmax = w.abs().amax(dim=1, keepdim=True).float()
        stored = self.block_scale_format.encode(absmax / self.elem.max_value / ts)
        return GroupParams(self.block_scale_format.decode(stored), extra={"stored": stored, "tensor_scale": ts})

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        d = params.scale * self._tensor_scale(params)
        x = torch.where(d > 0, w.float() / torch.where(d > 0, d, 1.0), 0.0)
        return self.elem.encode(x)

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        # Element × block scale is exact in float32 (2 + 4 significant bits); one rounding at the end.
        return self.elem.decode(codes) * params.scale * self._tensor_scale(params)

    def bits_per_weight(self, group_size: int | None = None) -> float:
        return self.bits + 8 / self.fixed_group

    def _tensor_scale(self, params: GroupParams) -> torch.Tensor:
        ts = params.extra.get("tensor_scale")
        if ts is None:
            raise ValueError("nvfp4 needs params.extra['tensor_scale'] (from prepare(W) via fit)")
        return ts


MX_ELEMENTS = {"mxfp8": FP8_E4M3, "mxfp8-e5m2": FP8_E5M2, "mxfp6-e3m2": FP6_E3M2,
               "mxfp6-e2m3": FP6_E2M3, "mxfp4": FP4_E2M1}
FORMAT_NAMES = (*MX_ELEMENTS, "nvfp4")


def make_format(name: str) -> WeightFormat:
    """The microscaling format called `name` (one of FORMAT_NAMES)."""
    if name == "nvfp4":
        return NVFP4()
    if name in MX_ELEMENTS:
        return MXFormat(name, MX_ELEMENTS[name])
    raise ValueError(f"unknown microscaling format {name!r}; allowed: {', '.join(FORMAT_NAMES)}")
