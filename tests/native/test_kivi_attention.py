"""Decode attention on KIVI's codes (leanlm/native/kivi_attention.c) against the torch path that
dequantizes the blocks first, through the batching engine."""
import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.native import kivi
from leanlm.native import layers as native_layers

pytestmark = pytest.mark.skipif(kivi.kernel() is None, reason="no C compiler: the torch path is used")

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
           [7, 8, 9], list(range(30, 70))]


def run(path, kv, dtype, monkeypatch, native_on: bool):
    calls = []
    real = kivi.decode_attention

    def counted(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(kivi, "decode_attention", counted)
    # float32: decode steps run on the whole-layer executor, which calls the kernel from C
    real_run = native_layers.NativeLayers.run

    def counted_run(self, *a):
        out = real_run(self, *a)
        if out is not None:
            calls.append(True)
        return out

    monkeypatch.setattr(native_layers.NativeLayers, "run", counted_run)
    monkeypatch.setenv("LEANLM_NATIVE", "1" if native_on else "0")
    llm = LLM(path, dtype=dtype, kv=kv, enable_prefix_caching=False)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2))
    return outs, calls


@pytest.mark.parametrize("kv, dtype", [
    ("kivi:4", "float32"), ("kivi:8:g16", "float32"), ("kivi:2:g16:v3:c16", "float32"),
    ("kivi:3:g16:knorm", "float32"), ("kivi:4:g16:c16:rotate", "float32"),
    ("kivi:2:g16:r48:sink16", "float32"), ("kivi:4:g16", "bfloat16"),
    # s8: 8-bit scale codes and int8 zeros (keys per block, values per token group)
    ("kivi:4:g16:v3:c8:s8:rotate", "float32"), ("kivi:2:g16:c16:s8", "float32"),
    ("kivi:8:g16:s8", "float32"), ("kivi:3:g16:s8:knorm", "float32"),
    ("kivi:4:g16:sink16:v2:c16:s8", "float32"), ("kivi:4:g16:s8", "bfloat16"),
    # prerope: keys stored before RoPE, rotated in the kernel after dequantizing (rotate: v only)
    ("kivi:4:g16:prerope", "float32"), ("kivi:3:g16:v3:c16:s8:prerope:rotate", "float32"),
    ("kivi:2:g16:r48:sink16:prerope", "float32"), ("kivi:4:g16:prerope", "bfloat16"),
    # kmix: key channels at calibrated mixed widths
    ("kivi:3.5:g16:v4:c16:s8:prerope:rotate:kmix", "float32"), ("kivi:5:g16:v3:prerope:kmix", "bfloat16"),
    # stream: evicted blocks (negative ids) skipped by the kernel, masked on the torch path
    ("stream:16:sink16+kivi:4:g16:prerope", "float32"), ("stream:32:sink0+kivi:4:g16:v3:c16:s8:rotate", "float32"),
    ("stream:16+kivi:3.5:g16:v4:c16:s8:prerope:rotate:kmix", "float32"), ("stream:16+kivi:4:g16:s8", "bfloat16")])
def test_fused_decode_equals_dequantized_attention(tiny_model_dir, monkeypatch, kv, dtype):
    _fused_decode_equals_dequantized_attention(tiny_model_dir, monkeypatch, kv, dtype)


@pytest.fixture
def segment():
    """kivi_decode_attention's segment length, set low for one test (rows longer than it are
    split and merged) and restored after."""
    from leanlm.native import kivi as native_kivi

    yield native_kivi.set_segment
    native_kivi.set_segment(2048)


@pytest.mark.parametrize("kv, dtype", [
    ("kivi:4:g16:prerope", "float32"), ("kivi:2:g16:r48:sink16", "float32"),
    ("kivi:3.5:g16:v4:c16:s8:prerope:rotate:kmix", "float32"), ("kivi:4:g16:s8", "bfloat16"),
    # stream: whole segments evicted
    ("stream:16:sink16+kivi:4:g16:prerope", "float32"), ("stream:32:sink0+kivi:4:g16:v3:c16:s8:rotate", "float32")])
@pytest.mark.parametrize("seg", [16, 32])
def test_split_rows_equal_dequantized_attention(tiny_model_dir, monkeypatch, segment, kv, dtype, seg):
    """Rows longer than the segment are scored in pieces on separate threads and merged
    (flash-decoding): the same comparison with segments of one and two blocks."""
    segment(seg)
    _fused_decode_equals_dequantized_attention(tiny_model_dir, monkeypatch, kv, dtype)


