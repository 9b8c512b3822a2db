"""Iteration-level scheduling (Orca / vLLM): every step, running sequences continue (one decode
token, or the next chunk of a long prompt) and waiting ones join while the token budget, the seat
limit and the free KV blocks allow. Finished sequences leave at once and free their blocks.

When a running sequence needs a block and none is free, the most recently admitted sequence is
preempted by recomputation: its blocks are released and it goes back to the head of the queue
with all its tokens (prompt + output so far) as its new prompt. Its sampling state is kept, so it
resumes with the same output; prefix caching usually makes the recomputation cheap.
"""
from __future__ import annotations

from collections import deque

from leanlm.engine.outputs import EngineStats
from leanlm.engine.sequence import Sequence, SequenceStatus
from leanlm.kv.cache import KVCache


class Scheduler:
    def __init__(self, cache: KVCache, max_num_seqs: int, max_num_batched_tokens: int,
                 share_prompts: bool = True):
        self.cache = cache
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        # n > 1 samples of a prompt wait for the first one's prompt to be cached, then share it
        self.share_prompts = share_prompts
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """-> [(sequence, number of its tokens to compute this step)]."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:  # decodes and unfinished prompt chunks first
            seq = self.running[i]
            n = min(len(seq.token_ids) - seq.num_cached, budget)
            if n <= 0:
                i += 1
                continue
            while not self.cache.reserve(seq.kv, seq.num_cached + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.append((seq, n))
                budget -= n
                i += 1
        if preempted:  # memory is short: admit nobody new this step
            return batch
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if self._waits_for_sibling(seq):
                continue
            handle, cached = self.cache.admit(seq.token_ids, seq.max_len)
            n = min(len(seq.token_ids) - cached, budget)
            if not self.cache.reserve(handle, cached + n):
                self.cache.release(handle)
                break  # first come, first served: nobody overtakes a sequence short of blocks
            self.waiting.remove(seq)
            seq.kv, seq.num_cached, seq.status = handle, cached, SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _waits_for_sibling(self, seq: Sequence) -> bool:
        first = seq.first_sibling
        return (self.share_prompts and first is not None and not first.is_finished
                and first.num_cached < first.num_prompt_tokens - 1)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.release(seq.kv)
        seq.kv, seq.num_cached, seq.status = None, 0, SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def computed(self, batch: list[tuple[Sequence, int]]) -> None:
        """After a step: full blocks of what was computed become shareable."""
        for seq, _ in batch:
            if seq.kv is not None:
                self.cache.commit(seq.kv, seq.token_ids, seq.num_cached)

    def finish(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.cache.release(seq.kv)
            seq.kv = None
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def stats(self) -> EngineStats:
        used, free, block_size = self.cache.usage()
        queries, hits = self.cache.prefix_stats()
        return EngineStats(num_running=len(self.running), num_waiting=len(self.waiting),
                           kv_blocks_used=used, kv_blocks_free=free, kv_block_size=block_size,
                           prefix_cache_queries=queries, prefix_cache_hits=hits,
                           num_preemptions=self.num_preemptions)
