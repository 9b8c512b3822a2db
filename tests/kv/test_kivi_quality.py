"""KIVI's full-precision window (rR, R > G) and attention sinks (sinkS): which blocks are read in
full precision for a sequence length (the res_row invariant a fused kernel relies on), exact
reads of those blocks and float64-bounded reads of the others, greedy decoding == chunk-1
scoring through the engine, rows given back, prefix-cache hits refused, spec errors.

A window or sinks need the sequence structure of a step (which blocks are one sequence's, and
where), which the slot mapping alone does not carry: the paged cache calls
codec.plan_step(seqs, slot_mapping) in prepare()."""
from types import SimpleNamespace

import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.kv.quantized import KiviCodec, full_precision_blocks
from leanlm.kv.spec import KVSpec, build_codec

L, H, D, BS = 2, 2, 64, 16
CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.mark.parametrize("length, residual, sink, expected", [
    (5, 16, 0, [0]), (16, 16, 0, []), (17, 16, 0, [1]),            # R = G: the partial block only
    (47, 48, 0, [0, 1, 2]), (48, 48, 0, [1, 2]), (49, 48, 0, [1, 2, 3]),  # R-G..R-1 tokens
    (64, 48, 0, [2, 3]), (100, 48, 16, [0, 4, 5, 6]), (32, 16, 32, [0, 1]),
    (33, 48, 32, [0, 1, 2]), (200, 16, 32, [0, 1, 12]), (20, 64, 0, [0, 1]),
])
def test_full_precision_blocks(length, residual, sink, expected):
    assert full_precision_blocks(length, BS, residual, sink) == expected


def sample(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, D, generator=g, dtype=torch.float64) * torch.exp(torch.randn(1, H, D, generator=g))
    x[:, :, 3] *= 40
    return x.bfloat16().float()  # bf16-representable: the residual (bf16 under float32) reads back exactly


