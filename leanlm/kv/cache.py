"""The KV cache behind one small interface, so a paged or compressed cache can replace it.

The model never touches cache tensors: each attention layer calls
`cache.attend(layer, q, k, v, ctx)`, which stores the new k/v and attends over everything the
sequence has cached. `ctx` is built once per step by `cache.prepare(...)`, so per-layer work is
only the write and the attention kernel (no per-layer Python bookkeeping on the hot path).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SeqSlice:
    """One sequence's part of a flattened batch: n new tokens at positions start..start+n-1."""
    kv: object      # the sequence's handle in the cache: a row (contiguous) or a BlockTable (paged)
    start: int      # tokens already cached
    n: int          # new tokens this step
    q_offset: int   # index of its first token in the flattened batch


@dataclass
class AttentionContext:
    seqs: list[SeqSlice]
    decode_only: bool
    # decode-only fast path: one token per sequence
    rows: torch.Tensor | None = None
    write_pos: torch.Tensor | None = None
    row_range: tuple[int, int] | None = None  # rows form one contiguous range: attend over a view
    kv_len: int = 0
    mask: torch.Tensor | None = None          # [B, 1, 1, kv_len] bool, None when all are full


class KVCache:
    """Interface of a KV cache: the scheduler manages sequences' room through admit / reserve /
    commit / release; the runner builds one context per step with prepare; attention layers call
    attend. ContiguousKVCache and the paged cache (kv/paged.py) implement it."""

    def admit(self, token_ids: list[int], max_len: int) -> tuple[object, int]:
        """A handle for a new (or preempted, resumed) sequence, and how many of its leading tokens
        are already cached (prefix caching); raises nothing, reserves nothing beyond them."""
        raise NotImplementedError

    def reserve(self, handle, num_tokens: int) -> bool:
        """Make room for the first num_tokens tokens of the sequence; False (nothing taken) when
        the cache is full."""
        raise NotImplementedError

    def commit(self, handle, token_ids: list[int], num_computed: int) -> None:
        """The first num_computed tokens now have their K/V stored (lets a paged cache share them)."""

    def release(self, handle) -> None:
        raise NotImplementedError

    def usage(self) -> tuple[int, int, int]:
        """(blocks in use, blocks free, tokens per block); a cache without blocks reports zeros."""
        return 0, 0, 0

    def prefix_stats(self) -> tuple[int, int]:
        """(prompt tokens looked up, tokens found) in the prefix cache, cumulative."""
        return 0, 0

    def prepare(self, seqs: list[SeqSlice]) -> AttentionContext: ...
    def attend(self, layer: int, q, k, v, ctx: AttentionContext) -> torch.Tensor: ...
    def bytes_per_token(self) -> int: ...

    def held_tokens(self, length: int) -> int:
        """Token slots a sequence of `length` tokens holds (fewer with eviction: kv stream)."""
        return length

    def static_decode_view(self, ctx: AttentionContext):
        """A fixed-shape view for compiled decode steps; None: run this step eagerly."""
        return None


class ContiguousKVCache(KVCache):
    """One contiguous [rows, kv_heads, max_len, head_dim] buffer per layer for K and for V.

    Decoding attends over views of the buffer (no gather copy at batch 1); rows and length grow
    on demand by reallocating. Simple and fast for a handful of sequences; the paged cache of
    the batching engine replaces it when memory must be shared finely."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, sliding_window: int | None = None):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.window = dtype, torch.device(device), sliding_window
        self.reset()

    def reset(self) -> None:
        self.rows, self.max_len = 0, 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.free_rows: list[int] = []
        self.row_len: dict[int, int] = {}
        self._static_views: dict[tuple[int, int], StaticDecodeView] = {}

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _grow(self, rows: int, max_len: int) -> None:
        shape = (rows, self.num_kv_heads, max_len, self.head_dim)

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            new = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if old is not None:
                new[: old.shape[0], :, : old.shape[2]] = old
            return new

        had = len(self.k) == self.num_layers
        self.k = [grown(self.k[i] if had else None) for i in range(self.num_layers)]
        self.v = [grown(self.v[i] if had else None) for i in range(self.num_layers)]
        self._static_views.clear()  # they viewed the old buffers
        self.free_rows.extend(range(self.rows, rows))
        self.free_rows.sort(reverse=True)  # pop() hands out the lowest row: keeps rows contiguous
        self.rows, self.max_len = rows, max_len

    def admit(self, token_ids: list[int], max_len: int) -> tuple[int, int]:
        return self.allocate(max_len), 0

    def reserve(self, handle: int, num_tokens: int) -> bool:
        return True  # the row was sized for max_len at admission

    def release(self, handle: int) -> None:
        self.free(handle)

    def allocate(self, max_len: int) -> int:
        if not self.free_rows or max_len > self.max_len:
            extra = 0 if self.free_rows else max(1, self.rows)  # double the rows when full
            # lengths grow in steps of 256 tokens: fewer regrowths (and recompiles when compiled)
            self._grow(self.rows + extra, max(-(-max_len // 256) * 256, self.max_len))
        row = self.free_rows.pop()
        self.row_len[row] = max_len
        return row

    def free(self, row: int) -> None:
        del self.row_len[row]
        self.free_rows.append(row)
        self.free_rows.sort(reverse=True)

    def prepare(self, seqs: list[SeqSlice]) -> AttentionContext:
        decode_only = all(s.n == 1 for s in seqs)
        ctx = AttentionContext(seqs=seqs, decode_only=decode_only)
        if not decode_only:
            return ctx
        rows = [s.kv for s in seqs]
        lens = [s.start + 1 for s in seqs]
        ctx.rows = torch.tensor(rows, device=self.device)
        ctx.write_pos = torch.tensor([s.start for s in seqs], device=self.device)
        ctx.kv_len = max(lens)
        if rows == list(range(rows[0], rows[0] + len(rows))):
            ctx.row_range = (rows[0], rows[0] + len(rows))
        ctx.mask = decode_mask(lens, self.window, self.device)
        return ctx

    def attend(self, layer: int, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the flattened batch -> [T, Hq, D]."""
        kc, vc = self.k[layer], self.v[layer]
        if ctx.decode_only:
            kc[ctx.rows, :, ctx.write_pos] = k
            vc[ctx.rows, :, ctx.write_pos] = v
            if ctx.row_range is not None:
                r0, r1 = ctx.row_range
                keys, values = kc[r0:r1, :, : ctx.kv_len], vc[r0:r1, :, : ctx.kv_len]
            else:
                keys, values = kc[ctx.rows, :, : ctx.kv_len], vc[ctx.rows, :, : ctx.kv_len]
            return decode_attention(q, keys, values, ctx.mask)
        out = torch.empty_like(q)
        group = q.shape[1] // self.num_kv_heads
        for s in ctx.seqs:
            end = s.start + s.n
            sl = slice(s.q_offset, s.q_offset + s.n)
            kc[s.kv, :, s.start:end] = k[sl].transpose(0, 1)
            vc[s.kv, :, s.start:end] = v[sl].transpose(0, 1)
            mask = prefill_mask(s.start, s.n, self.window, self.device)
            # 4-D inputs with KV heads repeated: SDPA's fused CPU kernel (the 3-D / enable_gqa
            # call falls back to the unfused math path, ~4x slower at 512 tokens).
            keys = kc[s.kv, :, :end].repeat_interleave(group, dim=0).unsqueeze(0)
            values = vc[s.kv, :, :end].repeat_interleave(group, dim=0).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1).unsqueeze(0), keys, values,
                attn_mask=mask, is_causal=mask is None and s.n > 1)
            out[sl] = o[0].transpose(0, 1)
        return out

    def static_decode_view(self, ctx: AttentionContext) -> "StaticDecodeView | None":
        """The fixed-shape view for a compiled decode step, or None when this step cannot use
        one (prefill in the batch, rows not contiguous, or a sliding window to apply)."""
        if not ctx.decode_only or ctx.row_range is None or self.window is not None:
            return None
        view = self._static_views.get(ctx.row_range)
        if view is None:  # views stay valid until the buffers are reallocated
            view = self._static_views[ctx.row_range] = StaticDecodeView(self, *ctx.row_range)
        return view



