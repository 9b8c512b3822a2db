"""The engine's side of speculative decoding: which sequences draft this step and how many
tokens, the proposer call, verification of the target's logits, and the counters for /metrics.

A sequence drafts when it is decoding (its last token is the only one not cached). Each
verified position is processed as plain decoding would process it there: repetition / presence /
frequency penalties count the output tokens including the drafts before that position, and the
min_tokens block of EOS / stop tokens holds while the outputs before it are fewer than min_tokens
(`SamplingState.ahead`). Logprobs are those of the target's raw logits at each emitted position,
as plain decoding reports them: verification computed them. Each gets its own k, cut by its
max_len, the KV codec's room and the token budget.

How much to draft (the batch-size turn-down). A verification of k + 1 tokens per sequence costs
more as the batch grows (the forward turns compute-bound), so each step asks the cost model
(spec/cost.py) whether drafting pays at this batch size:
- early-exit:auto (DEL) picks its exit layer and k from its own per-layer estimates, every step;
- the fixed proposers always draft k at batch 1 (what the spec asks for, and what bench spec
  measures); with B >= 2 decoding sequences they draft the k <= K with the best predicted
  throughput at their running acceptance rate (decayed, prior PRIOR_ALPHA), and nothing when no
  k is predicted to gain MIN_GAIN;
- above `max_batch` decoding sequences (EngineConfig.spec_max_batch) nobody drafts: a hard cap
  under the cost model, for its errors.
Steps without drafting for either reason are counted in the stats (off_batch, off_cost).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from leanlm.engine.sampling import _to_host, position_states
from leanlm.spec.config import SpecConfig
from leanlm.spec.cost import TOKEN_COST, CostModel, calibrate_token_cost, head_fraction
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
    off_batch: int = 0        # steps with decoding sequences but more than spec_max_batch of them
    off_cost: int = 0         # steps the cost model predicted no gain from drafting
    choices: Counter = field(default_factory=Counter)  # 'E=13:k=3' / 'k=4' / 'off' -> steps
    draft_lengths: Counter = field(default_factory=Counter)  # k chosen (0: off) -> steps
    exit_layers: Counter = field(default_factory=Counter)    # early-exit:auto: exit layer chosen (0: off) -> steps
    draft_length: int = 0     # the latest step's choice
    exit_layer: int = 0       # early-exit:auto: the latest step's choice (0: off)
    acceptance_estimate: float = 0.0  # the running (decayed) rate the policy uses
    layer_acceptance: dict = field(default_factory=dict)  # early-exit:auto: exit layer -> global estimate
    token_cost: float = 0.0   # the cost model's β (measured at load unless spec_calibrate is off)
    draft_cost: float = 0.0   # a draft model's one-token step relative to the target's (0: none)

    def __copy__(self) -> "SpecStats":
        """A snapshot (EngineStats.spec): its counters are not the live ones, which the engine
        thread goes on changing while a /metrics scrape reads the snapshot."""
        return replace(self, choices=Counter(self.choices), draft_lengths=Counter(self.draft_lengths),
                       exit_layers=Counter(self.exit_layers), layer_acceptance=dict(self.layer_acceptance))

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_len(self) -> float:
        """Tokens per verification: accepted drafts + the target's own token."""
        return self.emitted / self.verifications if self.verifications else 0.0


PRIOR_ALPHA = 0.5    # fixed proposers' acceptance before any verification
ALPHA_DECAY = 0.98   # per drafted token: the estimate follows ~50 recent drafts
MIN_GAIN = 1.05      # predicted speedups below this are within the cost model's error


