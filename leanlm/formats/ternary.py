"""Ternary weights {-1, 0, +1} with an absmean scale (BitNet b1.58, TriLM).

Per group (or channel, or tensor with `per_tensor=True`, as BitNet b1.58 itself does):
scale = mean(|w|), q = clamp(round(w / scale), -1, 1), w_hat = q * scale. Rounding is half to
even on w / scale computed in float64; so |w| = scale / 2 exactly rounds to 0.

The scale is stored in `scale_dtype` (float16 by default) and, as for the integer formats,
rounded up to it so that the saved scale is the one that encoded the codes. An all-zero group
gets scale 1. Codes are int8. Storage is 2 bits per code (`pack(codes, 2, signed=True)`), or
1.6 bits with base-3 packing (`pack_trits`), named "ternary-b3" when chosen.
"""
from __future__ import annotations

import torch

from leanlm.formats.base import GroupParams, WeightFormat
from leanlm.formats.intq import SCALE_DTYPES, round_up_to_dtype
from leanlm.formats.pack import TRITS_PER_BYTE


class TernaryFormat(WeightFormat):
    bits = 2

    def __init__(self, scale_dtype: torch.dtype = torch.float16, base3: bool = False):
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype {scale_dtype} is not one of {list(SCALE_DTYPES)}")
        self.scale_dtype = scale_dtype
        self.base3 = base3       # storage only: five trits per byte instead of 2 bits per code
        self.name = "ternary-b3" if base3 else "ternary"

    def fit(self, w: torch.Tensor, state: object = None) -> GroupParams:
        mean = w.double().abs().mean(dim=1, keepdim=True)
        scale = round_up_to_dtype(mean, self.scale_dtype)
        return GroupParams(torch.where(mean == 0, torch.ones_like(scale), scale).float())

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return torch.round(w.double() / params.scale.double()).clamp(-1, 1).to(torch.int8)

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return codes.float() * params.scale

    def bits_per_weight(self, group_size: int) -> float:
        code_bits = 8 / TRITS_PER_BYTE if self.base3 else 2
        return code_bits + SCALE_DTYPES[self.scale_dtype] / group_size
