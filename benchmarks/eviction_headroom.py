"""How much attention a block-eviction policy keeps: the headroom for score-based eviction
(H2O-style heavy hitters) over StreamingLLM's sinks + recent window, before building one.

leanlm's paged cache evicts whole blocks, and one block table serves every layer and KV head. So
any policy keeps one set of blocks per sequence. This script runs the model with full attention
(transformers, eager, float32) over WikiText-2 windows, then sums each query's attention
probabilities per block over all layers and heads: S[t, b]. The share of attention a kept set K
retains at query t, averaged over layers and heads, is sum_{b in K} S[t, b] / (layers x heads).
Each policy below has the same budget of blocks:
- stream: the sink blocks and the most recent blocks (`--kv stream:WINDOW:sinkS`);
- h2o: the sink blocks, half the rest as the most recent blocks, and the other half the blocks
  with the largest attention accumulated over past queries. Greedy, as in H2O: an evicted block
  never comes back. Scores come from full attention, not from attention over the kept blocks;
- knorm: as h2o, but the other half holds the blocks whose keys have the smallest L2 norm (mean over
  tokens, layers and KV heads, each layer's norms divided by their mean). Low-norm keys draw much
  of the attention (Devoto et al., 2024), and a key's norm is known when it is written, with no
  attention scores;
- oracle: the best kept set for each query alone (top-k of S[t]). It is an upper bound that no
  causal policy reaches.

A retained share is not a perplexity, but a policy that keeps less attention than stream will not
beat it.

    python benchmarks/eviction_headroom.py [--windows 2] [--budget 832 576 320] [--sink 64]
"""
from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table


