"""benchmarks/eviction_headroom.py: per-block attention sums and the share of attention that
stream, h2o and the per-query oracle keep, on synthetic attention with known answers."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def headroom():
    return load_benchmark("eviction_headroom")


def causal_attention(layers: int, heads: int, T: int, seed: int = 0, boost: dict[int, float] | None = None):
    """Random causal softmax attention [1, H, T, T] per layer; `boost` adds logits to key positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        logits = torch.randn(1, heads, T, T, generator=g, dtype=torch.float64)
        for pos, add in (boost or {}).items():
            logits[..., pos] += add
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out.append(logits.softmax(-1).float())
    return out


def test_block_scores_sum_each_query_over_layers_heads_and_block(headroom):
    att = causal_attention(2, 3, 30)
    S = headroom.block_scores(att, 4)  # 30 tokens: 8 blocks, the last one half empty
    assert S.shape == (30, 8)
    ref = sum(a[0].double().sum(0) for a in att)  # [T, T] in float64
    for b in range(8):
        assert torch.allclose(S[:, b], ref[:, 4 * b:4 * b + 4].sum(-1), atol=1e-12)
    assert torch.allclose(S.sum(-1), torch.full((30,), 6.0, dtype=torch.float64), atol=1e-5)


def test_stream_keeps_the_sinks_and_the_recent_blocks(headroom):
    assert headroom.stream_kept(3, budget=6, sink=1) == [0, 1, 2, 3]  # everything still fits
    assert headroom.stream_kept(9, budget=6, sink=1) == [0, 5, 6, 7, 8, 9]
    assert headroom.stream_kept(9, budget=6, sink=2) == [0, 1, 6, 7, 8, 9]


def test_policies_on_synthetic_attention(headroom):
    att = causal_attention(2, 3, 96)
    S = headroom.block_scores(att, 4)
    # a budget that holds every block keeps all attention, whatever the policy
    full = headroom.retained(S, 4, budget=24, sink=1, per_row=6, start=0)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in full.values())
    tight = headroom.retained(S, 4, budget=8, sink=1, per_row=6, start=32)
    assert tight["oracle"] >= tight["stream"] - 1e-12 and tight["oracle"] >= tight["h2o"] - 1e-12
    assert tight["stream"] < 0.95  # random attention spreads out: eviction loses some

    # a heavy hitter in the middle (tokens 40..43 draw most of the attention once seen): stream
    # drops it when it leaves the window, h2o keeps it
    hh = causal_attention(2, 3, 96, boost={p: 6.0 for p in range(40, 44)})
    r = headroom.retained(headroom.block_scores(hh, 4), 4, budget=8, sink=1, per_row=6, start=80)
    assert r["h2o"] > r["stream"] + 0.3
    assert r["oracle"] >= r["h2o"] - 1e-12


def test_key_norms_per_block_match_float64(headroom):
    g = torch.Generator().manual_seed(1)
    keys = [torch.randn(1, 10, 2 * 8, generator=g) * (i + 1) for i in range(3)]  # 3 layers, 2 KV heads of 8
    got = headroom.block_key_norms(keys, num_kv_heads=2, block_size=4)  # blocks of 4, 4 and 2 tokens
    per_token = torch.zeros(10, dtype=torch.float64)
    for k in keys:
        n = torch.stack([k[0, :, h * 8:(h + 1) * 8].double().pow(2).sum(-1).sqrt() for h in range(2)], -1)
        per_token += (n / n.mean()).mean(-1)  # the layer's scale (x1, x2, x3) divides out
    want = torch.stack([per_token[0:4].mean(), per_token[4:8].mean(), per_token[8:10].mean()])
    assert torch.allclose(got, want, atol=1e-12)


def test_knorm_keeps_the_low_norm_blocks(headroom):
    hh = causal_attention(2, 3, 96, boost={p: 6.0 for p in range(40, 44)})
    S = headroom.block_scores(hh, 4)
    norms = torch.ones(24, dtype=torch.float64)
    norms[10] = 0.1  # the heavy hitter's block has the smallest keys
    r = headroom.retained(S, 4, budget=8, sink=1, per_row=6, start=80, key_norms=norms)
    assert r["knorm"] > r["stream"] + 0.3
    norms[10] = 5.0  # now the largest: the first to go
    r = headroom.retained(S, 4, budget=8, sink=1, per_row=6, start=80, key_norms=norms)
    assert r["knorm"] < r["h2o"] - 0.3