def decode_mask(lens: list[int], window: int | None, device) -> torch.Tensor | None:
    """[B, 1, 1, max(lens)] bool mask of the cached positions each decoding row may see; None when
    every row sees all max(lens) positions."""
    kv_len = max(lens)
    windowed = window is not None and kv_len > window
    if min(lens) == kv_len and not windowed:
        return None
    j = torch.arange(kv_len, device=device)
    last = torch.tensor(lens, device=device).unsqueeze(1) - 1
    keep = j <= last
    if windowed:
        keep &= j > last - window
    return keep[:, None, None, :]


def prefill_mask(start: int, n: int, window: int | None, device) -> torch.Tensor | None:
    """[n, start + n] bool mask for n new tokens after `start` cached ones; None for plain causal
    attention from position 0 (SDPA then uses its causal kernel)."""
    end = start + n
    if start == 0 and (window is None or end <= window):
        return None
    i = torch.arange(start, end, device=device).unsqueeze(1)
    j = torch.arange(end, device=device)
    keep = j <= i
    if window is not None:
        keep &= j > i - window
    return keep


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D], keys/values [B, Hkv, L, D] -> [B, Hq, D].

    The query heads sharing a KV head become that head's `group` query rows (HF's repeat_kv
    order), so GQA is a plain attention with no KV repeat; a [B, 1, 1, L] mask broadcasts."""
    B, Hq, D = q.shape
    Hkv = keys.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, Hq // Hkv, D), keys, values, attn_mask=mask)
    return out.reshape(B, Hq, D)


class StaticDecodeView:
    """A decode step of the rows r0..r1 of a ContiguousKVCache, seen as fixed-shape tensors.

    Built for torch.compile: attention spans each row's whole allocated length under a mask
    computed in the graph from `positions`, so nothing that changes per step (lengths, offsets)
    becomes a Python value the compiled graph would be specialised on. The extra masked
    positions cost little at decode (one query per row); the graph is reused every step."""

    def __init__(self, cache: ContiguousKVCache, r0: int, r1: int):
        self.k = [t[r0:r1] for t in cache.k]
        self.v = [t[r0:r1] for t in cache.v]

    def attend(self, layer: int, q, k, v, positions: torch.Tensor) -> torch.Tensor:
        kc, vc = self.k[layer], self.v[layer]
        B, H, L, D = kc.shape
        # Each row's new K/V lands at flat row (b * H + h) * L + position of the [B*H*L, D] view:
        # an index_put_ inductor performs in place. (A scatter_ along the length was functionalized
        # into a copy of the whole cache buffer, every layer and step: ~3 ms of a 34 ms float32
        # token at 768 cached positions.)
        rows = (torch.arange(B * H, device=kc.device).view(B, H) * L + positions.view(B, 1)).view(-1)
        kc.view(B * H * L, D).index_put_((rows,), k.reshape(B * H, D))
        vc.view(B * H * L, D).index_put_((rows,), v.reshape(B * H, D))
        mask = torch.arange(L, device=kc.device).view(1, 1, 1, L) <= positions.view(B, 1, 1, 1)
        return decode_attention(q, kc, vc, mask)
