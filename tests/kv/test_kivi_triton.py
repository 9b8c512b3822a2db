"""KIVI's Triton kernels (leanlm/kv/kivi_triton.py): decode attention on the codes against float64
attention over what the torch path dequantizes, value quantization against the torch quantizer,
and the batching engine with the kernels against the engine without them.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1,
set before the kernels' first import); on a GPU machine the same tests run them compiled."""
import gc

import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.kv import kivi_triton
from leanlm.kv.quantized import KiviCodec, fill_random, unpack_codes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def kernels(monkeypatch):
    """The kernels on this machine's device: interpreted on a CPU (tests/conftest.py sets
    TRITON_INTERPRET before anything imports triton)."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(kivi_triton, "INTERPRET_ON_CPU", True)
    mod = kivi_triton._kernels()
    assert DEVICE.type == "cuda" or type(mod.attention).__name__ == "InterpretedFunction"
    return kivi_triton


def _codec(H, bs, nblocks, kbits, vbits, vgroup, s8, prerope, seed, D=64):
    g = torch.Generator().manual_seed(seed)
    rope = (torch.randn(nblocks * bs, D, generator=g), torch.randn(nblocks * bs, D, generator=g)) if prerope else None
    c = KiviCodec(1, nblocks, bs, H, D, torch.float32, "cpu", bits=kbits, max_partial=4, vbits=vbits,
                  vgroup=vgroup, scale_bits=8 if s8 else 16, rope=rope)
    fill_random(c, g)
    return c


def _to(codec, device):
    """The codec's tensors moved to `device` (the codec is built on the CPU for fill_random)."""
    for name in ("kc", "vc", "ks", "kz", "vs", "vz", "rk", "rv"):
        setattr(codec, name, [t.to(device) for t in getattr(codec, name)])
    codec.res_row = codec.res_row.to(device)
    if codec.rope_cos is not None:
        codec.rope_cos, codec.rope_sin = codec.rope_cos.to(device), codec.rope_sin.to(device)
    codec.device = device
    return codec


