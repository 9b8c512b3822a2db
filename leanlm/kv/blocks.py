"""Block pool for a paged KV cache, with ref counts and prefix caching (vLLM v1 style).

Pure Python (no torch): the engine keeps the tensors, this file only decides which physical
block holds which tokens. A block is in exactly one of three states:

- in use: ref_count > 0 (shared blocks have ref_count > 1; only full, hashed blocks are shared);
- evictable: ref_count == 0 but still registered in the prefix cache, kept in LRU order so a
  later request with the same prefix can take it back without recomputing;
- free: ref_count == 0 and not registered (never used, or its contents are worthless).

A full block's identity is a chain hash: blake2b(previous block's hash + its token ids), so a
block only matches when the whole prefix before it matches too. The first block chains from a
root derived from `salt` (model + KV codec spec), so caches of different codecs never mix.
"""
from __future__ import annotations

import hashlib
import heapq
import operator
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

_DIGEST = 16  # bytes; 128-bit blake2b makes an accidental collision practically impossible


def _root_hash(salt: str) -> bytes:
    return hashlib.blake2b(b"leanlm-kv-root\0" + salt.encode("utf-8"), digest_size=_DIGEST).digest()


def _chain_hash(prev: bytes, token_ids) -> bytes:
    # Fixed-size prev + int64 little-endian ids: unambiguous and platform independent.
    # (Never Python's hash(): a collision would silently serve another prompt's KV.)
    packed = struct.pack(f"<{len(token_ids)}q", *token_ids)
    return hashlib.blake2b(prev + packed, digest_size=_DIGEST).digest()


def _positive_int(name: str, value) -> int:
    try:
        value = operator.index(value)  # accepts numpy ints, rejects floats
    except TypeError:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


EVICTED = -1  # a table entry whose block was freed by eviction (kv spec stream:...): attention skips it


