"""The native float32 layer glue (leanlm/native/ops.c) against float64 references, and its use
in the model: the same logits as the torch ops, and verification rows equal decode steps."""
import pytest
import torch
import torch.nn.functional as F

from leanlm.models.layers import RotaryEmbedding
from leanlm.native import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason="no C compiler: the torch path is used")


def _rms_ref(x, w, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("M, N", [(1, 576), (5, 64), (70, 40), (3, 17)])
def test_rms_norm_and_fused_add(M, N):
    g = torch.Generator().manual_seed(M + N)
    x, h, w = torch.randn(M, N, generator=g), torch.randn(M, N, generator=g), torch.randn(N, generator=g)
    assert (ops.rms_norm(x, w, 1e-5).double() - _rms_ref(x, w, 1e-5)).abs().max() < 1e-5
    x0 = x.clone()
    s, out = ops.add_rms_norm(x, h, w, 1e-5)
    assert torch.equal(x, x0)  # the residual input is not modified (callers may keep it)
    assert torch.equal(s, x + h)
    assert (out.double() - _rms_ref(x + h, w, 1e-5)).abs().max() < 1e-5
    assert not torch.allclose(out, ops.rms_norm(x, w, 1e-5))  # negative control: the add counts


def test_silu_mul():
    g = torch.Generator().manual_seed(1)
    gu = torch.randn(7, 2 * 96, generator=g) * 4
    ref = F.silu(gu[:, :96].double()) * gu[:, 96:].double()
    assert (ops.silu_mul(gu).double() - ref).abs().max() < 1e-5


def test_silu_vector_exp_over_the_whole_range():
    """The 16-wide exp (range reduction + polynomial, clamped) against float64 from -100 to 100,
    odd widths (the scalar tail), and what torch gives for inf / nan."""
    x = torch.cat([torch.linspace(-100, 100, 40001), torch.tensor([1e-30, -1e-30, 0.0])])
    x = torch.cat([x, torch.tensor([float("inf"), float("nan")])]).reshape(1, -1)  # width 40006
    y = ops.silu_mul(torch.cat([x, torch.ones_like(x)], dim=1))[0].double()
    ref = F.silu(x.double())[0]
    ok = torch.isfinite(ref) & (ref.abs() > 1e-30)
    assert ((y[ok] - ref[ok]).abs() / ref[ok].abs()).max() < 1e-6
    assert y[-2] == float("inf") and torch.isnan(y[-1])


@pytest.mark.parametrize("heads, D", [(12, 64), (3, 32), (2, 6)])
def test_rope_in_place_matches_the_module(heads, D):
    rope = RotaryEmbedding(D, 4096, 10000.0, None, torch.float32)
    pos = torch.tensor([0, 3, 77, 4000])
    tables = rope.tables(pos)
    x = torch.randn(4, heads * D + 40)  # trailing columns (v) must be left alone
    ref = RotaryEmbedding.apply(x[:, : heads * D].double().view(4, heads, D),
                                tuple(t.double() for t in tables)).reshape(4, -1)
    y = x.clone()
    ops.rope_(y, heads, D, *tables)
    assert (y[:, : heads * D].double() - ref).abs().max() < 1e-5
    assert torch.equal(y[:, heads * D:], x[:, heads * D:])


def _paged_reference(q, kc, vc, tables, lens, bs):
    R, Hq, D = q.shape
    Hkv = kc.shape[1]
    out = torch.empty(R, Hq, D, dtype=torch.float64)
    for r in range(R):
        slots = torch.cat([torch.arange(b * bs, b * bs + bs) for b in tables[r].tolist()])[: lens[r]]
        k, v = kc[slots].double().transpose(0, 1), vc[slots].double().transpose(0, 1)  # [Hkv, L, D]
        qq = q[r].double().view(Hkv, Hq // Hkv, D)
        p = torch.softmax(qq @ k.transpose(1, 2) / D ** 0.5, dim=-1)
        out[r] = (p @ v).reshape(Hq, D)
    return out


@pytest.mark.parametrize("Hq, Hkv, D", [(9, 3, 64), (4, 4, 32), (6, 2, 20), (8, 1, 128)])
def test_paged_attention_matches_float64(Hq, Hkv, D):
    g = torch.Generator().manual_seed(Hq * D)
    bs, nblk = 16, 5
    kc, vc = torch.randn(40 * bs, Hkv, D, generator=g), torch.randn(40 * bs, Hkv, D, generator=g)
    tables = torch.stack([torch.randperm(40, generator=g)[:nblk] for _ in range(4)])
    lens = torch.tensor([1, 16, 17, 80])
    q = torch.randn(4, Hq, D, generator=g)
    out = ops.paged_attention(q, kc, vc, tables, lens, bs)
    assert (out.double() - _paged_reference(q, kc, vc, tables, lens, bs)).abs().max() < 1e-5
    # negative control: another block order gives another answer to the rows that read only some
    # of their blocks (row 3 reads all 5, in any order the same set: its softmax does not care)
    other = ops.paged_attention(q, kc, vc, tables.flip(1).contiguous(), lens, bs)
    for r in range(3):
        assert not torch.allclose(other[r], out[r])


@pytest.mark.parametrize("Hq, Hkv, D, bf16", [(9, 3, 64, False), (9, 3, 64, True), (6, 2, 20, False)])
def test_paged_attention_skips_evicted_blocks(Hq, Hkv, D, bf16):
    """kv stream:...: a negative block id is an evicted block; the row attends to its other
    tokens only, as the float64 reference over the kept slots (fast D=64 and generic paths)."""
    g = torch.Generator().manual_seed(D)
    bs = 16
    kc, vc = torch.randn(40 * bs, Hkv, D, generator=g), torch.randn(40 * bs, Hkv, D, generator=g)
    if bf16:
        kc, vc = kc.bfloat16(), vc.bfloat16()
    tables = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(3)])
    tables[0, 1:3] = -1  # sink block, two evicted, the window
    tables[1, 0] = -1    # no sink
    tables[2, 2] = -1
    lens = torch.tensor([90, 40, 96])
    q = torch.randn(3, Hq, D, generator=g)
    out = ops.paged_attention(q, kc, vc, tables, lens, bs)
    for r in range(3):
        kept = [(i, b) for i, b in enumerate(tables[r].tolist()) if b >= 0]
        slots = torch.cat([torch.arange(b * bs, b * bs + bs)[: max(0, min(bs, lens[r] - i * bs))] for i, b in kept])
        k, v = kc[slots].double().transpose(0, 1), vc[slots].double().transpose(0, 1)
        qq = q[r].double().view(Hkv, Hq // Hkv, D)
        ref = (torch.softmax(qq @ k.transpose(1, 2) / D ** 0.5, dim=-1) @ v).reshape(Hq, D)
        assert (out[r].double() - ref).abs().max() < 1e-5, r
    # negative control: the same rows with nothing evicted (block 0 in those places) differ
    full = ops.paged_attention(q, kc, vc, tables.clamp(min=0), lens, bs)
    for r in range(3):
        assert not torch.allclose(full[r], out[r])


def test_paged_attention_on_bfloat16_pages_matches_float64():
    """bfloat16 pages (the bf16 cache under float32 compute) are widened exactly as they are read:
    the float64 reference on the same bf16 values agrees to float32 rounding."""
    g = torch.Generator().manual_seed(7)
    bs = 16
    kc = torch.randn(40 * bs, 3, 64, generator=g).bfloat16()
    vc = torch.randn(40 * bs, 3, 64, generator=g).bfloat16()
    tables = torch.stack([torch.randperm(40, generator=g)[:5] for _ in range(4)])
    lens = torch.tensor([1, 16, 33, 80])
    q = torch.randn(4, 9, 64, generator=g)
    out = ops.paged_attention(q, kc, vc, tables, lens, bs)
    assert (out.double() - _paged_reference(q, kc, vc, tables, lens, bs)).abs().max() < 1e-5
    # the same values in float32 pages give the same answer up to the sum order
    assert (out - ops.paged_attention(q, kc.float(), vc.float(), tables, lens, bs)).abs().max() < 1e-5
    with pytest.raises(TypeError, match="bfloat16"):
        ops.paged_attention(q, kc, vc.float(), tables, lens, bs)  # mixed page dtypes
    big = torch.zeros(16, 1, 320, dtype=torch.bfloat16)  # wider than the kernel's 256-float row buffer
    with pytest.raises(ValueError, match="head_dim <= 256"):
        ops.paged_attention(torch.randn(1, 1, 320), big, big, torch.zeros(1, 1, dtype=torch.long),
                            torch.ones(1, dtype=torch.long), 16)


def test_paged_attention_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(3)
    kc, vc = torch.randn(320, 3, 64, generator=g), torch.randn(320, 3, 64, generator=g)
    tables = torch.arange(20).repeat(6, 1)
    lens = torch.tensor([5, 50, 51, 52, 200, 320])
    q = torch.randn(6, 9, 64, generator=g)
    together = ops.paged_attention(q, kc, vc, tables, lens, 16)
    for r in range(6):
        assert torch.equal(ops.paged_attention(q[r:r + 1], kc, vc, tables[r:r + 1], lens[r:r + 1], 16),
                           together[r:r + 1])


def test_bad_operands_are_refused():
    with pytest.raises(TypeError, match="int64"):
        ops.paged_attention(torch.randn(1, 2, 8), torch.randn(16, 2, 8), torch.randn(16, 2, 8),
                            torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.long), 16)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_engine_on_native_ops_matches_the_torch_ops(tiny_model_dir, monkeypatch, arch):
    """The same greedy tokens and logprobs (to float32 rounding) with and without the native glue
    (qwen2: qkv bias; qwen3: q/k norms, where RoPE stays on torch)."""
    from leanlm import LLM, SamplingParams

    path, prompt = str(tiny_model_dir(arch)), [[5, 17, 42, 99, 3, 250], [7, 8, 9]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    llm = LLM(path, dtype="float32")
    assert llm.engine.model.layers[0].native and llm.engine.cache.fused_rows
    native_out = llm.generate(prompt, params)
    monkeypatch.setenv("LEANLM_NATIVE", "0")
    llm = LLM(path, dtype="float32")
    assert not llm.engine.model.layers[0].native and not llm.engine.cache.fused_decode
    for a, b in zip(native_out, llm.generate(prompt, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for t in lb:
                assert abs(la[t].logprob - lb[t].logprob) < 1e-4


def test_verification_rows_equal_decode_steps_bit_for_bit(tiny_model_dir):
    """Batch-invariant matmuls, row-wise glue and row-by-row attention: the logprobs speculative
    decoding reports (from verification rows) are exactly those of plain decode steps."""
    from leanlm import LLM, SamplingParams

    path = str(tiny_model_dir("llama"))
    prompt = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]  # repetitive: n-gram drafts get accepted
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    plain = LLM(path, dtype="float32").generate(prompt, params)[0].outputs[0]
    llm = LLM(path, dtype="float32", spec="ngram:n=1:k=4")
    spec = llm.generate(prompt, params)[0].outputs[0]
    assert llm.engine.stats().spec.accepted > 0
    assert spec.token_ids == plain.token_ids
    for a, b in zip(plain.logprobs, spec.logprobs):
        assert {t: e.logprob for t, e in a.items()} == {t: e.logprob for t, e in b.items()}


@pytest.mark.parametrize("arch, quant", [("llama", None), ("qwen2", None), ("llama", "rtn:int8"),
                                         ("mistral", None)])
def test_whole_layer_path_equals_the_module_path_bit_for_bit(tiny_model_dir, arch, quant):
    """native/layers.py runs all layers in one call; it must compute exactly what the modules
    (on the same native kernels) compute: decode steps, a batch, and verification chunks."""
    from leanlm import LLM, SamplingParams
    from leanlm.native import layers as native_layers

    path = str(tiny_model_dir(arch))
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11], [3] * 40]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=5)
    calls = []
    real_run = native_layers.NativeLayers.run

    def counting_run(self, *a):
        calls.append(a[0].shape[0])
        return real_run(self, *a)

    outs = []
    for whole_layers in (True, False):
        llm = LLM(path, dtype="float32", quant=quant, spec="ngram:n=1:k=4")
        llm.engine.model.native = whole_layers
        native_layers.NativeLayers.run = counting_run
        try:
            outs.append(llm.generate(prompts, params))
        finally:
            native_layers.NativeLayers.run = real_run
        if whole_layers:
            assert calls and max(calls) > 1  # it ran, verification chunks included
            n_calls = len(calls)
    assert len(calls) == n_calls  # the module path did not call it
    for a, b in zip(*outs):
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert {t: e.logprob for t, e in x.items()} == {t: e.logprob for t, e in y.items()}


