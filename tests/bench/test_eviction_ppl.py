"""benchmarks/eviction_ppl.py on a tiny random llama: with nothing evicted every policy equals a
plain forward pass; under a tight budget each policy hides blocks, and which ones is its own."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import load_benchmark, save_tiny_model


@pytest.fixture(scope="module")
def evppl():
    return load_benchmark("eviction_ppl")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import transformers as tf

    path = save_tiny_model("llama", tmp_path_factory.mktemp("evppl") / "m")
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def plain_nll(model, ids):
    with torch.no_grad():
        logp = model(ids[None]).logits[0].log_softmax(-1)
    return -logp[:-1].gather(1, ids[1:, None]).sum().item()


def test_nothing_evicted_equals_a_plain_forward(evppl, model):
    ids = torch.randint(0, 300, (96,), generator=torch.Generator().manual_seed(0))
    want = plain_nll(model, ids)
    for policy in evppl.POLICIES:  # a budget of all 24 blocks: chunked decoding, no eviction
        nll, n = evppl.window_nll(model, ids, policy, budget=24, sink=1, bs=4, chunk=8)
        assert n == 95
        assert nll == pytest.approx(want, rel=1e-5), policy


def test_policies_keep_their_own_blocks(evppl, model):
    ids = torch.randint(0, 300, (96,), generator=torch.Generator().manual_seed(1))
    full = evppl.window_nll(model, ids, "full", budget=6, sink=1, bs=4, chunk=8)[0]
    got = {p: evppl.window_nll(model, ids, p, budget=6, sink=1, bs=4, chunk=8)[0] for p in ("stream", "h2o", "knorm")}
    for p, nll in got.items():  # a 6-block budget on 24 blocks hides most of the context
        assert nll != pytest.approx(full, rel=1e-6), p
    assert len({round(v, 6) for v in got.values()}) == 3  # three different kept sets

    ev = evppl.Evictor("stream", budget=6, sink=1, num_blocks=24)
    ev.admit(0, 12)
    assert ev.kept == [0, 7, 8, 9, 10, 11]
    ev = evppl.Evictor("knorm", budget=6, sink=1, num_blocks=24)
    ev.score[:12], ev.count[:12] = torch.arange(12.0).flip(0), 1.0  # early blocks have the largest keys
    ev.admit(0, 12)  # recent = 2: blocks 10, 11; the sink 0; then the 3 smallest norms of 1..9
    assert sorted(ev.kept) == [0, 7, 8, 9, 10, 11]
    ev.score[:12] = torch.arange(12.0)  # now early blocks have the smallest keys
    ev.kept = []
    ev.admit(0, 12)
    assert sorted(ev.kept) == [0, 1, 2, 3, 10, 11]
