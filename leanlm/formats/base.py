"""The interface every weight number format implements (pure tensor math, no nn.Module).

A format quantizes a 2-D weight W [N out, K in] group-wise along K: each group of `group_size`
consecutive input columns of each row shares its scale (and zero point). Algorithms use the
pieces separately: RTN calls `quantize`; GPTQ, which quantizes one column at a time while
updating the rest, calls `fit` at the start of each group and `fake_quant` per column.

    fmt = get_format("int4", symmetric=False)
    q = fmt.quantize(W, group_size=128)          # QuantizedTensor: codes + scales (+ zeros)
    W_hat = fmt.dequantize(q)                    # float32 [N, K]
    state = fmt.prepare(W)                       # tensor-level state (NVFP4's tensor scale), else None
    params = fmt.fit(W[:, g0:g1], state)         # GroupParams for one group of columns
    W_hat_cols = fmt.fake_quant(W[:, j:j+1], params)

`group_size=None` means one group per row (per-output-channel); `group_size=K` with
`per_tensor=True` is per-tensor. Microscaling formats have a fixed block (32 or 16) and reject
any other group size with a ValueError naming the allowed one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GroupParams:
    """Scales (and zero points) of one group of columns, broadcastable against [N, G]."""
    scale: torch.Tensor                    # [N, 1] float32 (the decoded scale value)
    zero: torch.Tensor | None = None       # [N, 1] float32 zero point (asymmetric integer formats)
    extra: dict = field(default_factory=dict)  # format-specific (e.g. encoded E8M0 exponents)


@dataclass
class QuantizedTensor:
    """A whole quantized weight: unpacked integer codes plus per-group parameters."""
    format: str                            # the format's spec name, e.g. "int4", "mxfp4"
    shape: tuple[int, int]                 # [N, K]
    group_size: int                        # columns per group (K for per-channel)
    codes: torch.Tensor                    # [N, Kp] integer codes, unpacked; Kp = K rounded up to groups
    scales: torch.Tensor                   # [N, K // group_size] float32 decoded scales
    zeros: torch.Tensor | None = None      # [N, K // group_size] float32, asymmetric formats
    tensor_scale: torch.Tensor | None = None  # scalar float32 (NVFP4)
    stored_scales: torch.Tensor | None = None  # scales as stored (E8M0 / E4M3 bytes), when not float


class WeightFormat:
    """Base class; subclasses set `name`, `bits` and implement fit / encode / decode."""

    name: str = ""
    bits: int = 0                          # bits per code
    fixed_group: int | None = None         # microscaling block size, if the format fixes it

    def prepare(self, w: torch.Tensor) -> object:
        return None

    def fit(self, w: torch.Tensor, state: object = None) -> GroupParams:
        raise NotImplementedError

    def encode(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        raise NotImplementedError

    def fake_quant(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        return self.decode(self.encode(w, params), params)

    def bits_per_weight(self, group_size: int) -> float:
        """Code bits plus the scale / zero-point bits amortised over a group."""
        raise NotImplementedError

    def check_group(self, K: int, group_size: int | None) -> int:
        """The group size to use for K input columns, or a ValueError naming what is allowed."""
        if self.fixed_group is not None:
            if group_size not in (None, self.fixed_group):
                raise ValueError(f"{self.name} uses blocks of {self.fixed_group} weights; "
                                 f"group size {group_size} is not allowed")
            group_size = self.fixed_group
        g = K if group_size is None else group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"group size {group_size!r} must be a positive integer")
        return g

    def quantize(self, w: torch.Tensor, group_size: int | None = None,
                 per_tensor: bool = False) -> QuantizedTensor:
        """Every group of every row at once: fit / encode see [N * K / g, g] rows.

        `per_tensor=True` fits one scale (and zero) to the whole tensor, laid out as per-channel
        (group K) with the same value in every row, so `dequantize` needs no special case.

        When g does not divide K (SmolLM2's 576 features in groups of 128) the weight is padded
        with zero columns to a multiple of g: every format stores zeros exactly and a zero never
        widens a group's range, so the last group is simply a shorter one. Codes keep the padded
        width ([N, ceil(K / g) * g]); `shape` and `dequantize` keep the true K."""
        N, K = w.shape
        if per_tensor:
            if group_size not in (None, K) or self.fixed_group is not None:
                raise ValueError(f"per-tensor quantization takes no group size (got {group_size}) "
                                 f"and no block format ({self.name})")
            flat = w.float().reshape(1, N * K)
            p = self.fit(flat, self.prepare(w.float()))
            codes = self.encode(flat, p).reshape(N, K)
            return QuantizedTensor(self.name, (N, K), K, codes, p.scale.expand(N, 1).contiguous(),
                                   None if p.zero is None else p.zero.expand(N, 1).contiguous())
        g = self.check_group(K, group_size)
        w = w.float()
        state = self.prepare(w)
        Kp = -(-K // g) * g
        if Kp != K:
            w = torch.nn.functional.pad(w, (0, Kp - K))
        rows = w.reshape(N * (Kp // g), g)
        p = self.fit(rows, state)
        codes = self.encode(rows, p).reshape(N, Kp)
        stored = p.extra.get("stored")
        return QuantizedTensor(
            self.name, (N, K), g, codes, p.scale.reshape(N, Kp // g),
            None if p.zero is None else p.zero.reshape(N, Kp // g),
            p.extra.get("tensor_scale"),
            None if stored is None else stored.reshape(N, Kp // g))

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        N, K = q.shape
        extra = {} if q.tensor_scale is None else {"tensor_scale": q.tensor_scale}
        p = GroupParams(q.scales.reshape(-1, 1), None if q.zeros is None else q.zeros.reshape(-1, 1), extra)
        return self.decode(q.codes.reshape(-1, q.group_size), p).reshape(N, -1)[:, :K]
