"""The engine's side of speculative decoding: which sequences draft this step and how many
tokens, the proposer call, verification of the target's logits, and the counters for /metrics.

A sequence drafts when it is decoding (its last token is the only one not cached) and its
sampling does not depend on the tokens before each position in ways the verifier's shared
distribution would miss: no repetition / presence / frequency penalties, no min_tokens block
pending, no logprobs asked (those decode normally, in the same step). Each gets its own k, cut
by its max_len, the KV codec's room and the token budget. With more than `max_batch` decoding
sequences speculation is off for the step: the batch already keeps the machine busy, and
verifying k extra tokens per sequence would cost more than it saves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from leanlm.spec.config import SpecConfig
from leanlm.spec.proposer import Draft, Proposer
from leanlm.spec.verify import greedy_accept, speculative_sample


@dataclass
class SpecStats:
    spec: str
    drafted: int = 0          # draft tokens proposed and verified
    accepted: int = 0         # of those, accepted
    verifications: int = 0    # (sequence, step) pairs that verified a draft
    emitted: int = 0          # tokens those verifications produced (accepted + 1 each)
    target_forwards: int = 0  # engine steps (one target forward each)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_len(self) -> float:
        """Tokens per verification: accepted drafts + the target's own token."""
        return self.emitted / self.verifications if self.verifications else 0.0


class Speculator:
    def __init__(self, spec: SpecConfig, proposer: Proposer, cache, max_batch: int,
                 max_num_batched_tokens: int):
        self.spec, self.proposer, self.cache = spec, proposer, cache
        self.max_batch, self.token_budget = max_batch, max_num_batched_tokens
        self.stats = SpecStats(str(spec))
        self.enabled = True

    def eligible(self, seq) -> bool:
        s, p = seq.state, seq.params
        return not s.uses_penalties and not s.min_tokens_blocked and p.logprobs is None

    def plan(self, batch) -> dict:
        """Drafts for this step's decoding sequences: {sequence: Draft} (non-empty drafts only)."""
        if not self.enabled:  # switched off (bench spec's baseline): a plain engine
            return {}
        self.stats.target_forwards += 1
        decodes = [seq for seq, n in batch if n == 1 and seq.num_cached == len(seq.token_ids) - 1]
        if not decodes or len(decodes) > self.max_batch:
            return {}
        budget = self.token_budget - sum(n for _, n in batch)
        seqs, ks = [], []
        for seq in decodes:
            if not self.eligible(seq):
                continue
            L = len(seq.token_ids)
            k = min(self.spec.k, seq.max_len - L - 1, self.cache.draft_room(L), budget)
            if k <= 0:
                continue
            if self.proposer.uses_target_cache and not self.cache.reserve(seq.kv, L + k):
                continue  # no free block for the drafts: decode normally
            seqs.append(seq)
            ks.append(k)
            budget -= k
        if not seqs:
            return {}
        drafts = {}
        for seq, draft in zip(seqs, self.proposer.propose(seqs, ks)):
            L = len(seq.token_ids)
            if draft.tokens and (self.proposer.uses_target_cache or self.cache.reserve(seq.kv, L + len(draft.tokens))):
                drafts[seq] = draft
            elif self.proposer.uses_target_cache:
                self.cache.rollback(seq.kv, L)  # the room reserved for drafts that did not come
        return drafts

    def verify(self, seqs, logits: list[torch.Tensor], drafts: dict, sampler) -> list[list[int]]:
        """Per sequence, logits [k+1, V] -> the tokens to emit (accepted drafts + one)."""
        out: list[list[int]] = [[] for _ in seqs]
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        if greedy:  # one argmax and one host copy for every greedy row of the step
            argmax = torch.cat([logits[i] for i in greedy]).max(dim=-1).indices.tolist()
            at = 0
            for i in greedy:
                k1 = logits[i].shape[0]
                out[i] = greedy_accept(argmax[at:at + k1], drafts[seqs[i]].tokens)
                at += k1
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            states = [seqs[i].state for i in sampled for _ in range(logits[i].shape[0])]
            probs = sampler.filtered_probs(torch.cat([logits[i] for i in sampled]), states)
            at = 0
            for i in sampled:
                k1, d = logits[i].shape[0], drafts[seqs[i]]
                out[i] = speculative_sample(probs[at:at + k1], d.tokens, d.q,
                                            seqs[i].state.generator(probs.device))
                at += k1
        st = self.stats
        for i, s in enumerate(seqs):
            st.drafted += len(drafts[s].tokens)
            st.accepted += len(out[i]) - 1
            st.verifications += 1
            st.emitted += len(out[i])
        return out

    def release(self, seq) -> None:
        self.proposer.release(seq)


def build_speculator(spec: SpecConfig, engine) -> Speculator:
    """The proposer `spec` names, built against a loaded engine (model, cache, tokenizer)."""
    from leanlm.spec.proposer import NgramProposer

    cfg = engine.config
    if spec.kind == "ngram":
        proposer = NgramProposer(spec.n)
    elif spec.kind == "early-exit":
        from leanlm.spec.early_exit import EarlyExitProposer

        proposer = EarlyExitProposer(engine.model, engine.cache, spec.exit_layer, engine.sampler)
    else:
        from leanlm.spec.loading import load_draft_proposer

        proposer = load_draft_proposer(spec, engine)
    return Speculator(spec, proposer, engine.cache, cfg.spec_max_batch, cfg.max_num_batched_tokens)
