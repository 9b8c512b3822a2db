"""The contiguous KV cache and its static decode view (the compiled path) against a float64
reference attention, and compiled decoding against eager decoding."""
import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.kv.cache import ContiguousKVCache, SeqSlice, StaticDecodeView


def ref_attention(q, keys, values):
    """q [Hq, D], keys/values [L, Hkv, D] -> [Hq, D] in float64 (GQA by head groups)."""
    q, keys, values = q.double(), keys.double(), values.double()
    group = q.shape[0] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v)


@pytest.mark.parametrize("static", [False, True])
def test_decode_attention_matches_float64_reference(static):
    g = torch.Generator().manual_seed(0)
    Hq, Hkv, D, lens = 4, 2, 8, [3, 7, 5]
    cache = ContiguousKVCache(1, Hkv, D, torch.float32, "cpu")
    rows = [cache.allocate(16) for _ in lens]
    history = [(torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g)) for n in lens]
    for r, (k, v) in zip(rows, history):  # prefill each row
        cache.attend(0, torch.randn(len(k), Hq, D, generator=g), k, v, cache.prepare([SeqSlice(r, 0, len(k), 0)]))
    q = torch.randn(3, Hq, D, generator=g)
    k_new, v_new = torch.randn(3, Hkv, D, generator=g), torch.randn(3, Hkv, D, generator=g)
    slices = [SeqSlice(r, n, 1, i) for i, (r, n) in enumerate(zip(rows, lens))]
    if static:
        ctx = cache.prepare(slices)
        out = StaticDecodeView(cache, *ctx.row_range).attend(0, q, k_new, v_new, torch.tensor(lens))
    else:
        out = cache.attend(0, q, k_new, v_new, cache.prepare(slices))
    for i, (k, v) in enumerate(history):
        ref = ref_attention(q[i], torch.cat([k, k_new[i:i + 1]]), torch.cat([v, v_new[i:i + 1]]))
        assert torch.allclose(out[i].double(), ref, atol=1e-5)
        assert torch.equal(cache.k[0][rows[i], :, lens[i]], k_new[i])  # the new key was stored


def test_sliding_window_masks_old_tokens():
    g = torch.Generator().manual_seed(1)
    cache = ContiguousKVCache(1, 1, 4, torch.float32, "cpu", sliding_window=3)
    row = cache.allocate(8)
    k, v = torch.randn(6, 1, 4, generator=g), torch.randn(6, 1, 4, generator=g)
    q = torch.randn(6, 1, 4, generator=g)
    out = cache.attend(0, q, k, v, cache.prepare([SeqSlice(row, 0, 6, 0)]))
    for i in range(6):
        lo = max(0, i - 2)
        assert torch.allclose(out[i].double(), ref_attention(q[i], k[lo:i + 1], v[lo:i + 1]), atol=1e-5)


def test_memory_accounting_and_slot_reuse():
    cache = ContiguousKVCache(2, 2, 8, torch.bfloat16, "cpu")
    assert cache.bytes_per_token() == 2 * 2 * 2 * 8 * 2
    a, b = cache.allocate(10), cache.allocate(10)
    assert (a, b) == (0, 1)
    assert cache.allocated_bytes() == cache.rows * cache.max_len * cache.bytes_per_token()
    cache.free(a)
    assert cache.allocate(5) == a  # a freed slot is handed out again


def test_compiled_decode_equals_eager(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    prompts = [[5, 17, 42], [7] * 11, [250, 1, 2, 3]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    eager = LLM(path).generate(prompts, params)
    compiled = LLM(path, compile=True).generate(prompts, params)
    for e, c in zip(eager, compiled):
        assert e.outputs[0].token_ids == c.outputs[0].token_ids
        for le, lc in zip(e.outputs[0].logprobs, c.outputs[0].logprobs):
            t = next(iter(le))
            assert abs(le[t].logprob - lc[t].logprob) < 1e-4


def test_compiled_decode_follows_new_shapes(tiny_model_dir):
    """Decode steps of a shape already seen skip dynamo's full guards (runner._decode): a new
    batch size (the cache's rows regrown into new buffers) must still get its own graph, and
    going back to an earlier shape must pick the earlier graph, not the latest one."""
    path = str(tiny_model_dir("llama"))
    eager, compiled = LLM(path), LLM(path, compile=True)
    runs = [([[5, 17, 42], [7] * 11], 5),             # 2 rows
            ([[250, 1, 2, 3]], 5),                    # 1 row
            ([[9, 8, 7], [4] * 20, [100, 101]], 40),  # 3 rows: the buffers regrow (4 rows)
            ([[5, 17, 42], [7] * 11], 5)]             # back to 2 rows
    for prompts, max_tokens in runs:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        want = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
        got = [o.outputs[0].token_ids for o in compiled.generate(prompts, params)]
        assert got == want, (len(prompts), max_tokens)
    assert len(compiled.engine.runner._warm_decode_shapes) >= 3
