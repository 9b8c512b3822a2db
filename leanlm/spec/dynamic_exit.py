"""early-exit:auto — DEL (Dynamic Exit Layer): early-exit self-speculation whose exit layer E and
draft length k are chosen each step from what verification has shown so far.

Shadow tokens. At every decode step (drafting or not) each candidate exit layer e's prediction
for each verified position is checked against the token the target emitted there: would a draft
from layer e have been accepted? Positions past the first rejection are not counted (their
context holds a rejected token). The hidden states come for free: layers < E from the draft
pass, layers >= E from forward hooks during the target's own forward. Only the check costs:
rather than the full LM head (as large as ~8 of this model's layers) per candidate, the normed
state is scored against the head rows of the target's top-M tokens at that position plus the
emitted token, and the shadow token is the best of those — a top-1 check that can only miss a
token outside the target's top M (M = 32; it then over-counts acceptance). At the exit layer in
use the check is exact: the drafts themselves were verified.

Estimates. Per candidate layer, a global acceptance rate (exponentially decayed, ~100 recent
observations) and per sequence a faster one (~10) that starts from the global rate as a prior of
PRIOR_WEIGHT observations: the context (a code block, a repeated passage) moves a sequence's rate.

Choice. With each drafting sequence's α per layer, CostModel.best_early_exit picks the (E, k)
maximising tokens per unit of compute at this batch size; predicted gains under MIN_GAIN draft
nothing (plain decoding, still probing every layer so a better context turns drafting back on).
Each sequence also stops drafting at a token less likely than `conf` under the draft.
"""
from __future__ import annotations

from collections import Counter

import torch

from leanlm.spec.cost import CostModel, head_fraction
from leanlm.spec.early_exit import EarlyExitProposer

TOP_M = 32
GLOBAL_DECAY, SEQ_DECAY, PRIOR_WEIGHT = 0.99, 0.9, 4.0
MIN_GAIN = 1.05  # predicted speedups below this are within the cost model's error: do not draft