@pytest.mark.parametrize("Hq, H", [(9, 3), (4, 4)])  # 3 and 1 query heads per KV head
@pytest.mark.parametrize("kbits, vbits, vgroup, s8, prerope", [
    (4, 3, 32, True, True),    # the benchmarked codec (kivi:4:g64:v3:c32:s8:prerope:rotate)
    (4, 4, 64, False, True),   # fp16 value scales, one group per head
    (2, 2, 16, True, False),   # post-RoPE keys
    (3, 3, 8, False, False),   # 3-bit codes straddling bytes, keys and values
    (8, 8, 32, True, True),
])
@pytest.mark.parametrize("bs", [64, 16])
def test_attention_matches_float64(kernels, Hq, H, kbits, vbits, vgroup, s8, prerope, bs):
    """Rows of several lengths (partial blocks in residual rows, a block evicted by a stream
    window) against float64 attention over read_blocks' dequantized K/V."""
    lens = [37, 130, 64, 200]
    nblk = -(-max(lens) // bs)
    c = _codec(H, bs, len(lens) * nblk, kbits, vbits, vgroup, s8, prerope, seed=Hq + bs)
    tables = torch.arange(len(lens) * nblk).view(len(lens), nblk)
    for b, n in enumerate(lens):  # a partly filled last block lives in a residual row
        if n % bs:
            c.res_row[tables[b, (n - 1) // bs]] = b
    evicted = tables.clone()
    evicted[3, 1] = -1  # row 3's second block dropped (stream): the kernel skips it
    q = torch.randn(len(lens), Hq, 64, generator=torch.Generator().manual_seed(1))
    k, v = c.read_blocks(0, tables)  # (on the CPU, before the move)
    _to(c, DEVICE)
    out = kernels.decode_attention(c, 0, q.to(DEVICE), evicted.to(DEVICE), torch.tensor(lens, device=DEVICE)).cpu()
    G = Hq // H
    for b, n in enumerate(lens):
        keep = torch.ones(n, dtype=torch.bool)
        if b == 3:
            keep[bs:2 * bs] = False
        kb = k[b, :n][keep].double().repeat_interleave(G, dim=1)  # [n, Hq, D]
        vb = v[b, :n][keep].double().repeat_interleave(G, dim=1)
        p = (torch.einsum("hd,nhd->hn", q[b].double(), kb) / 8).softmax(-1)
        ref = torch.einsum("hn,nhd->hd", p, vb)
        torch.testing.assert_close(out[b].double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_attention_reads_the_scales_and_rope_tables(kernels):
    """Negative control: scaled keys, moved value zeros or RoPE turned the other way change the
    output, so the comparison above would notice a kernel that ignored them."""
    c = _to(_codec(3, 16, 8, 4, 3, 32, True, True, seed=5), DEVICE)
    q = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    tables, lens = torch.arange(8, device=DEVICE).view(2, 4), torch.tensor([50, 64], device=DEVICE)
    base = kernels.decode_attention(c, 0, q, tables, lens)
    for corrupt in (lambda: c.ks[0].mul_(3), lambda: c.vz[0].add_(8), lambda: c.rope_sin.mul_(-1)):
        corrupt()
        assert (kernels.decode_attention(c, 0, q, tables, lens) - base).abs().max() > 1e-3
        base = kernels.decode_attention(c, 0, q, tables, lens)


@pytest.mark.parametrize("vbits, vgroup", [(2, 16), (3, 32), (4, 64), (8, 8)])
def test_quant_values_equals_the_torch_quantizer(kernels, vbits, vgroup):
    """The s8 value quantizer gives the torch quantizer's codes, scale codes and zeros, also for a
    constant group, a group far from zero and one spanning a huge range."""
    g = torch.Generator().manual_seed(vbits)
    v = torch.randn(7, 3, 64, generator=g) * 3 + 1
    v[0, 0, :vgroup] = 0.5
    v[1, 1] += 40.0
    v[2, 2, :8] *= 1e3
    slots = torch.tensor([3, 17, 40, 41, 63, 5, 90])
    ours, ref = (_codec(3, 16, 8, 4, vbits, vgroup, True, False, seed=0) for _ in range(2))
    ref._write_tokens(v, slots, vbits, ref.vc[0], ref.vs[0], ref.vz[0])
    _to(ours, DEVICE)
    assert kernels.quant_values(ours, 0, v.to(DEVICE), slots.to(DEVICE))
    at = lambda t: t.cpu().flatten(0, 1)[slots]
    assert torch.equal(at(ours.vs[0]), at(ref.vs[0])) and torch.equal(at(ours.vz[0]), at(ref.vz[0]))
    a, b = (unpack_codes(at(c.vc[0]), vbits).int() for c in (ours, ref))
    if DEVICE.type == "cpu":
        assert torch.equal(a, b)
    else:  # a fused multiply-add may round a code at a tie the other way
        assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 1e-2


def test_unsupported_codecs_are_left_to_torch():
    for kw in ({"ktoken": True}, {"knorm": True}):
        c = KiviCodec(1, 4, 16, 2, 64, torch.float32, "cpu", bits=4, max_partial=2, **kw)
        assert not kivi_triton.supports(c, torch.device("cuda"))
    c = KiviCodec(1, 4, 16, 2, 64, torch.float32, "cpu", bits=4, max_partial=2)
    assert not kivi_triton.supports(c, torch.device("cpu"))  # the CPU has the C kernel
    assert not kivi_triton.quant_values(c, 0, torch.zeros(1, 2, 64), torch.zeros(1, dtype=torch.long))  # fp16 scales


PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
           [7, 8, 9], list(range(30, 70))]


def _generate(path, kv, monkeypatch, triton_on: bool):
    monkeypatch.setenv("LEANLM_NATIVE", "0")  # on a CPU: the torch path, or the interpreted kernels
    calls = []
    real = kivi_triton.decode_attention

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(kivi_triton, "decode_attention", counted)
    monkeypatch.setattr(kivi_triton, "_have_triton", lambda: triton_on)
    llm = LLM(path, dtype="float32", kv=kv, enable_prefix_caching=False, device=str(DEVICE))
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2))
    del llm
    gc.collect()
    return outs, len(calls)


@pytest.mark.parametrize("kv", ["kivi:4:g16:v3:c16:s8:prerope:rotate", "kivi:2:g16:r48:sink16",
                                "stream:32:sink0+kivi:4:g16:v3:c16:rotate"])
def test_engine_with_kernels_equals_the_torch_path(kernels, tiny_model_dir, monkeypatch, kv):
    """Greedy generation through the batching engine with the kernels (attention and value
    writes) equals the torch path's, token for token, logprobs within 1e-4."""
    path = str(tiny_model_dir("llama"))
    ours, n_ours = _generate(path, kv, monkeypatch, True)
    ref, n_ref = _generate(path, kv, monkeypatch, False)
    assert n_ours > 0 and n_ref == 0  # the kernels really ran, and only in the first run
    for a, b in zip(ours, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for t in lb:
                assert abs(la[t].logprob - lb[t].logprob) < 1e-4, (kv, t)


def test_a_kernel_that_fails_leaves_kivi_to_torch(kernels, tiny_model_dir, monkeypatch):
    """A launch that raises (triton unable to compile for this GPU, say) warns once and hands
    every later step to the torch path, whose outputs the engine then gives."""
    path = str(tiny_model_dir("llama"))
    kv = "kivi:4:g16:v3:c16:s8:prerope:rotate"
    ref, _ = _generate(path, kv, monkeypatch, False)

    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("no compiler for this GPU")

    launches = []

    def broken_kernels():
        launches.append(1)
        return type("K", (), {"attention": Broken(), "quantize": Broken()})

    monkeypatch.setattr(kivi_triton, "_kernels", broken_kernels)
    monkeypatch.setattr(kivi_triton, "_failure", None)
    with pytest.warns(RuntimeWarning, match="no compiler for this GPU"):
        ours, _ = _generate(path, kv, monkeypatch, True)
    assert len(launches) == 1 and "no compiler" in kivi_triton._failure  # tried once, then left alone
    for a, b in zip(ours, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