def block_scores(attentions, block_size: int) -> torch.Tensor:
    """Per-layer attention probabilities [1, H, T, T] -> S [T, nblocks]: each query's probability
    mass per key block, summed over layers and heads (the sum over keys of a row is layers x heads)."""
    T = attentions[0].shape[-1]
    nb = -(-T // block_size)
    total = torch.zeros(T, nb * block_size, dtype=torch.float64)
    for a in attentions:
        total[:, :T] += a[0].double().sum(0)
    return total.view(T, nb, block_size).sum(-1)


def block_key_norms(keys, num_kv_heads: int, block_size: int) -> torch.Tensor:
    """Per-layer keys [1, T, Hkv * D] -> [nblocks]: each block's mean key L2 norm over its tokens,
    the layers and KV heads, each layer's norms divided by that layer's mean first (so no layer's
    scale dominates)."""
    T = keys[0].shape[1]
    total = torch.zeros(T, dtype=torch.float64)
    for k in keys:
        n = k[0].double().view(T, num_kv_heads, -1).norm(dim=-1)  # [T, Hkv]
        total += (n / n.mean()).mean(-1)
    nb = -(-T // block_size)
    padded = torch.cat((total, total.new_full((nb * block_size - T,), float("nan"))))
    return padded.view(nb, block_size).nanmean(-1)


def stream_kept(qb: int, budget: int, sink: int) -> list[int]:
    """Blocks kept for a query in block qb: the sinks and the most recent budget - sink blocks."""
    if qb + 1 <= budget:
        return list(range(qb + 1))
    return list(range(sink)) + list(range(qb + 1 - (budget - sink), qb + 1))


def _admit(kept: list[int], qb: int, budget: int, sink: int, recent: int, worth) -> None:
    """Block qb enters a greedy set; while it is over budget, the least worth block that is neither
    a sink nor recent leaves (for good)."""
    kept.append(qb)
    while len(kept) > budget:
        kept.remove(min((b for b in kept if sink <= b < qb + 1 - recent), key=worth))


def retained(S: torch.Tensor, block_size: int, budget: int, sink: int, per_row: float,
             start: int, key_norms: torch.Tensor | None = None) -> dict[str, float]:
    """Mean share of attention each policy keeps over the queries at positions >= start
    (knorm only when key_norms, one per block, are given)."""
    T, _ = S.shape
    out = {"stream": [], "h2o": [], "oracle": []}
    if key_norms is not None:
        out["knorm"] = []
    recent = (budget - sink) // 2
    score = torch.zeros(S.shape[1], dtype=torch.float64)
    kept: list[int] = []
    kept_norm: list[int] = []
    for t in range(T):
        qb = t // block_size
        if t % block_size == 0:  # a new block enters the greedy sets
            _admit(kept, qb, budget, sink, recent, lambda b: score[b].item())
            if key_norms is not None:
                _admit(kept_norm, qb, budget, sink, recent, lambda b: -key_norms[b].item())
        row = S[t]
        score += row  # H2O accumulates every query's attention per block
        if t < start:
            continue
        out["stream"].append(row[stream_kept(qb, budget, sink)].sum().item() / per_row)
        out["h2o"].append(row[kept].sum().item() / per_row)
        if key_norms is not None:
            out["knorm"].append(row[kept_norm].sum().item() / per_row)
        k = min(budget, qb + 1)
        out["oracle"].append(row[: qb + 1].topk(k).values.sum().item() / per_row)
    return {name: sum(v) / len(v) for name, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=2, help="consecutive 2,048-token WikiText-2 windows")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--budget", type=int, nargs="+", default=[832, 576, 320],
                    help="tokens kept (sink included; multiples of the block size)")
    ap.add_argument("--sink", type=int, default=64, help="tokens always kept at the start")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: the embedded model)")
    args = ap.parse_args()
    bs = args.block_size
    for n in (*args.budget, args.sink):
        if n <= 0 or n % bs:
            ap.error(f"--budget and --sink take positive multiples of the block size {bs}, got {n}")
    if any(b <= args.sink for b in args.budget):
        ap.error(f"every --budget must exceed --sink {args.sink}: {args.budget}")

    import transformers as tf
    from tokenizers import Tokenizer

    from leanlm.bench.data import find_data_file, read_text
    from leanlm.models.embedded import resolve_embedded

    path = args.model or str(resolve_embedded())
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    cfg = model.config
    per_row = cfg.num_hidden_layers * cfg.num_attention_heads
    ids = Tokenizer.from_file(f"{path}/tokenizer.json").encode(
        read_text(find_data_file("wikitext2_test_gptq_joined.txt"))).ids
    if len(ids) < args.windows * args.ctx:
        raise SystemExit(f"--windows {args.windows} x --ctx {args.ctx} needs {args.windows * args.ctx} tokens; "
                         f"the text has {len(ids)}")
    sums: dict[int, dict[str, float]] = {}
    for w in track(range(args.windows), description="windows"):
        x = torch.tensor([ids[w * args.ctx:(w + 1) * args.ctx]])
        keys = []
        hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: keys.append(o))
                 for layer in model.model.layers]
        try:
            with torch.no_grad():
                att = model(x, output_attentions=True).attentions
        finally:
            for h in hooks:
                h.remove()
        S = block_scores(att, bs)
        norms = block_key_norms(keys, cfg.num_key_value_heads, bs)
        del att, keys
        for budget in args.budget:
            r = retained(S, bs, budget // bs, args.sink // bs, per_row, start=budget, key_norms=norms)
            for k, v in r.items():
                sums.setdefault(budget, {}).setdefault(k, 0.0)
                sums[budget][k] += v / args.windows
    table = Table(title=f"attention kept per query, mean over layers, heads and queries past the budget "
                        f"({args.windows} windows of {args.ctx}, blocks of {bs}, sink {args.sink})")
    for col in ("budget (tokens)", "stream", "h2o", "knorm", "oracle (per query)"):
        table.add_column(col, justify="right")
    for budget in args.budget:
        r = sums[budget]
        table.add_row(str(budget), *(f"{r[k]:.2%}" for k in ("stream", "h2o", "knorm", "oracle")))
    Console().print(table)


if __name__ == "__main__":
    main()
