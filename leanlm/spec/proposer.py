"""The Proposer interface and the model-free n-gram proposer.

A proposer gets the sequences that will verify drafts this step and how many tokens each may
draft, and returns a `Draft` per sequence: up to k tokens, their draft distributions q (None for
a deterministic proposer) and, for early exit, the hidden states the target may resume from.
It is told when a sequence leaves, so per-sequence state (a draft model's KV) can be freed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draft:
    tokens: list[int]
    q: torch.Tensor | None = None          # [len(tokens), V] draft probabilities; None: one-hot
    hidden: torch.Tensor | None = None     # [len(tokens) + 1, H]: residual stream after layer `skip`
    skip: int = 0                          # target layers already computed for these tokens


class Proposer:
    name = "proposer"
    # True: drafts are written into the target's KV (early exit): room must be reserved first
    uses_target_cache = False

    def propose(self, seqs: list, ks: list[int]) -> list[Draft]:
        """seqs: sequences whose last token is not yet cached; ks: the most each may draft."""
        raise NotImplementedError

    def release(self, seq) -> None:
        """The sequence finished or was aborted: drop what is kept for it."""

    def step_cost(self, cost, batch: int, k: int) -> float:
        """A step of `batch` sequences drafting k tokens each, in CostModel units (no draft cost:
        n-gram lookup)."""
        return cost.draft_step(batch, k, 0.0)

    def before_forward(self, batch, decodes, drafts) -> None:
        """The step's drafts are chosen and the target forward comes next (DEL hooks it)."""

    def observe(self) -> None:
        """The previous step's tokens are appended: learn from them (DEL's shadow tokens)."""


class NgramProposer(Proposer):
    """Prompt lookup decoding: find the latest earlier occurrence of the last n tokens (falling
    back to shorter suffixes, down to 1) and propose the up to k tokens that followed it."""

    name = "ngram"

    def __init__(self, n: int, min_n: int = 1):
        self.n, self.min_n = n, min(min_n, n)

    def propose(self, seqs, ks):
        return [Draft(ngram_lookup(s.token_ids, self.n, self.min_n, k)) for s, k in zip(seqs, ks)]


def ngram_lookup(tokens: list[int], n: int, min_n: int, k: int) -> list[int]:
    """The k tokens after the most recent earlier match of tokens' last m tokens, for the
    longest m in [min_n, n] that matches; [] when none does."""
    if k <= 0:
        return []
    L = len(tokens)
    for m in range(min(n, L - 1), min_n - 1, -1):
        suffix = tokens[L - m:]
        first = suffix[0]
        # scan backwards: recent context predicts best; the match must end before the suffix
        for i in range(L - m - 1, -1, -1):
            if tokens[i] == first and tokens[i:i + m] == suffix:
                return tokens[i + m:i + m + k]
    return []