def test_whole_layer_path_rebuilds_when_a_weight_is_replaced(tiny_model_dir):
    """Descriptors hold raw pointers: replacing a layer's weight after loading must not leave
    them pointing at the old (freed) tensor."""
    from leanlm import LLM, SamplingParams

    path = str(tiny_model_dir("llama"))
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
    llm = LLM(path, dtype="float32")
    llm.generate([[1, 2, 3]], p)
    model = llm.engine.model
    lin = model.layers[0].mlp.down_proj
    lin._buffers["packed_weight"] = lin._buffers["packed_weight"].clone() * 3  # a new tensor
    got = llm.generate([[1, 2, 3]], p)[0].outputs[0]
    model.native = False
    ref = llm.generate([[1, 2, 3]], p)[0].outputs[0]
    assert got.token_ids == ref.token_ids
    for x, y in zip(got.logprobs, ref.logprobs):
        assert {t: e.logprob for t, e in x.items()} == {t: e.logprob for t, e in y.items()}


def test_a_dropped_cache_is_freed(tiny_model_dir):
    """The model keeps its executors per cache weakly: a cache used once and dropped (another
    engine's, an eval's) must not stay alive, with its KV pool, for the model's lifetime."""
    import gc
    import weakref

    from leanlm import LLM
    from leanlm.kv.cache import SeqSlice
    from leanlm.kv.codecs import PlainCodec
    from leanlm.kv.paged import PagedKVCache

    model = LLM(str(tiny_model_dir("llama")), dtype="float32").engine.model
    cfg = model.cfg
    codec = PlainCodec(cfg.num_layers, 4 * 16, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    cache = PagedKVCache(codec, 4, 16, "cpu", cfg.num_kv_heads, enable_prefix_caching=False)
    handle, _ = cache.admit([], 64)
    assert cache.reserve(handle, 3)
    ctx = cache.prepare([SeqSlice(handle, 0, 3, 0)])
    with torch.inference_mode():
        model(torch.tensor([1, 2, 3]), torch.arange(3), cache, ctx)
    assert model._native[cache].ok  # the step ran on the native layers
    pool = weakref.ref(codec.k[0])
    del cache, codec, ctx, handle
    gc.collect()
    assert pool() is None and len(model._native) == 0  # (the engine itself has not run a step)
