"""Block floating point KV codec (`bfp:MANTISSA[:bBLOCK][:reorder]`).

Each token's K and V are cut, per KV head, into blocks of BLOCK channels sharing one power-of-two
exponent (leanlm.formats.bfp's rule: e = floor(log2(block absmax)), step = 2^(e - (m - 2)), m-bit
signed mantissas), so |x - x_hat| <= step / 2 (< step for the few values that saturate). Tokens
are encoded alone: no residual, prefix-cached blocks are plain codes. Mantissas of 2, 4 or 8 bits
are stored as offset codes packed 8 / m per byte; other widths take a byte (<= 8) or two.

`reorder` ("Accurate Block Quantization in LLMs with Outliers", Trukhanov & Soloveychik 2024):
a block shares the exponent of its largest element, so one outlier channel costs the precision of
its whole block; sorting key channels by magnitude puts outliers together. The statistic needs no
calibration: the norm of each k_proj weight row (times |k_norm| weight, plus |bias|, where the
model has them). RoPE rotates channel i with channel i + D/2, mixing their magnitudes, so the
pairs are ranked by their joint norm and kept side by side. The same permutation is applied to
q and k of every head after RoPE (PagedKVCache.attend), which leaves every q.k unchanged; values
are not permuted. Done after RoPE it needs no per-layer rotary tables and no change to the
(possibly quantized, prepacked) projection weights, for one gather of the step's new q and k per
layer - not the zero cost of folding it into the weights (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from pathlib import Path

import torch

from leanlm.formats.bfp import shared_exponent
from leanlm.kv.quantized import TokenwiseCodec, pack_codes, unpack_codes


def _storage_bits(m: int) -> int:
    return m if m in (2, 4, 8) else (8 if m < 8 else 16)


class BfpCodec(TokenwiseCodec):
    def __init__(self, num_layers: int, num_slots: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, mantissa_bits: int, block: int,
                 key_perm: torch.Tensor | None = None):
        if head_dim % block:
            raise ValueError(f"bfp block {block} must divide head_dim {head_dim}")
        self.m, self.block, self.sbits = mantissa_bits, block, _storage_bits(mantissa_bits)
        self.spec = f"bfp:{mantissa_bits}:b{block}" + (":reorder" if key_perm is not None else "")
        self.key_perm = key_perm
        self.block_size, self.num_kv_heads, self.head_dim = block_size, num_kv_heads, head_dim
        self.dtype, self.num_layers = dtype, num_layers
        H, D = num_kv_heads, head_dim
        code_dtype = torch.int16 if self.sbits == 16 else torch.uint8
        width = D if self.sbits == 16 else D * self.sbits // 8
        self.codes = [torch.zeros(num_slots, 2, H, width, dtype=code_dtype, device=device)
                      for _ in range(num_layers)]
        self.exps = [torch.zeros(num_slots, 2, H, D // block, dtype=torch.int8, device=device)
                     for _ in range(num_layers)]

    def bytes_per_token(self) -> int:
        D = self.head_dim
        return 2 * self.num_layers * self.num_kv_heads * (D * self.sbits // 8 + D // self.block)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (codes, int8 exponents [..., D / block])."""
        xb = x.float().unflatten(-1, (-1, self.block))
        e = shared_exponent(xb.abs().amax(-1))
        qmax = (1 << (self.m - 1)) - 1
        # x / step is exact: step is a power of two
        mant = torch.round(torch.ldexp(xb, -(e.float() - (self.m - 2)).unsqueeze(-1))).clamp_(-qmax, qmax)
        mant = mant.flatten(-2)
        if self.sbits == 16:
            return mant.to(torch.int16), e
        return pack_codes((mant + (1 << (self.m - 1))).to(torch.uint8), self.sbits), e

    def decode(self, codes: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.sbits == 16:
            mant = codes.float()
        else:
            mant = unpack_codes(codes, self.sbits).float() - (1 << (self.m - 1))
        step = (e.float() - (self.m - 2)).unsqueeze(-1)
        return torch.ldexp(mant.unflatten(-1, (-1, self.block)), step).flatten(-2).to(self.dtype)


def key_channel_order(model_dir: str | Path, num_layers: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[layers, Hkv, D] channel order per layer and KV head: RoPE pairs (i, i + D/2) ranked by
    the joint norm of their k_proj weight rows (largest first), each pair kept side by side."""
    from safetensors import safe_open

    from leanlm.models.loader import checkpoint_files

    wanted = {f"model.layers.{i}.self_attn.{n}": (i, n) for i in range(num_layers)
              for n in ("k_proj.weight", "k_proj.bias", "k_norm.weight")}
    found: dict[tuple[int, str], torch.Tensor] = {}
    for f in checkpoint_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if name in wanted:
                    found[wanted[name]] = sf.get_tensor(name).double()
    H, D, half = num_kv_heads, head_dim, head_dim // 2
    order = torch.empty(num_layers, H, D, dtype=torch.long)
    for i in range(num_layers):
        w = found.get((i, "k_proj.weight"))
        if w is None or w.shape[0] != H * D:
            raise ValueError(f"bfp reorder ranks key channels by the k_proj weight rows of an "
                             f"unquantized checkpoint; {model_dir} has no usable "
                             f"model.layers.{i}.self_attn.k_proj.weight")
        mag = w.norm(dim=1).view(H, D)
        if (i, "k_norm.weight") in found:
            mag = mag * found[(i, "k_norm.weight")].abs()
        if (i, "k_proj.bias") in found:
            mag = mag + found[(i, "k_proj.bias")].abs().view(H, D)
        pair = mag[:, :half] ** 2 + mag[:, half:] ** 2               # [H, D/2]
        ranked = pair.argsort(dim=1, descending=True, stable=True)  # pair ids, largest first
        order[i] = torch.stack((ranked, ranked + half), dim=-1).view(H, D)
    return order
