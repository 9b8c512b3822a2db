"""Perplexity under block eviction policies, simulated in transformers before building any of them
into leanlm: stream (sinks + recent blocks), h2o (heavy hitters by accumulated attention) and
knorm (smallest key L2 norms), all keeping one set of blocks for all layers and heads, as leanlm's
shared block tables must.

Each WikiText-2 window is fed in chunks of --chunk tokens over a float32 KV cache. Before each
chunk, the policy evicts down to the budget of blocks (`eviction_headroom.py` defines the
policies). The chunk's queries then see the kept blocks plus their own chunk, causally, through a
custom 4D attention mask. h2o's scores are the attention the run itself gives each block, over the
kept blocks. knorm divides each layer's key norms by that layer's running mean. Here every query
of a chunk sees the same kept blocks; leanlm's `stream` gives each row its own window. So compare
the three with each other, not with `leanlm eval ppl`.

    python benchmarks/eviction_ppl.py [--windows 2] [--budget 832] [--sink 64] [--chunk 64]
"""
from __future__ import annotations

import argparse
import math

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from eviction_headroom import _admit, stream_kept

POLICIES = ("full", "stream", "h2o", "knorm")


class Evictor:
    """The kept blocks of one window under one policy (budget and sink in blocks)."""

    def __init__(self, policy: str, budget: int, sink: int, num_blocks: int):
        self.policy, self.budget, self.sink = policy, budget, sink
        self.recent = (budget - sink) // 2
        self.kept: list[int] = []
        self.score = torch.zeros(num_blocks, dtype=torch.float64)  # h2o: attention; knorm: key norms
        self.count = torch.zeros(num_blocks, dtype=torch.float64)

    def admit(self, first: int, end: int) -> None:
        """Blocks first..end-1 were written; evict down to the budget (before the next chunk)."""
        for qb in range(first, end):
            if self.policy in ("full", "stream"):
                self.kept = list(range(qb + 1)) if self.policy == "full" else \
                    stream_kept(qb, self.budget, self.sink)
            elif self.policy == "h2o":
                _admit(self.kept, qb, self.budget, self.sink, self.recent, lambda b: self.score[b].item())
            else:  # knorm: the mean normalized key norm of the block's tokens; the largest go first
                _admit(self.kept, qb, self.budget, self.sink, self.recent,
                       lambda b: -(self.score[b] / self.count[b]).item())


def window_nll(model, ids: torch.Tensor, policy: str, budget: int, sink: int, bs: int, chunk: int):
    """Summed negative log-likelihood and token count of one window under one policy."""
    from transformers import DynamicCache

    T = ids.shape[0]
    ev = Evictor(policy, budget, sink, -(-T // bs))
    cache, nll, count = DynamicCache(), 0.0, 0
    keys: list[torch.Tensor] = []
    layer_means = [[0.0, 0] for _ in model.model.layers]  # knorm: running sum and count per layer
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: keys.append(o))
             for layer in model.model.layers] if policy == "knorm" else []
    try:
        for c0 in range(0, T, chunk):
            x = ids[c0:c0 + chunk]
            q, kv = x.shape[0], c0 + x.shape[0]
            seen = torch.zeros(kv, dtype=torch.bool)
            for b in ev.kept:
                seen[b * bs:(b + 1) * bs] = True
            seen[c0:] = True
            allowed = seen.expand(q, kv) & (torch.arange(kv) <= torch.arange(c0, kv).unsqueeze(1))
            mask = torch.zeros(1, 1, q, kv).masked_fill(~allowed, torch.finfo(torch.float32).min)
            keys.clear()
            with torch.no_grad():
                out = model(x[None], past_key_values=cache, attention_mask=mask,
                            position_ids=torch.arange(c0, kv)[None], use_cache=True,
                            output_attentions=policy == "h2o")
            logp = out.logits[0].float().log_softmax(-1)
            targets = ids[c0 + 1:kv + 1]
            nll -= logp[: targets.shape[0]].gather(1, targets[:, None]).sum().item()
            count += targets.shape[0]
            nb = -(-kv // bs)
            if policy == "h2o":  # each block's attention this chunk, over all layers, heads, queries
                mass = torch.zeros(nb * bs, dtype=torch.float64)
                for a in out.attentions:
                    mass[:kv] += a[0].double().sum((0, 1))
                ev.score[:nb] += mass.view(nb, bs).sum(-1)
            if policy == "knorm":
                per_token = torch.zeros(q, dtype=torch.float64)
                for k, lm in zip(keys, layer_means):
                    n = k[0].double().view(q, model.config.num_key_value_heads, -1).norm(dim=-1)
                    lm[0] += n.sum().item()
                    lm[1] += n.numel()
                    per_token += (n / (lm[0] / lm[1])).mean(-1)
                blocks = torch.arange(c0, kv) // bs
                ev.score.index_add_(0, blocks, per_token)
                ev.count.index_add_(0, blocks, torch.ones_like(per_token))
            ev.admit(c0 // bs, nb)
    finally:
        for h in hooks:
            h.remove()
    return nll, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=832, help="tokens kept before a chunk (sink included)")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: the embedded model)")
    args = ap.parse_args()
    bs = args.block_size
    for name, n in (("--budget", args.budget), ("--sink", args.sink), ("--chunk", args.chunk)):
        if n <= 0 or n % bs:
            ap.error(f"{name} takes a positive multiple of the block size {bs}, got {n}")
    if args.budget <= args.sink:
        ap.error(f"--budget {args.budget} must exceed --sink {args.sink}")

    import transformers as tf
    from tokenizers import Tokenizer

    from leanlm.bench.data import find_data_file, read_text
    from leanlm.models.embedded import resolve_embedded

    path = args.model or str(resolve_embedded())
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor(Tokenizer.from_file(f"{path}/tokenizer.json").encode(
        read_text(find_data_file("wikitext2_test_gptq_joined.txt"))).ids)
    totals = {p: [0.0, 0] for p in args.policies}
    for w in track(range(args.windows), description="windows"):
        window = ids[w * args.ctx:(w + 1) * args.ctx]
        for p in args.policies:
            nll, n = window_nll(model, window, p, args.budget // bs, args.sink // bs, bs, args.chunk)
            totals[p][0] += nll
            totals[p][1] += n
    table = Table(title=f"perplexity under eviction ({args.windows} windows of {args.ctx}, chunk {args.chunk}, "
                        f"budget {args.budget} tokens incl. sink {args.sink}, float32 cache)")
    for col in ("policy", "perplexity", "vs full"):
        table.add_column(col, justify="right")
    full = math.exp(totals["full"][0] / totals["full"][1]) if "full" in totals else None
    for p, (nll, n) in totals.items():
        ppl = math.exp(nll / n)
        table.add_row(p, f"{ppl:.4f}", f"{ppl / full - 1:+.2%}" if full else "—")
    Console().print(table)


if __name__ == "__main__":
    main()
