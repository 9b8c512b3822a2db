"""A sequence: one sample of one request, with its tokens, sampling state and cache slot."""
from __future__ import annotations

import enum

from leanlm.engine.detokenizer import IncrementalDetokenizer
from leanlm.engine.outputs import Logprob
from leanlm.engine.sampling import SamplingParams, SamplingState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, state: SamplingState, detok: IncrementalDetokenizer,
                 max_len: int):
        self.request_id, self.index = request_id, index
        self.prompt_token_ids = prompt_token_ids
        self.token_ids = list(prompt_token_ids)      # prompt + output
        self.params, self.state, self.detok = params, state, detok
        self.max_len = max_len                       # prompt + max output tokens, within the context
        self.status = SequenceStatus.WAITING
        self.num_cached = 0                          # tokens whose K/V are in the cache
        self.kv = None                               # the cache's handle while running
        self.first_sibling: Sequence | None = None   # sample 0 of the same request (n > 1)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.last_delta = ""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def text(self) -> str:
        return self.detok.text
