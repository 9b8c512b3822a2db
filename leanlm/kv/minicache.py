"""MiniCache (`minicache[:START][:T][:GAMMA][+INNER]`, Liu et al. 2024): from layer START (default
the middle) on, the KV of each pair of adjacent layers (START, START+1), (START+2, START+3), ... is
stored once, as a shared direction plus each layer's magnitude.

Per token, KV head, and K / V separately: u_a = x_a / |x_a|, u_b = x_b / |x_b|, the shared
direction is SLERP(u_a, u_b; T) (default T = 0.6, the paper's), and layer a reads |x_a| e, layer
b |x_b| e. A token whose two directions are far apart - angular distance angle(u_a, u_b) / pi above
GAMMA (default 0.05) for any of its heads, K or V - is retained: layer a's slot keeps u_a (so layer a
reads x_a as stored) and layer b's vectors go, FP8-E4M3 per token and head, to a retention pool.

Where the merge happens: the pair's shared slot is written when layer a writes (u_a, so layer a
attends to its own tokens as stored) and rewritten with the merged direction when layer b writes
in the same step; so every token - prompt and generated alike - is merged from the step that
writes it, which includes "after prefill". The two layers of a pair must therefore run in one
step (no early-exit split steps; the step buffer holds layer a's new k/v until layer b).

Storage. Directions go through an INNER codec (default bf16; `+kivi:4` etc. composes) that has
START + pairs (+ 1 unpaired last layer) virtual layers; magnitudes are fp16 [slots, 2 layers,
K/V, H] per pair; the retention pool holds RETAIN_FRACTION of every block's slots per pair (a
quota per block, so what a sequence may retain - and what the perplexity eval measures - is what
bytes_per_token pays for, however empty the rest of the pool is), with an int32 slot -> row map per
pair. Within a block the most distant tokens of a step are retained first; tokens beyond the quota
are merged anyway (`overflow` counts them). bytes_per_token = inner + magnitudes + map + pool share.
A slot written again before its block is released (speculative rollback) keeps its quota used.
"""
from __future__ import annotations

import math

import torch

from leanlm.kv.blocks import EVICTED
from leanlm.kv.codecs import KVCodec
from leanlm.kv.quantized import Fp8Codec

RETAIN_FRACTION = 1 / 8


