"""Mixed key bits per channel (`kivi:AVG:...:prerope:kmix`): each KV head spends a fixed byte
budget on its 64 (head_dim) key channels unevenly, more bits where a quantization error moves the
attention scores most.

Why: a key channel's error e_c enters every score as q_c e_c, and with per-channel min-max
quantization over a block e_c is uniform in +-range_c / (2 (2^b - 1)), so a head's score error
is sum_c E[q_c^2] E[range_c^2] / (12 (2^b_c - 1)^2). The weights w_c = E[q_c^2] E[range_c^2] are
far from equal on SmolLM2: their arithmetic / geometric mean is 3.7 in the median head (74 in
the most skewed), which is what spreading the bits can win over equal bits. Measured on
SmolLM2 (docs/BENCHMARKS.md): 3.5 bits per key channel spread this way cost what 4 equal bits do.

Calibration (once, at load): the model runs on a few calibration sequences (ShareGPT prompts by
default, never the evaluation text) through `KeyStatsCache`, which attends exactly (float
attention, keys rotated by RoPE here) and records, per layer, head and channel, E[q^2] of the
query heads sharing the KV head (averaged over each RoPE pair, since RoPE mixes the pair's two
channels) and E[range^2] of the pre-RoPE key over blocks of G tokens.

Allocation: channels sorted by w, in groups of 8 (8 channels at b bits are exactly b bytes, so
any mix packs to whole bytes); every group starts at 2 bits (below 2, min-max codes do not beat
the block's midpoint) and bits go one at a time to the group whose weighted error drops most,
up to 8, until the head's budget of AVG * head_dim / 8 bytes is spent. Every head of every layer
gets the same budget, so the packed codes keep one shape [blocks, G, H, P].

Layout of a head's P bytes: its channel groups in order (perm[8 j .. 8 j + 7] at bits[j]), each
as one little-endian word of 8 codes of b bits: code i at bit b * i.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leanlm.models.layers import RotaryEmbedding

GROUP = 8       # channels per bit-width group: 8 codes of b bits = b bytes
MIN_BITS, MAX_BITS = 2, 8


@dataclass
class KeyBitPlan:
    """Per layer: perm [H, D] (channels by decreasing weight; group j = perm[:, 8j:8j+8]) and
    bits [H, D // 8] (non-increasing per head); every head's bits sum to 8 * bytes_per_head / 8."""
    avg_bits: float
    perm: list[torch.Tensor]
    bits: list[torch.Tensor]

    @property
    def bytes_per_head(self) -> int:
        return int(self.bits[0][0].sum())

    def channel_bits(self, layer: int) -> torch.Tensor:
        """[H, D] bits of each channel in its original order."""
        perm, bits = self.perm[layer], self.bits[layer]
        out = torch.empty_like(perm)
        out.scatter_(1, perm, bits.repeat_interleave(GROUP, dim=1))
        return out


def check_avg_bits(avg: float, head_dim: int) -> int:
    """The byte budget per head for `avg` bits per key channel; a clear error when it is not a
    whole number of bytes or is outside [2, 8] bits."""
    if head_dim % GROUP:
        raise ValueError(f"kivi kmix needs head_dim divisible by {GROUP}, head_dim is {head_dim}")
    total = avg * head_dim / 8
    if not MIN_BITS <= avg <= MAX_BITS or total != int(total):
        raise ValueError(f"kivi kmix average key bits {avg:g} must be in [{MIN_BITS}, {MAX_BITS}] and a "
                         f"whole number of bytes per head ({head_dim} channels: a multiple of {8 / head_dim:g})")
    return int(total)


def allocate(weights: torch.Tensor, avg_bits: float) -> tuple[torch.Tensor, torch.Tensor]:
    """weights [D] of one head -> (perm [D], bits [D // 8]): greedy on the weighted error
    sum_j W_j / (2^b_j - 1)^2 (W_j the sum of group j's weights), one bit at a time."""
    D = weights.numel()
    budget = check_avg_bits(avg_bits, D) * 8 // GROUP  # bits per channel summed over the groups
    perm = torch.argsort(weights.double(), descending=True, stable=True)
    gw = weights.double()[perm].view(-1, GROUP).sum(1).tolist()
    bits = [MIN_BITS] * len(gw)

    def gain(j: int) -> float:
        b = bits[j]
        return gw[j] * ((2 ** b - 1) ** -2 - (2 ** (b + 1) - 1) ** -2)

    heap = [(-gain(j), j) for j in range(len(gw))]
    heapq.heapify(heap)
    for _ in range(budget - MIN_BITS * len(gw)):
        _, j = heapq.heappop(heap)
        bits[j] += 1
        if bits[j] < MAX_BITS:
            heapq.heappush(heap, (-gain(j), j))
    # equal weights tie: sort each head's groups by bits so the plan reads high-to-low
    order = sorted(range(len(bits)), key=lambda j: -bits[j])
    perm = perm.view(-1, GROUP)[order].reshape(-1)
    return perm, torch.tensor([bits[j] for j in order], dtype=torch.long)


def plan_from_weights(weights: list[torch.Tensor], avg_bits: float) -> KeyBitPlan:
    """weights[layer] [H, D] -> the plan (each head allocated alone, same budget)."""
    perms, bits = [], []
    for w in weights:
        ph = [allocate(w[h], avg_bits) for h in range(w.shape[0])]
        perms.append(torch.stack([p for p, _ in ph]))
        bits.append(torch.stack([b for _, b in ph]))
    return KeyBitPlan(avg_bits, perms, bits)


# -- packing -----------------------------------------------------------------------------------

def _layout(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bits [H, ng] -> (shifts [H, ng, 8] of code i at b*i, byte mask [H, ng, 8]: bytes m < b)."""
    i = torch.arange(GROUP, device=bits.device)
    return bits.unsqueeze(-1) * i, i < bits.unsqueeze(-1)


def pack(codes: torch.Tensor, perm: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., H, D] (channel c < 2^bits of its group) -> [..., H, P] bytes."""
    H, D = perm.shape
    shifts, mask = _layout(bits.to(codes.device))
    c = torch.gather(codes.long(), -1, perm.to(codes.device).expand(*codes.shape[:-1], D))
    word = (c.view(*codes.shape[:-1], D // GROUP, GROUP) << shifts).sum(-1, keepdim=True)  # [..., H, ng, 1]
    byte = (word >> (8 * torch.arange(GROUP, device=codes.device))) & 255                  # [..., H, ng, 8]
    return byte[..., mask].view(*codes.shape[:-2], H, -1).to(torch.uint8)


def unpack(packed: torch.Tensor, perm: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """[..., H, P] bytes -> uint8 codes [..., H, D] in the original channel order."""
    H, D = perm.shape
    shifts, mask = _layout(bits.to(packed.device))
    byte = packed.new_zeros(*packed.shape[:-2], H, D // GROUP, GROUP, dtype=torch.long)
    byte[..., mask] = packed.reshape(*packed.shape[:-2], -1).long()
    word = (byte << (8 * torch.arange(GROUP, device=packed.device))).sum(-1, keepdim=True)
    c = (word >> shifts) & ((1 << bits.to(packed.device).unsqueeze(-1)) - 1)
    c = c.view(*packed.shape[:-2], H, D)
    out = torch.empty_like(c)
    out.scatter_(-1, perm.to(packed.device).expand_as(c), c)
    return out.to(torch.uint8)


# -- calibration -------------------------------------------------------------------------------

class KeyStatsCache:
    """A stand-in for the paged cache during calibration: exact causal attention over one
    sequence (pre-RoPE keys arrive, `rope_keys`), accumulating float64 E[q^2] per KV head and
    channel (pair-averaged) and E[range^2] of keys per channel over blocks of `group` tokens."""

    rope_keys, wants_layer_input, fused_rows = True, False, False

    def __init__(self, model, group: int):
        c = model.cfg
        self.cfg, self.group = c, group
        self.cos, self.sin = model.rope.cos, model.rope.sin_signed
        self.q2 = [torch.zeros(c.num_kv_heads, c.head_dim, dtype=torch.float64) for _ in range(c.num_layers)]
        self.r2 = [torch.zeros(c.num_kv_heads, c.head_dim, dtype=torch.float64) for _ in range(c.num_layers)]
        self.blocks = [0] * c.num_layers
        self.tokens = [0] * c.num_layers

    def attend(self, layer, q, k, v, ctx):
        c, T = self.cfg, q.shape[0]
        G, D, half = c.num_heads // c.num_kv_heads, c.head_dim, c.head_dim // 2
        qq = q.double().pow(2).view(T, c.num_kv_heads, G, D).sum(2).sum(0)
        self.q2[layer] += (qq + torch.cat((qq[:, half:], qq[:, :half]), 1)) / 2
        self.tokens[layer] += T
        nb = T // self.group
        if nb:
            kb = k[: nb * self.group].double().view(nb, self.group, c.num_kv_heads, D)
            self.r2[layer] += (kb.amax(1) - kb.amin(1)).pow(2).sum(0)
            self.blocks[layer] += nb
        kr = RotaryEmbedding.apply(k, (self.cos[:T, None].to(k.dtype), self.sin[:T, None].to(k.dtype)))
        o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0),
                                           kr.transpose(0, 1).repeat_interleave(G, 0).unsqueeze(0),
                                           v.transpose(0, 1).repeat_interleave(G, 0).unsqueeze(0), is_causal=True)
        return o[0].transpose(0, 1)

    def weights(self) -> list[torch.Tensor]:
        """[H, D] per layer: E[q^2] * E[range^2] (floored so that no weight is 0)."""
        out = []
        for l in range(self.cfg.num_layers):
            if not self.blocks[l]:
                raise ValueError(f"kivi kmix calibration needs sequences of at least {self.group} tokens")
            w = (self.q2[l] / self.tokens[l]) * (self.r2[l] / self.blocks[l])
            out.append(w.clamp(min=float(w.max()) * 1e-12 + 1e-30))
        return out


@torch.no_grad()
def calibrate(model, sequences: list[list[int]], avg_bits: float, group: int) -> KeyBitPlan:
    """Run `model` on the calibration token sequences and allocate the key bits."""
    check_avg_bits(avg_bits, model.cfg.head_dim)
    stats = KeyStatsCache(model, group)
    device = next(model.parameters()).device
    for seq in sequences:
        ids = torch.tensor(seq, device=device)
        model(ids, torch.arange(len(seq), device=device), stats, None)
    return plan_from_weights(stats.weights(), avg_bits)

