"""Iteration-level scheduling: every step, running sequences continue (one decode token, or the
next chunk of a long prompt) and waiting ones join while the token budget and seat limit allow.
Finished sequences leave at once and free their cache slot."""
from __future__ import annotations

from collections import deque

from leanlm.engine.outputs import EngineStats
from leanlm.engine.sequence import Sequence, SequenceStatus
from leanlm.kv.cache import KVCache


class Scheduler:
    def __init__(self, cache: KVCache, max_num_seqs: int, max_num_batched_tokens: int):
        self.cache = cache
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """-> [(sequence, number of its tokens to compute this step)]."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in self.running:  # decodes and unfinished prompt chunks first
            n = min(len(seq.token_ids) - seq.num_cached, budget)
            if n > 0:
                batch.append((seq, n))
                budget -= n
            if budget == 0:
                return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            seq.row = self.cache.allocate(seq.max_len)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(len(seq.token_ids) - seq.num_cached, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), num_waiting=len(self.waiting),
                           kv_blocks_used=0, kv_blocks_free=0, kv_block_size=0,
                           prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0)

    def finish(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.cache.free(seq.row)
            seq.row = None
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