def slerp(ua: torch.Tensor, ub: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP of unit vectors along the last dim (float32) and their angle in [0, pi]."""
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    small = so < 1e-6  # (anti)parallel: linear interpolation, renormalised
    wa = torch.where(small, 1 - t, torch.sin((1 - t) * omega) / so.clamp(min=1e-6))
    wb = torch.where(small, t, torch.sin(t * omega) / so.clamp(min=1e-6))
    e = wa * ua + wb * ub
    return e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12), omega.squeeze(-1)


class MiniCacheCodec(KVCodec):
    cross_layer = True

    def __init__(self, inner_factory, num_layers: int, num_slots: int, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype, device, start: int, t: float, gamma: float):
        if not 0 <= start < num_layers - 1:
            raise ValueError(f"minicache start layer {start} must be in 0..{num_layers - 2} "
                             f"(the model has {num_layers} layers)")
        self.start, self.t, self.gamma = start, t, gamma
        self.num_layers, self.block_size, self.num_kv_heads, self.head_dim = num_layers, block_size, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.pairs = (num_layers - start) // 2
        virtual = start + self.pairs + (num_layers - start) % 2
        self.inner = inner_factory(virtual)
        self.rotation, self.blockwise = self.inner.rotation, getattr(self.inner, "blockwise", False)
        self.spec = f"minicache:{start}:{t:g}:{gamma:g}+{self.inner.spec}"
        H, P = num_kv_heads, self.pairs
        self.mag = [torch.ones(num_slots, 2, 2, H, dtype=torch.float16, device=device) for _ in range(P)]
        self.quota = max(1, round(block_size * RETAIN_FRACTION))  # retained tokens per block and pair
        num_blocks = num_slots // block_size
        self.pool = Fp8Codec(P, num_blocks * self.quota, 1, H, head_dim, dtype, device, "e4m3")
        self.ret_row = [torch.full((num_slots,), -1, dtype=torch.int32, device=device) for _ in range(P)]
        self._used = [[0] * num_blocks for _ in range(P)]  # quota used per block
        self.overflow = 0
        self._held = None  # layer a's new (k, v) of this step, until layer b merges them

    def _where(self, layer: int) -> tuple[int, int | None, int]:
        """(virtual layer of the inner codec, pair index or None, 0 for a pair's first layer / 1)."""
        if layer < self.start:
            return layer, None, 0
        p, second = divmod(layer - self.start, 2)
        if p == self.pairs:
            return self.start + p, None, 0  # the unpaired last layer
        return self.start + p, p, second

    def tensors(self):
        return self.inner.tensors() + self.mag + self.ret_row + self.pool.tensors()

    def bytes_per_token(self) -> float:
        per_pair = 2 * 2 * self.num_kv_heads * 2 + 4 + self.pool.bytes_per_token() / self.pairs * self.quota / self.block_size
        return self.inner.bytes_per_token() + self.pairs * per_pair

    def fixed_bytes(self) -> int:
        return self.inner.fixed_bytes()

    def allocated_bytes(self) -> int:
        return self.inner.allocated_bytes() + sum(t.untyped_storage().nbytes() for t in
                                                  self.mag + self.ret_row + self.pool.tensors())

    def release(self, blocks):
        self.inner.release(blocks)
        blocks = [b for b in blocks if b != EVICTED]  # released when they were evicted (kv stream)
        if not blocks:
            return
        bs = self.block_size
        slots = (torch.tensor(blocks, device=self.device).unsqueeze(1) * bs + torch.arange(bs, device=self.device)).flatten()
        for p in range(self.pairs):
            self.ret_row[p][slots] = -1
            for b in blocks:
                self._used[p][b] = 0

    def write(self, layer, slots, k, v) -> None:
        vl, p, second = self._where(layer)
        if p is None:
            return self.inner.write(vl, slots, k, v)
        x = torch.stack((k, v), 1).float()                     # [T, 2, H, D]
        norm = x.norm(dim=-1, keepdim=True)
        u = x / norm.clamp(min=1e-12)
        if not second:  # layer a: its own direction and magnitude until layer b merges them
            self._held = (slots, u, norm)
            self.mag[p][slots, 0] = norm.squeeze(-1).half()
            self.ret_row[p][slots] = -1
            return self.inner.write(vl, slots, u[:, 0].to(self.dtype), u[:, 1].to(self.dtype))
        held_slots, ua, norm_a = self._held
        if held_slots is not slots and not torch.equal(held_slots, slots):
            raise RuntimeError(f"minicache: layer {layer} writes other slots than layer {layer - 1} "
                               "(a pair's layers must run in one step)")
        e, omega = slerp(ua, u, self.t)
        distance = (omega / math.pi).flatten(1).amax(1)  # [T]: the farthest of its heads, K or V
        cand = (distance > self.gamma).nonzero().squeeze(1)
        cand = cand[distance[cand].argsort(descending=True, stable=True)]
        used, chosen, rows = self._used[p], [], []
        for i, slot in zip(cand.tolist(), slots[cand].tolist()):
            b = slot // self.block_size
            if used[b] < self.quota:
                rows.append(b * self.quota + used[b])
                used[b] += 1
                chosen.append(i)
        self.overflow += cand.numel() - len(chosen)
        idx = torch.tensor(chosen, dtype=torch.long, device=self.device)
        if idx.numel():
            rows = torch.tensor(rows, dtype=torch.long, device=self.device)
            self.ret_row[p][slots[idx]] = rows.to(torch.int32)
            self.pool.write(p, rows, k[idx], v[idx])
            e[idx] = ua[idx]  # retained: the slot keeps layer a's own direction
        self.mag[p][slots, 1] = norm.squeeze(-1).half()
        self.inner.write(vl, slots, e[:, 0].to(self.dtype), e[:, 1].to(self.dtype))

    def _scale(self, layer, p, second, k, v, slots):
        """Directions k, v [..., H, D] of `slots` (same leading shape) -> this layer's K, V."""
        mag = self.mag[p][slots.flatten(), second].view(*slots.shape, 2, self.num_kv_heads, 1).to(k.dtype)
        k, v = k * mag[..., 0, :, :], v * mag[..., 1, :, :]
        if second:  # retained tokens: layer b's own vectors from the pool
            rows = self.ret_row[p][slots.flatten()].view(slots.shape)
            hit = (rows >= 0).nonzero(as_tuple=True)
            if hit[0].numel():
                r = rows[hit].long()
                kv = self.pool.decode(self.pool.codes[p][r], self.pool.exps[p][r])
                k, v = k.clone(), v.clone()
                k[hit], v[hit] = kv[:, 0], kv[:, 1]
        return k, v

    def read_blocks(self, layer, block_tables):
        vl, p, second = self._where(layer)
        k, v = self.inner.read_blocks(vl, block_tables)
        if p is None:
            return k, v
        bs = self.block_size
        slots = (block_tables.unsqueeze(-1) * bs + torch.arange(bs, device=self.device)).flatten(1)
        return self._scale(layer, p, second, k, v, slots)

    def read_slots(self, layer, first_slot, length):
        vl, p, second = self._where(layer)
        k, v = self.inner.read_slots(vl, first_slot, length)
        if p is None:
            return k, v
        return self._scale(layer, p, second, k, v, torch.arange(first_slot, first_slot + length, device=self.device))