def step(codec, seqs, k, v):
    """One step of several sequences: seqs = [(table, start, n)], k/v [sum n, H, D]."""
    slices, slots = [], []
    for blocks, start, n in seqs:
        slices.append(SimpleNamespace(kv=SimpleNamespace(blocks=blocks), start=start, n=n))
        slots += [blocks[p // BS] * BS + p % BS for p in range(start, start + n)]
    slots = torch.tensor(slots)
    codec.plan_step(slices, slots)
    for layer in range(L):
        codec.write(layer, slots, k, v)


@pytest.mark.parametrize("bits, residual, sink, chunks", [
    (4, 48, 0, [1] * 70), (4, 48, 0, [37, 40, 1, 3]), (2, 32, 16, [64, 5, 1, 30]), (3, 16, 32, [100])])
def test_window_and_sink_reads(bits, residual, sink, chunks):
    """After every step the res_row of the sequence's blocks is full_precision_blocks(length); those
    blocks read back exactly, the others within the asymmetric quantizer's bound; a second sequence
    interleaved in the same steps does not change the first one's state; release frees every row."""
    qmax = (1 << bits) - 1
    codec = KiviCodec(L, 24, BS, H, D, torch.float32, CPU, bits, max_partial=2, residual=residual, sink=sink)
    assert codec.rk[0].shape[0] == 2 * (residual + sink) // BS
    n = sum(chunks)
    a, b = list(range(0, 24, 2))[: -(-n // BS)], list(range(1, 24, 2))[: -(-n // BS)]
    ka, va, kb, vb = sample(n, 0), sample(n, 1), sample(n, 2), sample(n, 3)
    pos = 0
    for c in chunks:
        sl = slice(pos, pos + c)
        step(codec, [(a, pos, c), (b, pos, c)], torch.cat((ka[sl], kb[sl])), torch.cat((va[sl], vb[sl])))
        pos += c
        fp = full_precision_blocks(pos, BS, residual, sink)
        for table in (a, b):
            held = [j for j, blk in enumerate(table[: -(-pos // BS)]) if codec.res_row[blk] >= 0]
            assert held == fp
    for table, k, v in ((a, ka, va), (b, kb, vb)):
        kh, vh = codec.read_blocks(1, torch.tensor([table]))
        kh, vh = kh[0, :n].double(), vh[0, :n].double()
        for j in range(-(-n // BS)):
            t = slice(j * BS, min(n, (j + 1) * BS))
            if j in fp:
                assert torch.equal(kh[t], k[t].double()) and torch.equal(vh[t], v[t].double())
            else:
                ks = codec.ks[1][table[j]].double()
                assert ((kh[t] - k[t].double()).abs() <= ks * (0.5 + 2.0**-23 * qmax) + 2.0**-22 * k[t].double().abs()).all()
                assert not torch.equal(kh[t], k[t].double())
    codec.release(a)
    codec.release(b)
    assert len(codec._free_rows) == codec.rk[0].shape[0] and (codec.res_row == -1).all()
    assert not codec._held and not codec._owner


def test_window_needs_the_step_plan():
    codec = KiviCodec(L, 4, BS, H, D, torch.float32, CPU, 4, max_partial=1, sink=16)
    with pytest.raises(RuntimeError, match="need the cache to call codec.plan_step"):
        codec.write(0, torch.arange(3), sample(3, 0), sample(3, 1))


@pytest.mark.parametrize("text", ["kivi:2:g16:r48:sink16", "kivi:3:g16:sink32:rotate", "kivi:4:g16:r32"])
def test_memory_accounting_counts_the_rows(text):
    codec = build_codec(KVSpec.parse(text), L, 6, BS, H, D, torch.bfloat16, CPU, max_seqs=3)
    spec = KVSpec.parse(text)
    rows = 3 * ((spec.residual or BS) + spec.sink) // BS
    assert codec.fixed_bytes() == 2 * L * rows * BS * H * D * 2
    allocated = sum(t.numel() * t.element_size() for t in codec.tensors())
    assert codec.allocated_bytes() == allocated == 6 * BS * codec.bytes_per_token() + codec.fixed_bytes()
    assert codec.spec == str(spec)


@pytest.mark.parametrize("text, match", [
    ("kivi:4:g16:r24", "r24 must be a multiple of the group g16"),
    ("kivi:4:g32:r16", "r16 must be >= the group g32"),
    ("kivi:4:g16:sink8", "sink8 must be a multiple of the group g16"),
    ("kivi:4:sinkx", "'sinkx': expected sinkS once"),
    ("kivi:4:sink16:sink32", "expected sinkS once"),
])
def test_bad_specs_name_the_value(text, match):
    with pytest.raises(ValueError, match=match) as e:
        KVSpec.parse(text)
    assert "allowed:" in str(e.value)
    with pytest.raises(ValueError, match="sink24 must be a multiple of the block size 16"):
        KiviCodec(L, 4, BS, H, D, torch.float32, CPU, 4, max_partial=1, sink=24)
    with pytest.raises(ValueError, match="window r8 must be a multiple of the block size 16"):
        KiviCodec(L, 4, BS, H, D, torch.float32, CPU, 4, max_partial=1, residual=8)


def test_spec_round_trip():
    for text in ["kivi:2:g16:r64:sink16:c64:rotate", "kivi:4:g64:sink64:v3:c64:rotate"]:
        assert str(KVSpec.parse(text)) == text


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def prompts(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (9 + 23 * i,), generator=g).tolist() for i in range(n)]


KV = ["kivi:2:g16:r48:sink16", "kivi:2:g16:sink32:rotate"]


@pytest.mark.parametrize("kv", KV)
def test_greedy_decoding_is_chunk1_scoring(path, kv):
    """Token-by-token decoding reads each block as the window/sink rules say at every length;
    score(chunk=1) writes and reads the same cache token by token: the logprobs agree, and a
    chunked score (chunk 40 sees blocks leave the window mid-chunk) does not."""
    llm = LLM(path, dtype="float32", kv=kv, enable_prefix_caching=False)
    prompt = prompts(1, seed=5)[0][:1]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=80, ignore_eos=True, logprobs=0))[0]
    decoded = torch.tensor([next(iter(lp.values())).logprob for lp in out.outputs[0].logprobs], dtype=torch.float64)
    seq = prompt + out.outputs[0].token_ids
    scored = llm.score(seq, chunk=1)
    torch.testing.assert_close(scored, decoded, rtol=0, atol=2e-5)
    assert (llm.score(seq, chunk=40) - decoded).abs().max() > 1e-3
    plain = LLM(path, dtype="float32", kv=kv.replace(":r48", "").replace(":sink16", "").replace(":sink32", ""),
                enable_prefix_caching=False)
    assert (plain.score(seq, chunk=1) - decoded).abs().max() > 1e-3  # the window/sink changes the reads


@pytest.mark.parametrize("kv", KV)
def test_batched_equals_alone_and_rows_come_back(path, kv):
    llm = LLM(path, dtype="float32", kv=kv, enable_prefix_caching=False)
    ps = prompts()
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in ps]
    assert [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)] == alone
    codec = llm.engine.cache.codec
    assert len(codec._free_rows) == codec.rk[0].shape[0] and not codec._held and (codec.res_row == -1).all()


def test_prefix_cache_hit_on_a_full_precision_block_is_refused(path):
    """A block's full-precision copy lives while its writer holds it, so a prefix-cache hit could
    not read a sink / window block the way a recomputation would: a clear error, not a silent
    difference (with prefix caching off the outputs are the recomputed ones)."""
    shared = prompts(1, seed=4)[0] * 4
    llm = LLM(path, dtype="float32", kv="kivi:4:g16:sink16")
    llm.generate([shared + [5, 6]], GREEDY)
    with pytest.raises(RuntimeError, match="enable_prefix_caching=False"):
        llm.generate([shared + [8, 9]], GREEDY)
