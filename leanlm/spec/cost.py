"""When does drafting pay? The cost model every proposer's policy uses (DEL's exit layer and draft
length, and the batch-size turn-down of the fixed proposers).

Costs are in units of one plain decode step of one sequence (a one-token target forward). A
forward pushing t tokens through a fraction f of the decoder layers, with the LM head on r rows,
costs  f·(1-h)·(1 + β(t-1)) + h·(1 + β(r-1))  (no head term when r = 0), where h is the head's
share of a one-token step (its parameters' share: decode is a pass over the weights) and β the
extra cost of each further token in the same forward. At batch 1 on a CPU a forward is bound by
reading the weights, so β is small; as the batch grows the forward turns compute-bound and every
drafted token costs its share: that is what turns speculation down in large batches.

β depends on the kernels and the machine, so the engine measures it when it loads a proposer
(`calibrate_token_cost`: the model's own linear layers, timed at 1 and 8 rows, ~0.3 s for a 135M
model; the native packed kernels give ~0.03, MKL's sgemm ~0.15), and a draft model's cost
relative to the target the same way (`relative_step_time`). TOKEN_COST is the prior used without
a measurement.

A draft of k tokens whose per-token acceptance is α (independent) yields on average
(1 - α^(k+1)) / (1 - α) tokens per verification (accepted drafts + the target's own token).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

TOKEN_COST = 0.1  # β: default cost of one more token in a forward, relative to a one-token step


def expected_tokens(alpha: float, k: int) -> float:
    """Mean tokens a verification of k drafts emits when each is accepted with probability alpha."""
    if k <= 0:
        return 1.0
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass(frozen=True)
class CostModel:
    num_layers: int
    head_frac: float                # h: the LM head's share of a one-token step
    token_cost: float = TOKEN_COST  # β

    def forward(self, tokens: int, layers: int, head_rows: int) -> float:
        """One forward: `tokens` tokens through `layers` decoder layers, the head on `head_rows`."""
        if tokens <= 0:
            return 0.0
        h, b = self.head_frac, self.token_cost
        cost = layers / self.num_layers * (1 - h) * (1 + b * (tokens - 1))
        return cost + (h * (1 + b * (head_rows - 1)) if head_rows > 0 else 0.0)

    def plain_step(self, batch: int) -> float:
        return self.forward(batch, self.num_layers, batch)

    def early_exit_step(self, batch: int, exit_layer: int, k: int) -> float:
        """A DEL / LayerSkip step: k draft passes (layers < E + head), one pass computing the last
        draft's layers < E, then verification of k + 1 tokens per sequence by layers >= E only
        (the draft already wrote layers < E into the cache)."""
        E, L = exit_layer, self.num_layers
        draft = k * self.forward(batch, E, batch) + self.forward(batch, E, 0)
        return draft + self.forward(batch * (k + 1), L - E, batch * (k + 1))

    def draft_step(self, batch: int, k: int, draft_cost: float) -> float:
        """A separate drafter (n-gram: draft_cost 0; a draft model: its one-token step's cost
        relative to the target's) drafting k tokens, then a full verification of k + 1 tokens."""
        b = self.token_cost
        draft = k * draft_cost * (1 + b * (batch - 1))
        return draft + self.forward(batch * (k + 1), self.num_layers, batch * (k + 1))

    def speedup(self, tokens: float, batch: int, step_cost: float) -> float:
        """Throughput of a step emitting `tokens` in total at `step_cost`, relative to plain decoding."""
        return (tokens / step_cost) / (batch / self.plain_step(batch))

    def best_early_exit(self, alphas: dict[int, list[float]], batch: int, k_max: int,
                        ) -> tuple[int, int, float]:
        """alphas: exit layer -> each drafting sequence's acceptance estimate there; `batch`
        decoding sequences in all (those not drafting emit 1 token each) -> (E, k, predicted
        speedup) maximising tokens per unit of compute; (0, 0, 1.0) when no (E, k) beats plain."""
        best = (0, 0, 1.0)
        for E, per_seq in alphas.items():
            others = batch - len(per_seq)
            for k in range(1, k_max + 1):
                tokens = others + sum(expected_tokens(a, k) for a in per_seq)
                s = self.speedup(tokens, batch, self.early_exit_step(batch, E, k))
                if s > best[2]:
                    best = (E, k, s)
        return best

    def best_draft_length(self, alpha: float, batch: int, k_max: int,
                          step_cost: Callable[[int, int], float]) -> tuple[int, float]:
        """(k, predicted speedup) for a proposer whose step with `batch` sequences drafting k
        tokens each costs step_cost(batch, k), with acceptance alpha on every sequence;
        (0, 1.0) when no k beats plain decoding."""
        best = (0, 1.0)
        for k in range(1, k_max + 1):
            s = self.speedup(batch * expected_tokens(alpha, k), batch, step_cost(batch, k))
            if s > best[1]:
                best = (k, s)
        return best


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def head_fraction(model) -> float:
    """The LM head's share of the bytes a one-token step reads (head + decoder layers; quantized
    layers count their packed codes and scales)."""
    head, layers = _bytes(model.lm_head), _bytes(model.layers)
    return head / (head + layers) if head + layers else 0.5


def step_bytes(model) -> int:
    """Bytes a one-token step reads (decoder layers + LM head): a draft model's cost relative to
    the target's is the ratio of these (decode reads the weights once per step)."""
    return _bytes(model.lm_head) + _bytes(model.layers)


CALIBRATION_ROWS = 8            # a verification of 7 drafts, or 8 decoding sequences
TOKEN_COST_RANGE = (0.01, 1.0)  # a measured β is clamped here (timing noise on a tiny model)


def _linears(model) -> list:
    from leanlm.models.layers import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]  # modules() yields each once


@torch.inference_mode()
def time_linears(model, rows_list: list[int], repeats: int = 5) -> dict[int, float]:
    """Median seconds to run every linear layer of `model` (decoder layers and LM head) once on
    random inputs of each row count in rows_list; the sizes are interleaved in every repeat so
    the machine's drift hits them alike, and a first pass warms up."""
    lins = _linears(model)
    device, dtype = model.embed_tokens.weight.device, model.dtype
    xs = {(r, lin.in_features): torch.randn(r, lin.in_features, dtype=dtype, device=device)
          for r in rows_list for lin in lins}
    times: dict[int, list[float]] = {r: [] for r in rows_list}
    for rep in range(repeats + 1):
        for r in rows_list:
            t0 = time.perf_counter()
            for lin in lins:
                lin(xs[(r, lin.in_features)])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if rep:
                times[r].append(time.perf_counter() - t0)
    return {r: statistics.median(t) for r, t in times.items()}


def calibrate_token_cost(model, rows: int = CALIBRATION_ROWS) -> float:
    """β measured on this machine: the extra cost of each further row in one forward of the
    model's linear layers, relative to a one-row forward, clamped to TOKEN_COST_RANGE."""
    t = time_linears(model, [1, rows])
    beta = (t[rows] / t[1] - 1.0) / (rows - 1)
    lo, hi = TOKEN_COST_RANGE
    return min(hi, max(lo, beta))


def relative_step_time(draft, target) -> float:
    """A draft model's one-token forward relative to the target's, both measured (linear layers;
    a module they share, such as the LM head, counts in both)."""
    return time_linears(draft, [1])[1] / time_linears(target, [1])[1]
