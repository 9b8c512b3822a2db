"""Minifloat number formats: a generic ExMy codec, absmax-scaled FP8/FP6/FP4 weights, and NF4.

`Minifloat(e, m)` describes a sign | exponent | mantissa float of 1 + e + m <= 8 bits with
subnormals. Three layouts exist in practice and are selected by two flags:

    has_inf=True,  has_nan=True    IEEE-like: the top exponent holds inf (mantissa 0) and NaNs (FP8 E5M2)
    has_inf=False, has_nan=True    "fn": only S.1..1.1..1 is NaN, the rest of the top binade is finite (E4M3)
    has_inf=False, has_nan=False   every code is finite (the OCP MX FP6 / FP4 element types)

Conversion (`round_to`, `encode`) rounds to nearest, ties to even, keeps subnormals, and
saturates: anything beyond ±max_value, infinities included, becomes ±max_value (never inf,
never NaN from overflow). The sign of zero is kept (-0.0 and tiny negatives encode with the sign
bit set). NaN input: `round_to` returns NaN; `encode` gives the format's quiet NaN code with the
input's sign (0x7F / 0x7E for E4M3 / E5M2) and code 0 (+0) for formats with no NaN encoding.
Codes are uint8 holding the bit pattern in the low 1 + e + m bits; `decode` ignores higher bits.

Weight formats (WeightFormat subclasses), one absmax scale per group, w ≈ scale · value(code):

    "fp8-e4m3", "fp8-e5m2", "fp6-e3m2", "fp6-e2m3", "fp4-e2m1"   scale = absmax / format max
    "nf4"                                                           scale = absmax (codebook in [-1, 1])

Scales are stored as float32 by default (`scale_dtype=torch.float16` or bfloat16 is offered to
halve the overhead; a nonzero group's scale is clamped to the dtype's normal range - float16's
[6.1e-5, 65504] - so fp16 E4M3 groups with absmax < 0.027 get a coarser grid than they could, and
fp16 E5M2 scales, absmax / 57344, nearly always hit that floor: prefer float32 there). A group that is all zeros gets scale 0 and codes 0; a NaN group decodes to NaN.
bits_per_weight = code bits + scale bits / group size.
"""
from __future__ import annotations

import torch

from leanlm.formats.base import GroupParams, WeightFormat


