"""The paged KV cache against a float64 reference attention: decodes over scattered and adjacent
blocks, prefill chunks after a cached prefix, sliding windows, and the memory budget."""
import pytest
import torch

from leanlm.kv.cache import SeqSlice
from leanlm.kv.codecs import PlainCodec
from leanlm.kv.paged import PagedKVCache, kv_budget_bytes

from tests.kv.test_cache import ref_attention

Hq, Hkv, D, BS = 4, 2, 8, 4


def make_cache(num_blocks=32, window=None, prefix=True):
    codec = PlainCodec(1, num_blocks * BS, BS, Hkv, D, torch.float32, torch.device("cpu"))
    return PagedKVCache(codec, num_blocks, BS, "cpu", Hkv, window, prefix)


def fill(cache, handle, k, v, g):
    """Prefill a sequence's k/v through attend (chunk of all its tokens)."""
    assert cache.reserve(handle, len(k))
    cache.attend(0, torch.randn(len(k), Hq, D, generator=g), k, v, cache.prepare([SeqSlice(handle, 0, len(k), 0)]))


@pytest.mark.parametrize("scatter", [False, True])
def test_decode_matches_float64_reference(scatter):
    g = torch.Generator().manual_seed(0)
    cache = make_cache()
    lens = [3, 9, 6]
    handles = [cache.admit([], 0)[0] for _ in lens]
    if scatter:  # interleave block allocation so no sequence owns adjacent blocks
        for step in range(1, 4):
            for h, n in zip(handles, lens):
                cache.reserve(h, min(n + 1, step * BS))
    history = [(torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g)) for n in lens]
    for h, (k, v) in zip(handles, history):
        fill(cache, h, k, v, g)
    for h, n in zip(handles, lens):
        assert cache.reserve(h, n + 1)
    if scatter:
        assert all(h.blocks != list(range(h.blocks[0], h.blocks[0] + len(h.blocks))) for h in handles[1:])
    q = torch.randn(3, Hq, D, generator=g)
    k_new, v_new = torch.randn(3, Hkv, D, generator=g), torch.randn(3, Hkv, D, generator=g)
    ctx = cache.prepare([SeqSlice(h, n, 1, i) for i, (h, n) in enumerate(zip(handles, lens))])
    out = cache.attend(0, q, k_new, v_new, ctx)
    for i, (k, v) in enumerate(history):
        ref = ref_attention(q[i], torch.cat([k, k_new[i:i + 1]]), torch.cat([v, v_new[i:i + 1]]))
        assert torch.allclose(out[i].double(), ref, atol=1e-5)
    # a lone sequence in adjacent blocks is read as a view (no gather) and gives the same answer
    ctx1 = cache.prepare([SeqSlice(handles[1], lens[1], 1, 0)])
    assert (ctx1.decodes[0].first_slot is not None) == (not scatter)
    out1 = cache.attend(0, q[1:2], k_new[1:2], v_new[1:2], ctx1)
    assert torch.allclose(out1[0], out[1], atol=1e-6)


def test_mixed_step_of_decodes_in_length_groups_and_a_prefill_chunk():
    """One step holding decodes of very different lengths (split into length groups) and the
    first chunk of a new prompt between them: every row matches the float64 reference."""
    g = torch.Generator().manual_seed(3)
    cache = make_cache(num_blocks=64)
    lens = [40, 4, 37, 5]
    handles = [cache.admit([], 0)[0] for _ in lens]
    history = [(torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g)) for n in lens]
    for h, (k, v) in zip(handles, history):
        fill(cache, h, k, v, g)
        assert cache.reserve(h, len(k) + 1)
    new = cache.admit([], 0)[0]
    assert cache.reserve(new, 6)
    k6, v6, q6 = (torch.randn(6, Hkv, D, generator=g), torch.randn(6, Hkv, D, generator=g),
                  torch.randn(6, Hq, D, generator=g))
    qd = torch.randn(4, Hq, D, generator=g)
    kd, vd = torch.randn(4, Hkv, D, generator=g), torch.randn(4, Hkv, D, generator=g)
    # batch order: decode 0, decode 1, the 6-token chunk, decode 2, decode 3
    q = torch.cat([qd[:2], q6, qd[2:]])
    k = torch.cat([kd[:2], k6, kd[2:]])
    v = torch.cat([vd[:2], v6, vd[2:]])
    offsets = [0, 1, 8, 9]
    slices = [SeqSlice(h, n, 1, o) for h, n, o in zip(handles, lens, offsets)]
    slices.insert(2, SeqSlice(new, 0, 6, 2))
    ctx = cache.prepare(slices)
    assert len(ctx.decodes) == 2 and len(ctx.prefills) == 1  # lengths 40/37 and 4/5 apart
    out = cache.attend(0, q, k, v, ctx)
    for i, ((kh, vh), o) in enumerate(zip(history, offsets)):
        ref = ref_attention(qd[i], torch.cat([kh, kd[i:i + 1]]), torch.cat([vh, vd[i:i + 1]]))
        assert torch.allclose(out[o].double(), ref, atol=1e-5)
    for i in range(6):
        assert torch.allclose(out[2 + i].double(), ref_attention(q6[i], k6[:i + 1], v6[:i + 1]), atol=1e-5)


