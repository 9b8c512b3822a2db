"""early-exit:E — LayerSkip-style self-speculation: the target's first E layers, its final norm
and its LM head draft the tokens. The draft writes the K/V of layers < E straight into the
target's cache (they are exactly what the target computes for those layers), and hands over each
token's residual stream after layer E-1, so verification only runs layers >= E.

With `conf=C` a sequence stops drafting after a token whose draft probability (the max of the
softmax at the exit) is under C: the token is still proposed (its cost is paid), the next are not."""
from __future__ import annotations

import torch

from leanlm.kv.cache import SeqSlice
from leanlm.spec.proposer import Draft, Proposer
from leanlm.spec.verify import _draw


class EarlyExitProposer(Proposer):
    name = "early-exit"
    uses_target_cache = True

    def __init__(self, model, cache, exit_layer: int, sampler, conf: float = 0.0):
        n = len(model.layers)
        if not 1 <= exit_layer < n:
            raise ValueError(f"early-exit:{exit_layer}: the exit layer must be in [1, {n - 1}] "
                             f"(the model has {n} layers)")
        self.model, self.cache, self.exit_layer, self.sampler = model, cache, exit_layer, sampler
        self.conf = conf

    def step_cost(self, cost, batch: int, k: int) -> float:
        return cost.early_exit_step(batch, self.exit_layer, k)

    def taps(self) -> list[int]:
        """Layers < exit_layer after which the draft pass keeps each token's residual stream
        (early-exit:auto's shadow tokens); none for a fixed exit."""
        return []

    @torch.inference_mode()
    def propose(self, seqs, ks):
        model, device, E = self.model, self.model.embed_tokens.weight.device, self.exit_layer
        n = len(seqs)
        ks = list(ks)
        tokens: list[list[int]] = [[] for _ in range(n)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(n)]
        hidden: list[list[torch.Tensor]] = [[] for _ in range(n)]
        taps = self.taps()
        tapped: dict[int, list[list[torch.Tensor]]] = {t: [[] for _ in range(n)] for t in taps}
        bounds = [0, *taps, E]
        last = [s.token_ids[-1] for s in seqs]
        # pass j feeds each sequence's j-th input (its last token, then its drafts); pass k_i
        # only computes d_k's layers < E (its K/V and residual stream), no LM head
        for step in range(max(ks) + 1):
            act = [i for i in range(n) if step <= ks[i]]
            if not act:
                break
            pos = [len(seqs[i].token_ids) - 1 + step for i in act]
            slices = [SeqSlice(seqs[i].kv, p, 1, j) for j, (i, p) in enumerate(zip(act, pos))]
            ctx = self.cache.prepare(slices)
            ids = torch.tensor([last[i] for i in act], device=device)
            pos_t = torch.tensor(pos, device=device)
            x = model.embed_tokens(ids)
            for lo, hi in zip(bounds, bounds[1:]):
                x = model.run_layers(x, pos_t, self.cache, ctx, lo, hi)
                if hi != E:
                    for j, i in enumerate(act):
                        tapped[hi][i].append(x[j])
            for j, i in enumerate(act):
                hidden[i].append(x[j])
            head = [j for j, i in enumerate(act) if step < ks[i]]
            if not head:
                continue
            logits = model.compute_logits(model.norm(x[head])).float()
            drafted = draft_tokens(logits, [seqs[act[j]] for j in head], self.sampler,
                                   [tokens[act[j]] for j in head])
            low = low_confidence(logits, self.conf)
            for r, (j, (tok, q)) in enumerate(zip(head, drafted)):
                i = act[j]
                tokens[i].append(tok)
                last[i] = tok
                if q is not None:
                    qs[i].append(q)
                if low[r]:
                    ks[i] = step + 1  # one more pass (this token's layers < E), no more drafts
        self.tapped = [{t: torch.stack(tapped[t][i]) for t in taps} for i in range(n)]
        return [Draft(tokens[i], torch.stack(qs[i]) if qs[i] else None,
                      torch.stack(hidden[i]), E) for i in range(n)]


def low_confidence(logits: torch.Tensor, threshold: float) -> list[bool]:
    """Per row: is the draft's most likely token's probability under `threshold`?"""
    if threshold <= 0:
        return [False] * logits.shape[0]
    # max softmax = 1 / sum(exp(l - max)): no full softmax kept
    top = logits.max(dim=-1, keepdim=True).values
    return (torch.exp(logits - top).sum(dim=-1).reciprocal() < threshold).tolist()


def draft_tokens(logits: torch.Tensor, seqs, sampler, drafted) -> list[tuple[int, torch.Tensor | None]]:
    """One draft token per row: the argmax for greedy requests (q unused), else a draw from the
    draft distribution q under the request's own sampling parameters and generator. Each row is
    processed (penalties, min_tokens) with its sequence's outputs plus `drafted[row]`, the drafts
    before it, as the verifier will process that position: drafts then agree more often."""
    states = [s.state.ahead(d) for s, d in zip(seqs, drafted)]
    greedy_logits = sampler.processed(logits, states) if any(st.needs_positions for st in states) else logits
    greedy = greedy_logits.max(dim=-1).indices.tolist()
    out = []
    sampled = [j for j, s in enumerate(seqs) if not s.params.greedy]
    probs = sampler.filtered_probs(logits[sampled], [states[j] for j in sampled]) if sampled else None
    row = {j: r for r, j in enumerate(sampled)}
    for j, s in enumerate(seqs):
        if s.params.greedy:
            out.append((greedy[j], None))
        else:
            q = probs[row[j]]
            out.append((_draw(q, s.state.generator(q.device)), q))
    return out