def _fused_decode_equals_dequantized_attention(tiny_model_dir, monkeypatch, kv, dtype):
    path = str(tiny_model_dir("llama"))
    fused, calls = run(path, kv, dtype, monkeypatch, True)
    assert calls and all(calls)  # the kernel really ran (through the executor or per layer), never refused
    ref, ref_calls = run(path, kv, dtype, monkeypatch, False)
    assert not any(ref_calls)
    tol = 1e-4 if dtype == "float32" else 3e-2
    for a, b in zip(fused, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for tok, la, lb in zip(a.outputs[0].token_ids, a.outputs[0].logprobs, b.outputs[0].logprobs):
            # bfloat16: the torch path rounds the dequantized K/V to bf16, the kernel keeps float32,
            # so near-tied runner-up tokens may swap; the chosen token's logprob must agree
            for t in (lb if dtype == "float32" else [tok]):
                assert abs(la[t].logprob - lb[t].logprob) < tol, (kv, t)


@pytest.mark.parametrize("kv, corrupt", [
    ("kivi:4:g16", lambda c: c.ks[0][0].mul_(3)),
    ("kivi:4:g16:s8", lambda c: c.ks[0][0].add_(12)),   # 8-bit key scale codes: x2
    ("kivi:4:g16:s8", lambda c: c.kz[0][0].add_(8)),    # key zeros: +2 scales
    ("kivi:4:g16:s8", lambda c: c.vz[0][0].add_(8)),    # value zeros
    ("kivi:4:g16:prerope", lambda c: c.rope_sin.mul_(-1)),  # the RoPE tables: rotated the other way
    ("kivi:3.5:g16:v4:prerope:kmix", lambda c: c.kperm[0].copy_(c.kperm[0].flip(-1))),  # channel order
])
def test_kernel_catches_a_wrong_scale(tiny_model_dir, kv, corrupt):
    """Negative control: corrupting the scales or zeros the kernel reads changes its output, so
    the comparison above would notice a kernel that ignored them."""
    path = str(tiny_model_dir("llama"))
    llm = LLM(path, dtype="float32", kv=kv, enable_prefix_caching=False)
    llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4))
    codec = llm.engine.cache.codec
    q = torch.randn(1, llm.engine.model.cfg.num_heads, llm.engine.model.cfg.head_dim)
    tables, lens = torch.tensor([[0, 1]]), torch.tensor([20])
    a = codec.decode_attention(0, q, tables, lens)
    corrupt(codec)
    b = codec.decode_attention(0, q, tables, lens)
    assert a is not None and (a - b).abs().max() > 1e-3


def _random_codec(Hq, H, bs, nblocks, kbits, vbits, vgroup, s8, prerope, kmix_bits, knorm, seed):
    """A 64-channel KIVI cache (SmolLM2's head size, where the kernel's register paths run) with
    random codes, scales, zeros, residual rows and RoPE tables."""
    from leanlm.kv import kmix
    from leanlm.kv.quantized import KiviCodec, fill_random

    D = 64
    g = torch.Generator().manual_seed(seed)
    rope = (torch.randn(nblocks * bs, D, generator=g), torch.randn(nblocks * bs, D, generator=g)) if prerope else None
    plan = kmix.plan_from_weights([torch.rand(H, D, generator=g)], kmix_bits) if kmix_bits else None
    c = KiviCodec(1, nblocks, bs, H, D, torch.float32, "cpu", bits=kbits, max_partial=4, vbits=vbits,
                  vgroup=vgroup, scale_bits=8 if s8 else 16, rope=rope, key_plan=plan, knorm=knorm)
    fill_random(c, g)
    return c


@pytest.mark.parametrize("Hq, H", [(9, 3), (8, 2), (7, 1), (4, 4)])  # 3, 4, 7 and 1 query heads per KV head
@pytest.mark.parametrize("kbits, vbits, vgroup, s8, prerope, kmix_bits, knorm", [
    (4, 3, 32, True, True, None, False),    # the benchmarked codec: codes weighed straight into the heads (c32)
    (4, 4, 64, False, True, None, False),   # fp16 value scales, one group per head
    (2, 2, 16, True, False, None, False),   # post-RoPE keys; values in groups of 16 (dequantized into a buffer)
    (3, 3, 32, False, False, None, True),   # post-RoPE keys with per-token norms
    (3, 3, 32, False, True, None, False),
    (2, 4, 64, True, True, None, False),
    (3.5, 4, 32, True, True, 3.5, False),   # kmix: mixed key widths, 28 bytes a row (byte shuffles on AVX2)
    (2, 3, 32, False, True, 2, False),      # kmix rows of 16 bytes: one chunk
    (2.5, 3, 32, True, True, 2.5, False),   # 20 bytes: the last chunk overlaps the first
    (5.5, 4, 64, True, True, 5.5, False),   # 44 bytes: three chunks
    (8, 3, 32, False, True, 8, False),      # 64 bytes: four chunks, 8-bit codes
])
@pytest.mark.parametrize("bs", [64, 16])
@pytest.mark.parametrize("seg", [2048, 64])  # 64: rows of 130 and 200 tokens split and merged
def test_64_channel_heads_match_float64(segment, Hq, H, kbits, vbits, vgroup, s8, prerope, kmix_bits, knorm, bs,
                                        seg):
    """The kernel's 64-channel paths (keys dequantized, rotated and dotted in registers, 8 tokens'
    scores reduced together, value codes weighed straight into each head's accumulators) against
    attention in float64 over what the torch path dequantizes (read_blocks). Lengths leave partial
    groups of 8 and partial blocks, whose residual rows the kernel reads as stored."""
    segment(seg)
    lens = [37, 130, 64, 200]
    nblk = -(-max(lens) // bs)
    c = _random_codec(Hq, H, bs, len(lens) * nblk, int(kbits), vbits, vgroup, s8, prerope, kmix_bits, knorm,
                      seed=Hq + bs)
    tables = torch.arange(len(lens) * nblk).view(len(lens), nblk)
    for b, n in enumerate(lens):  # a partly filled last block lives in a residual row
        if n % bs:
            c.res_row[tables[b, (n - 1) // bs]] = b
    q = torch.randn(len(lens), Hq, 64, generator=torch.Generator().manual_seed(1))
    out = c.decode_attention(0, q, tables, torch.tensor(lens))
    assert out is not None
    k, v = c.read_blocks(0, tables)
    G = Hq // H
    for b, n in enumerate(lens):
        kb = k[b, :n].double().repeat_interleave(G, dim=1)  # [n, Hq, D]
        vb = v[b, :n].double().repeat_interleave(G, dim=1)
        p = (torch.einsum("hd,nhd->hn", q[b].double(), kb) / 8).softmax(-1)
        ref = torch.einsum("hn,nhd->hd", p, vb)
        torch.testing.assert_close(out[b].double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