@pytest.mark.parametrize("scatter", [False, True])
def test_prefill_chunk_after_cached_prefix(scatter):
    g = torch.Generator().manual_seed(1)
    cache = make_cache()
    other = cache.admit([], 0)[0]
    h = cache.admit([], 0)[0]
    k, v = torch.randn(13, Hkv, D, generator=g), torch.randn(13, Hkv, D, generator=g)
    q = torch.randn(13, Hq, D, generator=g)
    for start, n in [(0, 5), (5, 6), (11, 2)]:  # three chunks
        if scatter:
            cache.reserve(other, len(other.blocks) * BS + 1)  # steal the next block in between
        assert cache.reserve(h, start + n)
        out = cache.attend(0, q[start:start + n], k[start:start + n], v[start:start + n],
                           cache.prepare([SeqSlice(h, start, n, 0)]))
        for i in range(n):
            p = start + i
            assert torch.allclose(out[i].double(), ref_attention(q[p], k[:p + 1], v[:p + 1]), atol=1e-5)


def test_sliding_window_in_decode_and_prefill():
    g = torch.Generator().manual_seed(2)
    cache = make_cache(window=3)
    h = cache.admit([], 0)[0]
    k, v, q = (torch.randn(8, Hkv, D, generator=g), torch.randn(8, Hkv, D, generator=g),
               torch.randn(8, Hq, D, generator=g))
    assert cache.reserve(h, 8)
    out = cache.attend(0, q[:7], k[:7], v[:7], cache.prepare([SeqSlice(h, 0, 7, 0)]))
    for i in range(7):
        lo = max(0, i - 2)
        assert torch.allclose(out[i].double(), ref_attention(q[i], k[lo:i + 1], v[lo:i + 1]), atol=1e-5)
    out = cache.attend(0, q[7:], k[7:], v[7:], cache.prepare([SeqSlice(h, 7, 1, 0)]))
    assert torch.allclose(out[0].double(), ref_attention(q[7], k[5:8], v[5:8]), atol=1e-5)


def test_prefix_blocks_are_shared_and_released():
    cache = make_cache(num_blocks=8)
    tokens = list(range(10))
    a, cached = cache.admit(tokens, 32)
    assert cached == 0 and cache.reserve(a, 10)
    cache.commit(a, tokens, 10)                     # two full blocks become shareable
    b, cached = cache.admit(tokens + [99, 98], 32)
    assert cached == 8 and b.blocks == a.blocks[:2]  # the same physical blocks
    assert cache.usage() == (3, 5, BS)
    cache.release(a)
    cache.release(b)
    assert cache.usage() == (0, 8, BS)
    assert cache.prefix_stats() == (10 + 12, 8)  # tokens looked up by both admissions, tokens found


def test_budget_parsing():
    cpu = torch.device("cpu")
    assert kv_budget_bytes(2**20, cpu) == 2**20
    frac = kv_budget_bytes(0.01, cpu)
    default = kv_budget_bytes(None, cpu)
    assert 0 < frac < default <= 4 * 2**30
