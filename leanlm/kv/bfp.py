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
model has them). Zero run-time cost: the order is folded into the weights at load time
(`fold_key_order`, before any weight quantization): the q and k rows of qkv_proj (and q/k norm
weights) are permuted alike, so every q.k is unchanged, and the RoPE cos/sin tables' columns with
them, so each channel keeps its frequency. RoPE rotates channel i with i + D/2 (half-split), so a
permutation commutes with it only if it moves pairs together: one ranking pi of the D/2 pairs,
applied to both halves (new channel j <- old pi[j], j + D/2 <- pi[j] + D/2). The rotary tables are
shared by every layer and head, so the ranking is one for the whole model: the pairs' energy
summed over layers and KV heads, each (layer, head) normalised to sum 1 so no layer dominates.
Outlier key channels sit at the same (low) RoPE frequencies across layers and heads, which is
why one shared order captures most of it. Values are not permuted.
"""
from __future__ import annotations

import torch

from leanlm.formats.bfp import shared_exponent
from leanlm.kv.quantized import TokenwiseCodec, pack_codes, unpack_codes


def _storage_bits(m: int) -> int:
    return m if m in (2, 4, 8) else (8 if m < 8 else 16)


class BfpCodec(TokenwiseCodec):
    def __init__(self, num_layers: int, num_slots: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, mantissa_bits: int, block: int,
                 reorder: bool = False):
        if head_dim % block:
            raise ValueError(f"bfp block {block} must divide head_dim {head_dim}")
        self.m, self.block, self.sbits = mantissa_bits, block, _storage_bits(mantissa_bits)
        self.spec = f"bfp:{mantissa_bits}:b{block}" + (":reorder" if reorder else "")
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


def key_pair_order(model) -> torch.Tensor:
    """[D] the model's key channel order: RoPE pairs ranked by normalised k_proj row energy summed
    over layers and KV heads (largest first), applied to both halves: [pi, pi + D/2]."""
    c = model.cfg
    H, D, half = c.num_kv_heads, c.head_dim, c.head_dim // 2
    score = torch.zeros(half, dtype=torch.float64)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        w = attn.qkv_proj.weight.detach()
        if not w.dtype.is_floating_point:
            raise ValueError(f"bfp reorder ranks key channels by float k_proj rows; layer {i} holds {w.dtype}")
        mag = w[c.q_size: c.q_size + c.kv_size].double().norm(dim=1).view(H, D)
        if c.qk_norm:
            mag = mag * attn.k_norm.weight.detach().double().abs()
        if attn.qkv_proj.bias is not None:
            mag = mag + attn.qkv_proj.bias.detach()[c.q_size: c.q_size + c.kv_size].double().abs().view(H, D)
        pair = mag[:, :half] ** 2 + mag[:, half:] ** 2                    # [H, D/2]
        score += (pair / pair.sum(1, keepdim=True).clamp(min=1e-300)).sum(0)
    ranked = score.argsort(descending=True, stable=True)
    return torch.cat((ranked, ranked + half))


@torch.no_grad()
def fold_key_order(model, order: torch.Tensor) -> None:
    """Permute every head's q and k channels (qkv_proj rows, bias, q/k norm weights) and the RoPE
    tables' columns by `order` ([D], from key_pair_order), in place, before weight quantization."""
    c = model.cfg
    D = c.head_dim
    for layer in model.layers:
        attn = layer.self_attn
        rows = (torch.arange(c.num_heads + c.num_kv_heads).unsqueeze(1) * D + order).flatten()
        qkv = attn.qkv_proj
        n = rows.numel()
        w = qkv.weight.detach().clone()  # through set_weight: a packed layer's `weight` is a copy
        w[:n] = w[:n][rows.to(w.device)]
        qkv.set_weight(w)
        if qkv.bias is not None:
            qkv.bias.data[:n] = qkv.bias.data[:n][rows.to(qkv.bias.device)]
        if c.qk_norm:
            for norm in (attn.q_norm, attn.k_norm):
                norm.weight.data.copy_(norm.weight.data[order.to(norm.weight.device)])
    rope = model.rope
    rope.cos = rope.cos[:, order.to(rope.cos.device)].contiguous()
    rope.sin_signed = rope.sin_signed[:, order.to(rope.sin_signed.device)].contiguous()