def candidate_layers(num_layers: int) -> list[int]:
    """Exit layers considered: about every 3rd layer from 4 to L-2 (30 layers: 4, 7, ..., 28);
    every layer of a tiny model."""
    lo = 4 if num_layers > 12 else 1
    hi = num_layers - 2 if num_layers > 6 else num_layers - 1
    step = max(1, (hi - lo) // 8)
    return list(range(lo, hi + 1, step))


class AcceptanceEstimator:
    """Decayed hit counts per candidate layer: global, and per sequence with the global prior."""

    def __init__(self, num_candidates: int):
        self.n = num_candidates
        self.hits, self.count = [0.0] * self.n, [0.0] * self.n
        self.seqs: dict[object, tuple[list[float], list[float]]] = {}

    def observe(self, seq, layer: int, matches: list[bool]) -> None:
        """Matches of layer index `layer` at consecutive positions (oldest first)."""
        per = self.seqs.setdefault(seq, ([0.0] * self.n, [0.0] * self.n)) if seq is not None else None
        for m in matches:
            self.hits[layer] = GLOBAL_DECAY * self.hits[layer] + m
            self.count[layer] = GLOBAL_DECAY * self.count[layer] + 1
            if per is not None:
                per[0][layer] = SEQ_DECAY * per[0][layer] + m
                per[1][layer] = SEQ_DECAY * per[1][layer] + 1

    def global_alpha(self, layer: int) -> float:
        return self.hits[layer] / self.count[layer] if self.count[layer] else 0.0

    def alpha(self, seq, layer: int) -> float:
        g = self.global_alpha(layer)
        per = self.seqs.get(seq)
        if per is None:
            return g
        return (per[0][layer] + PRIOR_WEIGHT * g) / (per[1][layer] + PRIOR_WEIGHT)

    def drop(self, seq) -> None:
        self.seqs.pop(seq, None)


class DynamicExitProposer(EarlyExitProposer):
    name = "early-exit:auto"

    def __init__(self, model, cache, sampler, k_max: int, conf: float, token_cost: float | None = None):
        L = len(model.layers)
        super().__init__(model, cache, 1, sampler, conf)
        self.exit_layer = 0  # 0: not drafting this step
        self.k_max = k_max
        self.candidates = candidate_layers(L)
        cost = CostModel(L, head_fraction(model)) if token_cost is None else \
            CostModel(L, head_fraction(model), token_cost)
        self.cost = cost
        self.estimator = AcceptanceEstimator(len(self.candidates))
        self.chosen: Counter = Counter()  # exit layer (0: none) -> steps
        self.chosen_k: Counter = Counter()
        self.last_choice = (0, 0, 1.0)
        self._pending: list[dict] = []
        self._captured: dict[int, torch.Tensor] = {}
        self._final_top: torch.Tensor | None = None
        self._hooks: list = []
        self._head_w: torch.Tensor | None = None
        self._draft_seqs: list = []
        self.tapped: list[dict] = []

    def taps(self) -> list[int]:
        return [e for e in self.candidates if e < self.exit_layer]

    # -- the policy ------------------------------------------------------------------------------
    def layer_acceptance(self) -> dict[int, float]:
        """Each candidate exit layer's global acceptance estimate (for the stats)."""
        return {e: round(self.estimator.global_alpha(j), 4) for j, e in enumerate(self.candidates)}

    def step_cost(self, cost, batch: int, k: int) -> float:
        return cost.early_exit_step(batch, self.exit_layer or self.candidates[0], k)

    def choose(self, seqs, batch_size: int) -> int:
        """Pick this step's exit layer and draft length for `seqs` (the drafting candidates) in a
        step of `batch_size` decoding sequences; 0: do not draft."""
        alphas = {e: [self.estimator.alpha(s, j) for s in seqs] for j, e in enumerate(self.candidates)}
        E, k, gain = self.cost.best_early_exit(alphas, batch_size, self.k_max)
        if gain < MIN_GAIN:
            E, k = 0, 0
        self.exit_layer, self.last_choice = E, (E, k, gain)
        self.chosen[E] += 1
        self.chosen_k[k] += 1
        return k

    def propose(self, seqs, ks):
        self._draft_seqs = list(seqs)
        return super().propose(seqs, ks)

    def release(self, seq) -> None:
        self.estimator.drop(seq)

    # -- shadow tokens ---------------------------------------------------------------------------
    def before_forward(self, batch, decodes, drafts) -> None:
        """Note where each decoding sequence's rows will be in the coming target forward and hook
        the candidate layers the forward will run (all of them when nothing was drafted)."""
        E = self.exit_layer if drafts else 0
        # layers < E of each drafted sequence, tapped by the draft pass (propose's order)
        tapped = {s: self.tapped[i] for i, s in enumerate(self._draft_seqs) if s in drafts}
        track = set(drafts) if drafts else set(decodes)
        at, sample_at = 0, 0
        for seq, n in batch:
            draft = drafts.get(seq)
            rows = n + (len(draft.tokens) if draft is not None else 0)
            if seq in track:
                self._pending.append(dict(seq=seq, length=len(seq.token_ids), row=at, sample_row=sample_at,
                                          draft=draft.tokens if draft is not None else [], exit=E,
                                          low=tapped.get(seq) or {}))
            if seq.num_cached + n == len(seq.token_ids):  # the runner samples this sequence
                sample_at += rows if draft is not None else 1
            at += rows
        if not self._pending:
            return
        for e in self.candidates:
            if e > E:
                self._hooks.append(self.model.layers[e - 1].register_forward_hook(self._capture(e)))
        self._hooks.append(self.model.lm_head.register_forward_hook(self._capture_top))

    def _capture(self, e: int):
        def hook(module, args, output):
            self._captured[e] = output
        return hook

    def _capture_top(self, module, args, output):
        self._final_top = output.topk(min(TOP_M, output.shape[-1]), dim=-1).indices

    def observe(self) -> None:
        """After the step: score the recorded shadow tokens against what the target emitted."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        pending, self._pending = self._pending, []
        captured, self._captured = self._captured, {}
        top, self._final_top = self._final_top, None
        if not pending or top is None:
            return
        hs, cands, targets, where = [], [], [], []
        for rec in pending:
            seq = rec["seq"]
            emitted = seq.token_ids[rec["length"]:rec["length"] + len(rec["draft"]) + 1]
            n = len(emitted)
            if n == 0:
                continue
            who = None if seq.is_finished else seq
            t = torch.tensor(emitted, device=top.device)
            c = torch.cat((top[rec["sample_row"]:rec["sample_row"] + n], t[:, None]), dim=1)
            for j, e in enumerate(self.candidates):
                if e == rec["exit"]:  # the drafts were verified: exact
                    self.estimator.observe(who, j, [d == x for d, x in zip(rec["draft"], emitted)])
                    continue
                h = rec["low"][e][:n] if e < rec["exit"] else captured.get(e)
                if h is None:
                    continue
                if e > rec["exit"]:
                    h = h[rec["row"]:rec["row"] + n]
                hs.append(h)
                cands.append(c)
                targets.append(t)
                where.append((who, j, n))
        if not hs:
            return
        hit = self._top1(torch.cat(hs), torch.cat(cands), torch.cat(targets)).tolist()
        at = 0
        for who, j, n in where:
            self.estimator.observe(who, j, hit[at:at + n])
            at += n

    @torch.inference_mode()
    def _top1(self, h: torch.Tensor, cands: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Is the target's token the best of its candidate set under each normed state?"""
        w = self._head_weight()[cands]                                  # [N, M+1, H]
        scores = torch.einsum("nmh,nh->nm", w, self.model.norm(h).to(w.dtype))
        return cands.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1) == targets

    def _head_weight(self) -> torch.Tensor:
        if self._head_w is None:
            head = self.model.lm_head
            w = getattr(head, "weight", None)
            if w is None or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                w = head.method.dequantized(head.quantized)  # a quantized head: its float weight once
            self._head_w = w
        return self._head_w