def pow2(e: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2**e for an integer tensor, built from the exponent bits so it is exact (exp2 / pow may not
    be on every backend). Requires 2**e to be a normal number of `dtype`."""
    if dtype == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for a > 0 as int32, exactly (log2 rounds up just below powers of two)."""
    return torch.frexp(a).exponent - 1


class Minifloat:
    """An ExMy float codec; see the module docstring for the layouts and rounding rules."""

    def __init__(self, exp_bits: int, man_bits: int, bias: int | None = None, *,
                 has_inf: bool = False, has_nan: bool = False, name: str = ""):
        if not (1 <= exp_bits <= 5 and 0 <= man_bits <= 6 and 1 + exp_bits + man_bits <= 8):
            raise ValueError(f"minifloat E{exp_bits}M{man_bits} is not supported: need 1 <= exp_bits <= 5, "
                             f"0 <= man_bits and 1 + exp_bits + man_bits <= 8")
        if has_inf and not has_nan:
            raise ValueError("an IEEE-like layout with infinities also reserves NaN codes: set has_nan=True")
        self.exp_bits, self.man_bits = exp_bits, man_bits
        self.bias = 2 ** (exp_bits - 1) - 1 if bias is None else bias
        self.has_inf, self.has_nan = has_inf, has_nan
        self.name = name or f"e{exp_bits}m{man_bits}"
        self.bits = 1 + exp_bits + man_bits
        self.emin = 1 - self.bias                  # exponent of the smallest normal; subnormals share it
        top, full_man = 2 ** exp_bits - 1, 2 ** man_bits - 1
        if has_inf:                                # IEEE: whole top binade is inf / NaN
            max_field, max_man = top - 1, full_man
            self.nan_code = (top << man_bits) | (1 << max(man_bits - 1, 0))   # quiet NaN, 0x7E for E5M2
        elif has_nan:                              # fn: only the all-ones code is NaN
            max_field, max_man = (top, full_man - 1) if man_bits else (top - 1, 0)
            self.nan_code = (top << man_bits) | full_man
        else:
            max_field, max_man = top, full_man
            self.nan_code = None
        self.emax = max_field - self.bias          # the OCP spec's emax (8 for E4M3, 2 for E2M1, ...)
        self.max_value = 2.0 ** self.emax * (1 + max_man / 2 ** man_bits)
        self.min_normal = 2.0 ** self.emin
        self.min_subnormal = 2.0 ** (self.emin - man_bits)

    def __repr__(self) -> str:
        return f"Minifloat({self.name}, max={self.max_value})"

    def round_to(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest representable value (ties to even, saturating), as float32. float64 input is
        rounded directly, not via float32, so it cannot be double-rounded onto a tie."""
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(work)
        # Clamping first keeps inf finite and the quotient below in range; it cannot change the
        # result because everything above max_value saturates anyway.
        a = x.abs().clamp(max=2 * self.max_value)
        e = floor_log2(a).clamp(min=self.emin)
        quantum = pow2(e - self.man_bits, work)   # spacing of representable values in a's binade
        r = torch.round(a / quantum) * quantum    # round() is half-to-even; / and * by 2**k are exact
        r = r.clamp(max=self.max_value)
        return torch.copysign(r, x).float()       # copysign keeps -0.0 and NaN

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The uint8 bit pattern of round_to(x)."""
        r = self.round_to(x)
        a = r.abs()
        e = floor_log2(a).clamp(min=self.emin)
        sig = (a / pow2(e - self.man_bits)).nan_to_num_().to(torch.int32)   # 0 .. 2**(m+1) - 1, exact
        normal = sig >= 2 ** self.man_bits
        exp_field = torch.where(normal, e + self.bias, 0)
        man_field = sig - normal.to(torch.int32) * 2 ** self.man_bits
        sign = torch.signbit(r).to(torch.int32) << (self.bits - 1)
        code = sign | (exp_field << self.man_bits) | man_field
        nan = torch.isnan(r)
        code = torch.where(nan, sign | self.nan_code if self.nan_code is not None else 0, code)
        return code.to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 values of uint8 codes (inf / NaN where the layout has them)."""
        c = codes.to(torch.int32)
        m, top = self.man_bits, 2 ** self.exp_bits - 1
        sign = (c >> (self.bits - 1)) & 1
        exp_field = (c >> m) & top
        man_field = c & (2 ** m - 1)
        normal = exp_field > 0
        sig = man_field + normal.to(torch.int32) * 2 ** m
        v = sig.float() * pow2(torch.where(normal, exp_field - self.bias, self.emin) - m)
        if self.has_inf:
            v = torch.where((exp_field == top) & (man_field == 0), float("inf"), v)
            v = torch.where((exp_field == top) & (man_field != 0), float("nan"), v)
        elif self.has_nan:
            v = torch.where((c & (2 ** (self.bits - 1) - 1)) == self.nan_code, float("nan"), v)
        return torch.where(sign.bool(), -v, v)

    def values(self) -> torch.Tensor:
        """All finite non-negative representable values, ascending (float32)."""
        v = self.decode(torch.arange(2 ** (self.bits - 1), dtype=torch.uint8))
        return v[torch.isfinite(v)]


FP8_E4M3 = Minifloat(4, 3, has_nan=True, name="e4m3fn")               # max 448
FP8_E5M2 = Minifloat(5, 2, has_inf=True, has_nan=True, name="e5m2")   # max 57344
FP6_E3M2 = Minifloat(3, 2, name="e3m2")                               # max 28
FP6_E2M3 = Minifloat(2, 3, name="e2m3")                               # max 7.5
FP4_E2M1 = Minifloat(2, 1, name="e2m1")                               # {0, .5, 1, 1.5, 2, 3, 4, 6}

# QLoRA's NF4 codebook (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 lookup table), code i -> NF4[i].
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def _nf4_thresholds() -> torch.Tensor:
    """float32 decision thresholds t_i such that (x > exact midpoint_i) <=> (x > t_i) for float32 x.

    The exact midpoint of two float32 levels may fall between float32 numbers; rounding it *down*
    to float32 keeps the comparison exact, so a value exactly on a midpoint goes to the lower code.
    """
    cb = torch.tensor(NF4_CODEBOOK, dtype=torch.float32).double()
    mid = (cb[:-1] + cb[1:]) / 2                       # exact in float64
    t = mid.float()
    return torch.where(t.double() > mid, torch.nextafter(t, torch.tensor(-1.0)), t)


_NF4_THRESHOLDS = _nf4_thresholds()
_SCALE_BITS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}


def _safe_div(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w / scale, with 0 where the scale is 0 (an all-zero group, or a scale that underflowed)."""
    return torch.where(scale > 0, w / torch.where(scale > 0, scale, 1.0), 0.0)


class AbsmaxScaled(WeightFormat):
    """A per-group absmax scale that maps the group's largest |w| onto the grid's largest value."""

    grid_max: float = 1.0

    def __init__(self, scale_dtype: torch.dtype = torch.float32):
        if scale_dtype not in _SCALE_BITS:
            raise ValueError(f"scale_dtype {scale_dtype} is not allowed; use one of {list(_SCALE_BITS)}")
        self.scale_dtype = scale_dtype

    def fit(self, w: torch.Tensor, state: object = None) -> GroupParams:
        absmax = w.abs().amax(dim=1, keepdim=True).float()
        scale = absmax / self.grid_max
        if self.scale_dtype != torch.float32:      # a nonzero group must not get a 0 or inf scale
            info = torch.finfo(self.scale_dtype)
            scale = torch.where(absmax > 0, scale.clamp(info.smallest_normal, info.max), scale)
        stored = scale.to(self.scale_dtype)
        extra = {} if self.scale_dtype == torch.float32 else {"stored": stored}
        return GroupParams(stored.float(), extra=extra)

    def bits_per_weight(self, group_size: int) -> float:
        return self.bits + _SCALE_BITS[self.scale_dtype] / group_size


class ScaledMinifloat(AbsmaxScaled):
    """w ≈ scale · decode(code), codes are the minifloat's bit patterns (uint8)."""

    def __init__(self, name: str, elem: Minifloat, scale_dtype: torch.dtype = torch.float32):
        super().__init__(scale_dtype)
        self.name, self.elem, self.bits, self.grid_max = name, elem, elem.bits, elem.max_value

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return self.elem.encode(_safe_div(w.float(), params.scale))

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return self.elem.decode(codes) * params.scale


class NF4(AbsmaxScaled):
    """QLoRA NormalFloat4: w ≈ absmax · NF4_CODEBOOK[code]; nearest level, ties to the lower code."""

    name, bits, grid_max = "nf4", 4, 1.0

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        x = _safe_div(w.float(), params.scale).contiguous()
        # Number of thresholds strictly below x = index of the nearest level (NaN lands on code 15).
        return torch.searchsorted(_NF4_THRESHOLDS.to(x.device), x).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        cb = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=codes.device)
        return cb[codes.long()] * params.scale


MINIFLOATS = {"fp8-e4m3": FP8_E4M3, "fp8-e5m2": FP8_E5M2, "fp6-e3m2": FP6_E3M2,
              "fp6-e2m3": FP6_E2M3, "fp4-e2m1": FP4_E2M1}


def make_format(name: str, scale_dtype: torch.dtype = torch.float32) -> WeightFormat:
    """The weight format called `name` (one of FORMAT_NAMES)."""
    if name == "nf4":
        return NF4(scale_dtype)
    if name in MINIFLOATS:
        return ScaledMinifloat(name, MINIFLOATS[name], scale_dtype)
    raise ValueError(f"unknown minifloat format {name!r}; allowed: {', '.join(FORMAT_NAMES)}")


FORMAT_NAMES = (*MINIFLOATS, "nf4")
