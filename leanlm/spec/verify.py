"""The lossless verifier: one target forward gave logits for [last token, d_1..d_k]; decide how
many drafts to keep and the one token that follows them.

- Greedy rows: keep drafts while each equals the target's argmax; the next token is the argmax
  at the first mismatch (or after the last draft): exactly what plain greedy decoding emits.
- Sampled rows (Leviathan et al. / Chen et al. speculative sampling): keep d_j with probability
  min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw from norm(max(0, p_j - q_j)); when
  all k are kept draw a bonus token from p_k. The emitted tokens follow p exactly, whatever q is.
  A proposer without a distribution (n-gram) proposes deterministically: q is one-hot.

Randomness comes from each sequence's own generator, so a seeded request is reproducible
whatever else shares the batch.
"""
from __future__ import annotations

import torch


def greedy_accept(argmax: list[int], draft: list[int]) -> list[int]:
    """Target argmax of each of the k + 1 rows -> the tokens to emit (accepted drafts + one)."""
    a = 0
    while a < len(draft) and draft[a] == argmax[a]:
        a += 1
    return draft[:a] + [argmax[a]]


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What to draw from after rejecting a draft from q: norm(max(0, p - q))."""
    r = (p - q).clamp_min_(0)
    total = r.sum()
    # p == q to rounding: a rejection is (almost) impossible, and p itself is then right
    return r / total if total > 0 else p


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from probs [V]: argmax(p / E) with E i.i.d. Exp(1) (as the sampler draws)."""
    u = torch.rand(probs.shape, generator=generator, device=probs.device)
    e = u.log_().neg_().clamp_min_(torch.finfo(u.dtype).tiny)
    return int((probs / e).argmax())


def speculative_sample(p: torch.Tensor, draft: list[int], q: torch.Tensor | None,
                       generator: torch.Generator | None) -> list[int]:
    """p [k+1, V] target probabilities, draft k tokens, q [k, V] their draft probabilities (None:
    one-hot, a deterministic proposer) -> the tokens to emit (accepted drafts + one)."""
    k = len(draft)
    if k == 0:
        return [_draw(p[0], generator)]
    idx = torch.tensor(draft, device=p.device)
    rows = torch.arange(k, device=p.device)
    p_d = p[rows, idx]
    q_d = torch.ones_like(p_d) if q is None else q[rows, idx]
    u = torch.rand(k, generator=generator, device=p.device)
    ok = (u * q_d < p_d).tolist()  # u < p/q without dividing by q
    a = ok.index(False) if False in ok else k
    if a == k:
        return draft + [_draw(p[k], generator)]
    qa = torch.zeros_like(p[a]).index_fill_(0, idx[a:a + 1], 1.0) if q is None else q[a]
    return draft[:a] + [_draw(_residual(p[a], qa), generator)]