@dataclass
class BlockTable:
    """One sequence's KV blocks."""
    blocks: list[int] = field(default_factory=list)   # physical block ids, in order (EVICTED: freed)
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of the leading full blocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 salt: str = ""):
        num_blocks = _positive_int("num_blocks", num_blocks)
        block_size = _positive_int("block_size", block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.salt = salt
        self._root = _root_hash(salt)
        self._ref = [0] * num_blocks
        # Hash under which a block is registered in the prefix cache (None: not registered).
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}           # hash -> block id
        self._free = list(range(num_blocks))          # min-heap: lowest id first (already sorted)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, cached; oldest first
        self._num_used = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- accounting -------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks allocatable now: never used + freed + evictable cached."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self._num_used

    @property
    def hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def ref_count(self, block: int) -> int:
        """Current references to a physical block (for tests and debugging)."""
        return self._ref[block]

    # ---- tables -----------------------------------------------------------------------------

    def new_table(self) -> BlockTable:
        return BlockTable()

    def match_prefix(self, token_ids: list[int]) -> tuple[BlockTable, int]:
        """Longest chain of cached full blocks covering a prefix of token_ids[:-1].

        The last token is never matched: the engine must run it to get its logits. Takes a
        reference on each matched block. Returns (table, number of tokens covered).
        """
        table = BlockTable()
        if not self.enable_prefix_caching:
            return table, 0
        bs = self.block_size
        prev = self._root
        for i in range(max(0, len(token_ids) - 1) // bs):
            h = _chain_hash(prev, token_ids[i * bs:(i + 1) * bs])
            block = self._cached.get(h)
            if block is None:
                break
            self._take(block)
            table.blocks.append(block)
            table.hashes.append(h)
            prev = h
        covered = len(table.blocks) * bs
        self.prefix_cache_queries += len(token_ids)
        self.prefix_cache_hits += covered
        return table, covered

    def blocks_needed(self, table: BlockTable, num_tokens: int) -> int:
        """Extra blocks `table` needs to hold num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table.blocks))

    def grow(self, table: BlockTable, num_tokens: int) -> bool:
        """Append blocks so the table holds num_tokens. All or nothing: False if short."""
        needed = self.blocks_needed(table, num_tokens)
        if needed > self.num_free:
            return False
        for _ in range(needed):
            if self._free:
                block = heapq.heappop(self._free)
            else:  # evict the least recently freed cached block; its contents become garbage
                block, _ = self._evictable.popitem(last=False)
                del self._cached[self._block_hash[block]]
                self._block_hash[block] = None
            self._take(block)
            table.blocks.append(block)
        return True

    def commit(self, table: BlockTable, token_ids: list[int], num_computed: int) -> None:
        """Register in the prefix cache every block now full of computed tokens (not yet hashed)."""
        if not self.enable_prefix_caching:
            return
        if not 0 <= num_computed <= len(token_ids):
            raise ValueError(f"num_computed must be in [0, {len(token_ids)}], got {num_computed}")
        bs = self.block_size
        num_full = num_computed // bs
        if num_full > len(table.blocks):
            raise RuntimeError(f"commit: {num_computed} computed tokens need {num_full} blocks, "
                               f"but the table has only {len(table.blocks)}")
        prev = table.hashes[-1] if table.hashes else self._root
        for i in range(len(table.hashes), num_full):
            h = _chain_hash(prev, token_ids[i * bs:(i + 1) * bs])
            block = table.blocks[i]
            if h not in self._cached and block != EVICTED:
                self._cached[h] = block
                self._block_hash[block] = h
            # else: another sequence computed the same block concurrently; keep the existing
            # mapping, ours stays unshared. The hash is still recorded so later blocks chain.
            table.hashes.append(h)
            prev = h

    def free(self, table: BlockTable) -> None:
        """Drop the table's references. Tail first, so tails are evicted before shareable heads."""
        for block in reversed(table.blocks):
            if block != EVICTED:
                self._drop(block)
        table.blocks.clear()
        table.hashes.clear()

    def evict(self, table: BlockTable, first: int, end: int) -> list[int]:
        """Free the table's blocks first..end-1 (tokens no query will see again), leaving EVICTED
        in their places so the others keep their positions. Hashed blocks stay in the prefix
        cache (evictable), so a later request with the same prefix can still take them back.
        Returns the block ids freed by this table."""
        dropped = []
        for i in range(first, min(end, len(table.blocks))):
            block = table.blocks[i]
            if block != EVICTED:
                self._drop(block)
                table.blocks[i] = EVICTED
                dropped.append(block)
        return dropped

    def truncate(self, table: BlockTable, num_tokens: int) -> list[int]:
        """Speculative rollback: keep only the blocks the first num_tokens tokens need, dropping
        the tail that held rejected draft tokens. Committed (hashed) blocks are never dropped:
        drafts are written after the committed tokens. Returns the dropped block ids."""
        keep = -(-num_tokens // self.block_size)
        if num_tokens < len(table.hashes) * self.block_size:
            raise ValueError(f"truncate to {num_tokens} tokens would drop committed blocks "
                             f"({len(table.hashes)} are hashed)")
        dropped = table.blocks[keep:]
        for block in reversed(dropped):
            self._ref[block] -= 1
            if self._ref[block] == 0:  # unhashed (never shared): straight back to the free heap
                self._num_used -= 1
                heapq.heappush(self._free, block)
        del table.blocks[keep:]
        return dropped

    def fork(self, table: BlockTable) -> BlockTable:
        """A new table sharing the full hashed blocks of `table` (e.g. for n > 1 samples)."""
        n = len(table.hashes)
        for block in table.blocks[:n]:
            if block != EVICTED:
                self._take(block)
        return BlockTable(blocks=table.blocks[:n], hashes=table.hashes[:n])

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block. Only while nothing is in use (False, and no-op, otherwise)."""
        if self._num_used > 0:
            return False
        for block in self._evictable:
            self._block_hash[block] = None
            heapq.heappush(self._free, block)
        self._evictable.clear()
        self._cached.clear()
        return True

    # ---- internals --------------------------------------------------------------------------

    def _drop(self, block: int) -> None:
        """Remove a reference; at ref 0 a hashed block becomes evictable, others free."""
        if self._ref[block] <= 0:
            raise RuntimeError(f"freeing block {block} whose ref_count is {self._ref[block]} "
                               "(table freed twice without clearing, or shared without a ref)")
        self._ref[block] -= 1
        if self._ref[block] == 0:
            self._num_used -= 1
            if self._block_hash[block] is not None:
                self._evictable[block] = None  # most recently freed last
            else:
                heapq.heappush(self._free, block)

    def _take(self, block: int) -> None:
        """Add a reference; a block leaving ref 0 leaves the evictable LRU."""
        if self._ref[block] == 0:
            self._evictable.pop(block, None)
            self._num_used += 1
        self._ref[block] += 1