class Speculator:
    def __init__(self, spec: SpecConfig, proposer: Proposer, cache, max_batch: int,
                 max_num_batched_tokens: int, cost: CostModel):
        self.spec, self.proposer, self.cache, self.cost = spec, proposer, cache, cost
        self.max_batch, self.token_budget = max_batch, max_num_batched_tokens
        self.stats = SpecStats(str(spec), token_cost=getattr(cost, "token_cost", 0.0),
                               draft_cost=getattr(proposer, "draft_cost", 0.0))
        self.results: dict = {}  # sequence -> SampleResult of its emitted tokens (logprobs asked)
        self.set_estimate(PRIOR_ALPHA)  # decayed accepted / judged drafts
        self.enabled = True

    def set_estimate(self, alpha: float, weight: float = 2.0) -> None:
        """Start the fixed proposers' running acceptance estimate at alpha (as `weight` drafts)."""
        self._hits, self._count = alpha * weight, weight
        self.stats.acceptance_estimate = alpha

    def step_k(self, seqs, batch: int) -> int:
        """The most any of `seqs` drafts this step, with `batch` decoding sequences; 0: none."""
        choose = getattr(self.proposer, "choose", None)
        if choose is not None:  # DEL decides its exit layer and k itself
            k = choose(seqs, batch)
            label = f"E={self.proposer.exit_layer}:k={k}" if k else "off"
            self.stats.layer_acceptance = self.proposer.layer_acceptance()
        elif batch == 1:
            k, label = self.spec.k, f"k={self.spec.k}"
        else:
            alpha = self.stats.acceptance_estimate
            k, gain = self.cost.best_draft_length(alpha, batch, self.spec.k,
                                                  lambda b, j: self.proposer.step_cost(self.cost, b, j))
            k = k if gain >= MIN_GAIN else 0
            label = f"k={k}" if k else "off"
        st = self.stats
        st.choices[label] += 1
        st.draft_lengths[k] += 1
        st.draft_length = k
        if choose is not None:
            st.exit_layer = self.proposer.exit_layer if k else 0
            st.exit_layers[st.exit_layer] += 1
        if not k:
            st.off_cost += 1
        return k

    def plan(self, batch) -> dict:
        """Drafts for this step's decoding sequences: {sequence: Draft} (non-empty drafts only)."""
        self.proposer.observe()
        if not self.enabled:  # switched off (bench spec's baseline): a plain engine
            return {}
        self.stats.target_forwards += 1
        decodes = [seq for seq, n in batch if n == 1 and seq.num_cached == len(seq.token_ids) - 1]
        drafts = self._drafts(batch, decodes) if decodes else {}
        self.proposer.before_forward(batch, decodes, drafts)
        return drafts

    def _drafts(self, batch, decodes) -> dict:
        if len(decodes) > self.max_batch:
            self.stats.off_batch += 1
            self.stats.draft_length = self.stats.exit_layer = 0
            return {}
        k_step = self.step_k(decodes, len(decodes))
        if not k_step:
            return {}
        budget = self.token_budget - sum(n for _, n in batch)
        seqs, ks = [], []
        for seq in decodes:
            L = len(seq.token_ids)
            k = min(k_step, seq.max_len - L - 1, self.cache.draft_room(L), budget)
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
        # row j of a sequence is processed with its outputs + its drafts before j (penalties,
        # min_tokens), as plain decoding processes that position
        states = [position_states(s.state, drafts[s].tokens) for s in seqs]
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        if greedy:  # one argmax and one host copy for every greedy row of the step
            block = torch.cat([logits[i] for i in greedy])
            if any(seqs[i].state.needs_positions for i in greedy):
                block = sampler.processed(block, [st for i in greedy for st in states[i]])
            argmax = block.max(dim=-1).indices.tolist()
            at = 0
            for i in greedy:
                k1 = logits[i].shape[0]
                out[i] = greedy_accept(argmax[at:at + k1], drafts[seqs[i]].tokens)
                at += k1
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            probs = sampler.filtered_probs(torch.cat([logits[i] for i in sampled]),
                                           [st for i in sampled for st in states[i]])
            at = 0
            for i in sampled:
                k1, d = logits[i].shape[0], drafts[seqs[i]]
                out[i] = speculative_sample(probs[at:at + k1], d.tokens, d.q,
                                            seqs[i].state.generator(probs.device))
                at += k1
        for i, s in enumerate(seqs):
            if s.params.logprobs is not None:  # the target's raw logprobs at the emitted positions
                emitted = torch.tensor(out[i], device=logits[i].device)
                self.results[s] = _to_host(logits[i][:len(out[i])].float(), emitted, [s.state] * len(out[i]))
        st = self.stats
        for i, s in enumerate(seqs):
            k, a = len(drafts[s].tokens), len(out[i]) - 1
            st.drafted += k
            st.accepted += a
            st.verifications += 1
            st.emitted += len(out[i])
            # per-token acceptance: a drafts kept, then one rejected (if any); the drafts after a
            # rejection were never judged, so they do not count
            seen = a + (a < k)
            decay = ALPHA_DECAY ** seen
            self._hits, self._count = decay * self._hits + a, decay * self._count + seen
        st.acceptance_estimate = self._hits / self._count if self._count else PRIOR_ALPHA
        return out

    def release(self, seq) -> None:
        self.proposer.release(seq)


def build_speculator(spec: SpecConfig, engine) -> Speculator:
    """The proposer `spec` names, built against a loaded engine (model, cache, tokenizer)."""
    from leanlm.spec.proposer import NgramProposer

    cfg = engine.config
    beta = calibrate_token_cost(engine.model) if cfg.spec_calibrate else TOKEN_COST
    cost = CostModel(len(engine.model.layers), head_fraction(engine.model), beta)
    if spec.kind == "ngram":
        proposer = NgramProposer(spec.n)
    elif spec.auto:
        from leanlm.spec.dynamic_exit import DynamicExitProposer

        proposer = DynamicExitProposer(engine.model, engine.cache, engine.sampler, spec.k, spec.conf, beta)
    elif spec.kind == "early-exit":
        from leanlm.spec.early_exit import EarlyExitProposer

        proposer = EarlyExitProposer(engine.model, engine.cache, spec.exit_layer, engine.sampler, spec.conf)
    else:
        from leanlm.spec.loading import load_draft_proposer

        proposer = load_draft_proposer(spec, engine)
    return Speculator(spec, proposer, engine.cache, cfg.spec_max_batch, cfg.max_num_batched_tokens, cost)
