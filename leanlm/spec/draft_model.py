"""draft:MODEL and self:QUANT — a separate (smaller, or quantized) model drafts the tokens.

The draft model has its own paged KV cache. Per sequence it remembers which tokens its cache
holds; each step it first catches up (the prompt the first time, then the tokens verification
accepted), then decodes k tokens one at a time. Tokens the target rejected are rolled back from
the draft's cache, as from the target's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leanlm.kv.cache import SeqSlice
from leanlm.kv.codecs import PlainCodec
from leanlm.kv.paged import PagedKVCache
from leanlm.spec.config import MAX_K
from leanlm.spec.early_exit import draft_tokens, low_confidence
from leanlm.spec.proposer import Draft, Proposer

DRAFT_CACHE_SHARE = 0.25  # of the target's KV budget, at most


@dataclass
class _DraftSeq:
    handle: object
    ids: list[int] = field(default_factory=list)  # tokens whose K/V the draft cache holds


class DraftModelProposer(Proposer):
    name = "draft"

    def __init__(self, model, model_config, target_cache: PagedKVCache, target_vocab: int, sampler,
                 name: str = "draft", conf: float = 0.0):
        self.model, self.sampler, self.target_vocab, self.name = model, sampler, target_vocab, name
        self.conf = conf  # stop a sequence's drafting after a token less likely than this
        self.draft_cost = 0.5  # its one-token step relative to the target's: set by the loader
        mc, bs = model_config, target_cache.block_size
        dtype, device = model.dtype, target_cache.device
        per_token = PlainCodec.bytes_per_token_for(mc.num_layers, mc.num_kv_heads, mc.head_dim, dtype)
        target_bytes = target_cache.blocks.num_blocks * bs * target_cache.bytes_per_token()
        num_blocks = max(2, min(target_cache.blocks.num_blocks, int(DRAFT_CACHE_SHARE * target_bytes) // (bs * per_token)))
        codec = PlainCodec(mc.num_layers, num_blocks * bs, bs, mc.num_kv_heads, mc.head_dim, dtype, device)
        self.cache = PagedKVCache(codec, num_blocks, bs, device, mc.num_kv_heads, mc.sliding_window,
                                  enable_prefix_caching=False)
        self.seqs: dict[object, _DraftSeq] = {}

    def step_cost(self, cost, batch: int, k: int) -> float:
        return cost.draft_step(batch, k, self.draft_cost)

    def release(self, seq) -> None:
        st = self.seqs.pop(seq, None)
        if st is not None:
            self.cache.release(st.handle)

    def _sync(self, seq) -> _DraftSeq:
        """The sequence's draft state with rejected drafts rolled back: only tokens past the last
        ~k can differ from the sequence's (earlier ones were verified)."""
        st = self.seqs.get(seq)
        if st is None:
            st = self.seqs[seq] = _DraftSeq(self.cache.admit([], seq.max_len)[0])
            return st
        ids, n = seq.token_ids, min(len(st.ids), len(seq.token_ids) - 1)
        common = max(0, n - MAX_K - 2)
        while common < n and st.ids[common] == ids[common]:
            common += 1
        if common < len(st.ids):
            del st.ids[common:]
            self.cache.rollback(st.handle, common)
        return st

    @torch.inference_mode()
    def propose(self, seqs, ks):
        device = self.cache.device
        n = len(seqs)
        ks = list(ks)
        states = [self._sync(s) for s in seqs]
        for i, (s, st) in enumerate(zip(seqs, states)):
            # room for the catch-up tokens and k - 1 drafts fed back (d_k is never fed)
            if ks[i] and not self.cache.reserve(st.handle, len(s.token_ids) + ks[i] - 1):
                ks[i] = 0  # the draft cache is full: this sequence decodes without drafts
        tokens: list[list[int]] = [[] for _ in range(n)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(n)]
        feed = [s.token_ids[len(st.ids):] if ks[i] else [] for i, (s, st) in enumerate(zip(seqs, states))]
        for step in range(max(ks, default=0)):
            act = [i for i in range(n) if step < ks[i]]
            if not act:  # every sequence stopped early (confidence)
                break
            ids, pos, slices, last_rows = [], [], [], []
            for i in act:
                start = len(states[i].ids)
                slices.append(SeqSlice(states[i].handle, start, len(feed[i]), len(ids)))
                ids.extend(feed[i])
                pos.extend(range(start, start + len(feed[i])))
                last_rows.append(len(ids) - 1)
                states[i].ids.extend(feed[i])
            ctx = self.cache.prepare(slices)
            hidden = self.model(torch.tensor(ids, device=device), torch.tensor(pos, device=device),
                                self.cache, ctx)
            logits = self._vocab(self.model.compute_logits(hidden[torch.tensor(last_rows, device=device)]).float())
            drafted = draft_tokens(logits, [seqs[i] for i in act], self.sampler, [tokens[i] for i in act])
            for i, (tok, q), low in zip(act, drafted, low_confidence(logits, self.conf)):
                tokens[i].append(tok)
                feed[i] = [tok]
                if q is not None:
                    qs[i].append(q)
                if low:
                    ks[i] = step + 1
        return [Draft(tokens[i], torch.stack(qs[i]) if qs[i] else None) for i in range(n)]

    def _vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits over the target's vocabulary (embedding rows past the tokenizer differ)."""
        V = self.target_vocab
        if logits.shape[1] >= V:
            return logits[:, :V]
        pad = logits.new_full((logits.shape[0], V - logits.shape[1]), float("-inf"))
        return torch.cat((logits, pad), dim=1)
