"""The paged KV cache: a pool of fixed-size blocks shared by all sequences (vLLM's PagedAttention
layout), with prefix caching. Block bookkeeping lives in kv/blocks.py, the bytes in a KVCodec.

Per step, `prepare` turns every sequence's block table into a slot mapping (where each new
token's K/V goes) and, for decodes, a padded block-table tensor; per layer, `attend` writes the
new K/V through the codec and attends over the sequence's blocks. A sequence whose blocks are
physically adjacent (a lone stream in a fresh pool) is read as a view, with no gather copy.

With eviction (`--kv stream:WINDOW[:sinkS]+CODEC`, StreamingLLM's attention sinks plus a recent
window, at block granularity) a query in block i sees blocks 0..S/bs-1 and i-WINDOW/bs..i, and
`prepare` frees each sequence's older blocks (EVICTED in its table): every block keeps its place,
so positions (pre-RoPE keys, masks) are unchanged and a kernel only skips the EVICTED entries.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from leanlm.kv.blocks import EVICTED, BlockManager, BlockTable
from leanlm.kv.cache import KVCache, SeqSlice, decode_attention, decode_mask, prefill_mask
from leanlm.kv.codecs import KVCodec
from leanlm.native import kivi as native_kivi


@dataclass
class _Prefill:
    start: int
    n: int
    q_offset: int
    first_slot: int | None             # blocks adjacent: read slots first_slot.. as a view
    blocks: torch.Tensor | None        # else: the blocks to gather, [1, nblk]
    mask: torch.Tensor | None
    # a short chunk on an exact codec with fused decode attention, in a step that also has a
    # long chunk (else ctx.row_tables covers it): each row attends like a decode step (block ids
    # [n, nblk], contexts [n]), so verifying k drafts computes exactly what k + 1 decode steps would
    fused_tables: torch.Tensor | None = None
    fused_lens: torch.Tensor | None = None


FUSED_ROWS_MAX = 33  # chunks up to this many rows (a verification of 32 drafts) attend row by row


@dataclass
class _DecodeGroup:
    """Decoding sequences of similar length, attended together over their padded block tables."""
    rows: slice | torch.Tensor                    # their tokens in the flattened batch
    kv_len: int                                   # longest context in the group
    first_slot: int | None                        # one sequence with adjacent blocks: read a view
    block_tables: torch.Tensor | None             # else [B, nblk], padded (and EVICTED read) as block 0
    mask: torch.Tensor | None                     # [B, 1, 1, kv_len]
    # for a codec's fused decode attention, built once per step: block ids [B, nblk] (also for an
    # adjacent run) and each sequence's context [B], its new token included
    fused_tables: torch.Tensor | None = None
    fused_lens: torch.Tensor | None = None


@dataclass
class PagedContext:
    seqs: list[SeqSlice]
    decode_only: bool
    slot_mapping: torch.Tensor                    # [T] slot of every new token
    decodes: list[_DecodeGroup] = field(default_factory=list)
    prefills: list[_Prefill] = field(default_factory=list)
    # when every row attends row by row (fused_rows, chunks of <= FUSED_ROWS_MAX): each row's
    # block ids [T, nblk] and context [T], for one attention call per layer (attend) or the
    # native whole-layer path (native/layers.py)
    row_tables: torch.Tensor | None = None
    row_lens: torch.Tensor | None = None


def _length_groups(seqs: list[SeqSlice]) -> list[list[SeqSlice]]:
    """Split decoding sequences into groups whose lengths are within 2x of the group's longest:
    a group is padded to its longest context, so one 900-token sequence does not make 63 short
    ones gather 900 tokens each; each extra group costs one more attention call per layer."""
    groups: list[list[SeqSlice]] = []
    for s in sorted(seqs, key=lambda s: -s.start):
        if groups and 2 * (s.start + 1) > groups[-1][0].start + 1:
            groups[-1].append(s)
        else:
            groups.append([s])
    for g in groups:  # batch order inside a group: rows stay a slice when they were one
        g.sort(key=lambda s: s.q_offset)
    return groups


def _adjacent_start(blocks: list[int], nblk: int, block_size: int) -> int | None:
    """First slot of blocks[:nblk] when those blocks are consecutive ids, else None."""
    b0 = blocks[0]
    if b0 >= 0 and blocks[nblk - 1] - b0 == nblk - 1 and blocks[:nblk] == list(range(b0, b0 + nblk)):
        return b0 * block_size
    return None


class PagedKVCache(KVCache):
    def __init__(self, codec: KVCodec, num_blocks: int, block_size: int, device: torch.device,
                 num_kv_heads: int, sliding_window: int | None = None,
                 enable_prefix_caching: bool = True, salt: str = "", stream: tuple[int, int] | None = None):
        self.codec, self.block_size, self.device = codec, block_size, torch.device(device)
        # eviction: (window, sink) in tokens -> in blocks; None keeps every token
        self.stream = None
        if stream is not None:
            window, sink = stream
            for name, n in (("WINDOW", window), ("sink", sink)):
                if n < 0 or n % block_size or name == "WINDOW" and n == 0:
                    raise ValueError(f"kv spec stream: {name} {n} must be a positive multiple of the block size "
                                     f"{block_size} (blocks are evicted whole){' or 0' if name == 'sink' else ''}")
            self.stream = (window // block_size, sink // block_size)
        self.num_kv_heads, self.window = num_kv_heads, sliding_window
        # the codec's spec is part of every prefix hash: blocks stored differently never match
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching, salt=f"{salt}|{codec.spec}")
        self.blockwise = codec.blockwise  # quantizes whole blocks as they fill
        self.rope_keys, self.wants_layer_input = codec.rope_keys, codec.wants_layer_input
        self.layer_input = None  # set by the model before each attend when wants_layer_input
        # the codec's own decode attention (a sliding window's mask is not passed to it)
        self.fused_decode = codec.fused_decode and sliding_window is None
        # ... also for the rows of short chunks (speculative verification), where the codec
        # stores exactly what was written, so a row equals the decode step it stands for
        self.fused_rows = self.fused_decode and codec.exact

    # -- room for sequences (called by the scheduler) -------------------------------------------
    def admit(self, token_ids: list[int], max_len: int) -> tuple[BlockTable, int]:
        if len(token_ids) < 2:  # nothing to look up (the last token is always computed)
            return self.blocks.new_table(), 0
        return self.blocks.match_prefix(token_ids)

    def reserve(self, handle: BlockTable, num_tokens: int) -> bool:
        return self.blocks.grow(handle, num_tokens)

    def commit(self, handle: BlockTable, token_ids: list[int], num_computed: int) -> None:
        self.blocks.commit(handle, token_ids, num_computed)

    def release(self, handle: BlockTable) -> None:
        self.codec.release(handle.blocks)
        self.blocks.free(handle)

    def rollback(self, handle: BlockTable, num_tokens: int) -> None:
        """Speculative decoding rejected drafts: keep room for num_tokens tokens only. The slots of
        rejected tokens left in the kept last block hold stale K/V that attention masks out and
        the next tokens overwrite; they are never hashed (commit covers computed tokens only)."""
        dropped = self.blocks.truncate(handle, num_tokens)
        if dropped:
            self.codec.release(dropped)

    def draft_room(self, first_draft_pos: int) -> int:
        """How many draft tokens may be written from position first_draft_pos on. A codec that
        quantizes a block when its last slot is written (KIVI) cannot take back a block filled by
        drafts that are then rejected, so drafts stop short of a block's last slot there."""
        if not self.blockwise:
            return 1 << 30
        off = first_draft_pos % self.block_size
        return 0 if off == 0 else self.block_size - 1 - off

    @property
    def split_steps(self) -> bool:
        """Whether one step may write different layers of a token in separate passes (early-exit
        verification resuming from the draft's hidden states); not with per-step block plans."""
        return not self.blockwise and not self.codec.cross_layer

    def usage(self) -> tuple[int, int, int]:
        return self.blocks.num_used, self.blocks.num_free, self.block_size

    def prefix_stats(self) -> tuple[int, int]:
        return self.blocks.prefix_cache_queries, self.blocks.prefix_cache_hits

    def bytes_per_token(self) -> int:
        return self.codec.bytes_per_token()

    # -- one step ----------------------------------------------------------------------------------
    def held_tokens(self, length: int) -> int:
        """Token slots a sequence of `length` tokens holds (all of them without eviction)."""
        if self.stream is None:
            return length
        window, sink = self.stream
        return min(length, (window + sink + 1) * self.block_size)

    def _seen_from(self, pos: int) -> int:
        """First block after the sinks that a query at position pos still sees (stream only)."""
        return pos // self.block_size - self.stream[0]

    def _row_view(self, blocks: list[int], pos: int) -> list[int]:
        """A query's view of its table: with eviction, the blocks it must not see are EVICTED too
        (a later row of a chunk sees less than the chunk's first, for which prepare evicted)."""
        if self.stream is None:
            return blocks
        sink, first = self.stream[1], self._seen_from(pos)
        if first <= sink:
            return blocks
        return blocks[:sink] + [EVICTED] * (min(first, len(blocks)) - sink) + blocks[first:]

    def _stream_mask(self, positions: list[int] | range, kv_len: int) -> torch.Tensor | None:
        """[R, kv_len] bool: which cached tokens each query (at `positions`) may see, causal and
        sink + window; None when nothing is hidden beyond causality (checked before any tensor)."""
        if self.stream is None:
            return None
        window, sink = self.stream
        if max(positions) // self.block_size - window <= sink:
            return None
        pos = torch.tensor(positions, device=self.device)
        j = torch.arange(kv_len, device=self.device)
        jb, qb = j // self.block_size, pos.unsqueeze(1) // self.block_size
        return (j <= pos.unsqueeze(1)) & ((jb < sink) | (jb >= qb - window))

    def prepare(self, seqs: list[SeqSlice]) -> PagedContext:
        bs = self.block_size
        if self.stream is not None:  # free what no query of this step (nor any later) will see
            for s in seqs:
                dropped = self.blocks.evict(s.kv, self.stream[1], self._seen_from(s.start))
                if dropped:
                    self.codec.release(dropped)
        slots: list[int] = []
        for s in seqs:
            blocks = s.kv.blocks
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(s.start, s.start + s.n))
        ctx = PagedContext(seqs, all(s.n == 1 for s in seqs),
                           torch.tensor(slots, dtype=torch.long, device=self.device))
        # every row attends row by row: one attention call per layer over all rows (row_tables);
        # for a lossy codec only when every row is a decode (a chunk must see its own tokens as
        # stored, which the fused path gives only for exact codecs)
        row_wise = (self.fused_rows and all(s.n <= FUSED_ROWS_MAX for s in seqs)
                    or self.fused_decode and ctx.decode_only)
        if row_wise:
            self._row_tables(ctx)
        decodes = [s for s in seqs if s.n == 1]
        for group in _length_groups(decodes):
            ctx.decodes.append(self._decode_group(group, fused=self.fused_decode and not row_wise))
        for s in seqs:
            if s.n == 1:
                continue
            end = s.start + s.n
            nblk = -(-end // bs)
            first = blocks = None
            # earlier tokens come from the cache; with a lossy codec so do the chunk's own, so a
            # chunk sees exactly what later tokens will see (chunk 1 == token-by-token decoding)
            if s.start > 0 or not self.codec.exact:
                first = _adjacent_start(s.kv.blocks, nblk, bs)
                if first is None:  # (EVICTED entries read block 0, which the mask hides)
                    blocks = torch.tensor([[max(b, 0) for b in s.kv.blocks[:nblk]]], dtype=torch.long,
                                          device=self.device)
            mask = prefill_mask(s.start, s.n, self.window, self.device)
            seen = self._stream_mask(range(s.start, end), end)
            if seen is not None:
                mask = seen if mask is None else mask & seen
            p = _Prefill(s.start, s.n, s.q_offset, first, blocks, mask)
            if self.fused_rows and not row_wise and s.n <= FUSED_ROWS_MAX:  # beside a long chunk
                rows = ([s.kv.blocks[:nblk]] * s.n if self.stream is None else
                        [self._row_view(s.kv.blocks[:nblk], pos) for pos in range(s.start, end)])
                p.fused_tables = torch.tensor(rows, dtype=torch.long, device=self.device)
                p.fused_lens = torch.arange(s.start + 1, end + 1, device=self.device)
            ctx.prefills.append(p)
        self.codec.plan_step(seqs, ctx.slot_mapping)
        return ctx

    def _row_tables(self, ctx: PagedContext) -> None:
        """Each row's block ids (padded with block 0) and context, its own token included."""
        bs = self.block_size
        nblk = max(-(-(s.start + s.n) // bs) for s in ctx.seqs)
        tables: list[list[int]] = []
        lens: list[int] = []
        for s in ctx.seqs:
            row = s.kv.blocks[:nblk]
            row = row + [0] * (nblk - len(row))
            if self.stream is None:
                tables.extend([row] * s.n)
            else:
                tables.extend(self._row_view(row, pos) for pos in range(s.start, s.start + s.n))
            lens.extend(range(s.start + 1, s.start + s.n + 1))
        ctx.row_tables = torch.tensor(tables, dtype=torch.long, device=self.device)
        ctx.row_lens = torch.tensor(lens, dtype=torch.long, device=self.device)

    def _decode_group(self, group: list[SeqSlice], fused: bool) -> _DecodeGroup:
        bs = self.block_size
        lens = [s.start + 1 for s in group]
        kv_len = max(lens)
        nblk = -(-kv_len // bs)
        offsets = [s.q_offset for s in group]
        if offsets == list(range(offsets[0], offsets[0] + len(offsets))):
            rows = slice(offsets[0], offsets[0] + len(offsets))
        else:
            rows = torch.tensor(offsets, dtype=torch.long, device=self.device)
        first = _adjacent_start(group[0].kv.blocks, nblk, bs) if len(group) == 1 else None
        tables = gather = None
        if first is None:
            padded = [s.kv.blocks[:nblk] + [0] * (nblk - min(nblk, len(s.kv.blocks))) for s in group]
            tables = torch.tensor(padded, dtype=torch.long, device=self.device)
            # the fused kernels skip EVICTED entries; the torch path reads block 0 there, masked
            gather = tables if self.stream is None else tables.clamp(min=0)
        mask = decode_mask(lens, self.window, self.device)
        seen = self._stream_mask([n - 1 for n in lens], kv_len)
        if seen is not None:  # [B, kv_len] -> [B, 1, 1, kv_len], as decode_mask's
            mask = seen[:, None, None, :] if mask is None else mask & seen[:, None, None, :]
        dg = _DecodeGroup(rows, kv_len, first, gather, mask)
        if fused:
            dg.fused_lens = torch.tensor(lens, dtype=torch.long, device=self.device)
            dg.fused_tables = tables if tables is not None else torch.arange(
                first // bs, first // bs + nblk, device=self.device).unsqueeze(0)
        return dg

    def attend(self, layer: int, q, k, v, ctx: PagedContext) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the flattened batch -> [T, Hq, D]."""
        rot = self.codec.rotation
        if rot is not None:  # (qR)(kR)^T = qk^T; attention over vR gives out R, undone below (R^T = R^-1)
            v = _rotate(v, rot)
            if self.codec.rotate_qk:  # not pre-RoPE keys: R does not commute with RoPE
                q, k = _rotate(q, rot), _rotate(k, rot)
        if self.wants_layer_input:
            self.codec.write(layer, ctx.slot_mapping, k, v, self.layer_input)
        else:
            self.codec.write(layer, ctx.slot_mapping, k, v)
        if ctx.row_tables is not None:  # every row in one call (None: compiling, take the paths below)
            o = self.codec.decode_attention(layer, q, ctx.row_tables, ctx.row_lens)
            if o is not None:
                return o if rot is None else _rotate(o, rot.T)
        out = torch.empty_like(q)
        for d in ctx.decodes:
            if d.fused_tables is not None:  # attention computed on the stored codes, no dequantized copy
                o = self.codec.decode_attention(layer, q[d.rows], d.fused_tables, d.fused_lens)
                if o is not None:
                    out[d.rows] = o
                    continue
            if d.first_slot is not None:
                keys, values = self.codec.read_slots(layer, d.first_slot, d.kv_len)
                keys, values = keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0)
            else:
                keys, values = self.codec.read_blocks(layer, d.block_tables)
                keys = keys[:, :d.kv_len].transpose(1, 2)
                values = values[:, :d.kv_len].transpose(1, 2)
            out[d.rows] = decode_attention(q[d.rows], keys, values, d.mask)
        group = q.shape[1] // self.num_kv_heads
        for p in ctx.prefills:
            sl = slice(p.q_offset, p.q_offset + p.n)
            end = p.start + p.n
            if p.fused_tables is not None:
                o = self.codec.decode_attention(layer, q[sl], p.fused_tables, p.fused_lens)
                if o is not None:
                    out[sl] = o
                    continue
            if p.first_slot is not None:
                keys, values = self.codec.read_slots(layer, p.first_slot, end)
            elif p.blocks is not None:
                keys, values = self.codec.read_blocks(layer, p.blocks)
                keys, values = keys[0, :end], values[0, :end]
            else:  # nothing cached before this chunk: attend over its own k/v
                keys, values = k[sl], v[sl]
            # 4-D inputs with KV heads repeated: SDPA's fused CPU kernel (the 3-D / enable_gqa
            # call falls back to the unfused math path, ~4x slower at 512 tokens)
            keys = keys.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0)
            values = values.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1).unsqueeze(0), keys, values,
                attn_mask=p.mask, is_causal=p.mask is None and p.n > 1)
            out[sl] = o[0].transpose(0, 1)
        return out if rot is None else _rotate(out, rot.T)


def _rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ rot, on the C function the native whole-layer executor uses when x is float32
    on the CPU (so a token's stored K/V do not depend on which path its step took), else torch."""
    return native_kivi.rotate(x, rot) if native_kivi.native_f32(x) else x @ rot


DEFAULT_BUDGET_BYTES = 4 * 2**30   # vLLM's CPU default (VLLM_CPU_KVCACHE_SPACE=4)
DEFAULT_BUDGET_FRACTION = 0.4      # ... unless that is more than 40% of the free memory


def available_memory(device: torch.device) -> int:
    """Bytes free on the device now: MemAvailable on a CPU host, the CUDA free memory on a GPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_budget_bytes(budget: int | float | None, device: torch.device) -> int:
    """The KV cache budget from EngineConfig.kv_cache_bytes: bytes, a fraction of free memory,
    or None for the default."""
    if budget is None:
        return min(DEFAULT_BUDGET_BYTES, int(DEFAULT_BUDGET_FRACTION * available_memory(device)))
    if isinstance(budget, float):
        return int(budget * available_memory(device))
    return budget
