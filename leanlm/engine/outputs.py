"""Result types with vLLM's names."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None        # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None    # the stop string or stop token id that ended it
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # streaming: the text each output gained in this step, by output index
    deltas: dict[int, str] = field(default_factory=dict)


@dataclass
class EngineStats:
    """A snapshot of the engine's load, for /metrics and benchmarks."""
    num_running: int            # sequences in the running batch
    num_waiting: int            # sequences queued (new or preempted)
    kv_blocks_used: int         # KV blocks referenced by a sequence
    kv_blocks_free: int         # blocks allocatable now (never used, freed, or evictable cached)
    kv_block_size: int          # tokens per block
    prefix_cache_queries: int   # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int      # of those, tokens found cached (cumulative)
    num_preemptions: int        # sequences preempted for recomputation (cumulative)
    spec: object | None = None  # SpecStats (leanlm.spec.speculator) when speculative decoding is on
