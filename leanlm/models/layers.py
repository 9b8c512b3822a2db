"""Building blocks of the decoder: Linear (with a pluggable QuantMethod), RMSNorm, rotary embedding."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.native import ops as native_ops
from leanlm.quant.linear import QuantMethod, UnquantizedMethod


class Linear(nn.Module):
    """y = x W^T + b, computed by `self.method`. `shard_sizes` marks a fused projection
    (qkv, gate/up): the loader writes each original weight into its row range."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, method: QuantMethod | None = None,
                 shard_sizes: dict[str, int] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = method or UnquantizedMethod()
        self.method.create_weights(self, in_features, out_features, bias, dtype)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for name, size in (shard_sizes or {}).items():
            self.shard_offsets[name] = (off, size)
            off += size
        if shard_sizes and off != out_features:
            raise ValueError(f"fused shards sum to {off}, expected {out_features}")

    def load_shard(self, shard: str | None, param: str, tensor: torch.Tensor) -> None:
        target = getattr(self, param)
        if shard is not None:
            start, size = self.shard_offsets[shard]
            target = target.data.narrow(0, start, size)
        if target.shape != tensor.shape:
            raise ValueError(f"shape mismatch for {param}{'/' + shard if shard else ''}: "
                             f"checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}")
        target.data.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def set_weight(self, w: torch.Tensor) -> None:
        """Overwrite the float weight after loading, whatever form the method keeps it in (a
        packed layer's `weight` is a read-back copy: writing into it would change nothing)."""
        if "packed_weight" in self._buffers:
            from leanlm.native.gemm import pack

            self._buffers["packed_weight"].copy_(pack(w.float()))
        else:
            self.weight.data.copy_(w)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            from leanlm.native.gemm import unpack

            # packed layers keep only their panels: `weight` (float32) and `quantized` (native
            # int8: the QuantizedTensor without codes, plus the panels) read back unpacked copies
            if name == "weight" and "packed_weight" in self._buffers:
                return unpack(self._buffers["packed_weight"], self.out_features)
            if name == "quantized" and "int8_panels" in self._buffers:
                from dataclasses import replace

                codes = unpack(self._buffers["int8_panels"], self.out_features)
                return replace(self.__dict__["quantized_meta"], codes=codes)
            raise


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.native = native_ops.available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native_ops.usable(x, self.native):  # one native call instead of F.rms_norm's six ops
            return native_ops.rms_norm(x, self.weight, self.eps)
        # Normalise in float32 like the reference implementations, then cast back.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return (F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)) * self.weight


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies, float64, with linear or llama3 scaling applied as transformers does."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r}")


class RotaryEmbedding(nn.Module):
    """Half-split (NeoX / HF Llama) rotary embedding with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 dtype: torch.dtype):
        super().__init__()
        inv = rope_inv_freq(head_dim, theta, scaling).float()
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        # Tables in the compute dtype, as transformers casts cos/sin to the activations' dtype.
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        sin = emb.sin()
        sin[:, : head_dim // 2] *= -1
        self.register_buffer("sin_signed", sin.to(dtype), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] for the step, gathered once and shared by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate x [T, H, D] (any number of heads: q and k can go through together)."""
        cos, sin_signed = tables
        half = x.shape[-1] // 2
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin, sin): one cat, no negation
        return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin_signed
