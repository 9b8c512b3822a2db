"""KV codecs through the engine: the plain codec is the engine without codecs; every codec gives the
same outputs batched as alone; kivi:8 keeps greedy outputs; prefix caching never mixes codecs;
score(chunk=1) is token-by-token decoding; bfp:16:reorder keeps the logits; eval ppl --kv."""
import json

import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.cli import main
from leanlm.kv.bfp import fold_key_order, key_pair_order
from leanlm.kv.codecs import PlainCodec
from leanlm.kv.paged import PagedKVCache

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
CODECS = ["fp32", "bf16", "fp16", "fp8:e4m3", "fp8:e5m2", "kivi:8", "kivi:4", "kivi:2",
          "bfp:8", "bfp:4:b8:reorder", "bfp:16:reorder", "kivi:3:rotate", "kivi:4:v2:c8", "xquant:4:cl",
          "kivi:4:v3:s8:prerope:rotate"]


def prompts(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (9 + 11 * i,), generator=g).tolist() for i in range(n)]


def ids(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def plain(path):
    return LLM(path, dtype="float32")


def test_plain_codec_is_the_engine_without_codecs(path, plain):
    same = LLM(path, dtype="float32", kv="fp32")
    assert same.engine.cache.codec.spec == "fp32" and same.engine.cache.codec.exact
    assert ids(same.generate(prompts(), GREEDY)) == ids(plain.generate(prompts(), GREEDY))
    for chunk in (1, 7, 64):
        assert torch.equal(same.score(prompts()[3], chunk=chunk), plain.score(prompts()[3], chunk=chunk))


@pytest.mark.parametrize("kv", CODECS)
def test_batched_equals_alone(path, kv):
    llm = LLM(path, dtype="float32", kv=kv, enable_prefix_caching=False)
    ps = prompts()
    alone = [ids(llm.generate([p], GREEDY))[0] for p in ps]
    assert ids(llm.generate(ps, GREEDY)) == alone
    assert llm.engine.stats().kv_blocks_used == 0
    if kv.startswith("kivi"):  # every residual row came back
        assert len(llm.engine.cache.codec._free_rows) == llm.engine.config.max_num_seqs


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_kivi8_keeps_greedy_outputs(tiny_model_dir, arch):
    path = str(tiny_model_dir(arch))
    ps = prompts(seed=3)
    plain = ids(LLM(path, dtype="float32").generate(ps, GREEDY))
    assert ids(LLM(path, dtype="float32", kv="kivi:8").generate(ps, GREEDY)) == plain
    assert ids(LLM(path, dtype="float32", kv="kivi:8:prerope").generate(ps, GREEDY)) == plain


@pytest.mark.parametrize("kv", ["kivi:4", "fp8:e4m3", "bfp:4:b8:reorder"])
def test_prefix_cache_hits_give_the_recomputed_outputs(path, kv):
    shared = prompts(1, seed=4)[0] * 4
    a, b = shared + [5, 6, 7], shared + [8, 9]
    fresh = LLM(path, dtype="float32", kv=kv, enable_prefix_caching=False)
    expected = ids(fresh.generate([a], GREEDY)) + ids(fresh.generate([b], GREEDY))
    cached = LLM(path, dtype="float32", kv=kv)
    assert ids(cached.generate([a], GREEDY)) + ids(cached.generate([b], GREEDY)) == expected
    assert cached.engine.stats().prefix_cache_hits == len(shared) // 16 * 16


def test_prefix_cache_never_mixes_codecs(path):
    """The codec spec salts every block hash: the same tokens never match across codecs."""
    tokens = list(range(3, 40))
    tables = {}
    for kv in ["plain", "fp32", "kivi:4:g16", "kivi:8:g16", "fp8:e4m3"]:
        codec = PlainCodec(1, 64, 16, 2, 16, torch.float32, torch.device("cpu"), spec=kv)
        cache = PagedKVCache(codec, 4, 16, "cpu", 2, salt="model")
        table, _ = cache.admit(tokens, 64)
        cache.reserve(table, len(tokens))
        cache.commit(table, tokens, len(tokens))
        tables[kv] = table.hashes
        assert cache.admit(tokens, 64)[1] == 32  # the same codec finds its own blocks
    hashes = [h for hs in tables.values() for h in hs]
    assert len(set(hashes)) == len(hashes) == 5 * 2


@pytest.mark.parametrize("kv", ["kivi:2", "fp8:e5m2"])
def test_score_chunk1_is_token_by_token_decoding(path, kv):
    llm = LLM(path, dtype="float32", kv=kv)
    prompt = prompts(1, seed=5)[0][:1]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0))[0]
    decoded = torch.tensor([next(iter(lp.values())).logprob for lp in out.outputs[0].logprobs], dtype=torch.float64)
    seq = prompt + out.outputs[0].token_ids
    scored = llm.score(seq, chunk=1)
    torch.testing.assert_close(scored, decoded, rtol=0, atol=2e-5)  # float32 vs float64 log-softmax
    if kv.startswith("kivi"):  # a chunk of 40 sees its own full blocks quantized: not decoding
        assert (llm.score(seq, chunk=40) - decoded).abs().max() > 1e-3


def test_reorder_ranks_rope_pairs_by_key_norm(plain):
    model = plain.engine.model
    order = key_pair_order(model)
    D, half = model.cfg.head_dim, model.cfg.head_dim // 2
    assert torch.equal(order.sort().values, torch.arange(D))
    assert torch.equal(order[half:], order[:half] + half)  # pairs (i, i + D/2) move together
    assert not torch.equal(order, torch.arange(D))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_key_order_fold_is_free_and_exact(tiny_model_dir, arch):
    """Folded into q/k rows (and q/k norms) and the RoPE tables at load, the reorder leaves the
    plain cache's logits unchanged (float rounding of q.k's summation order only) and adds no op
    to the step: attend has no permutation left."""
    path = str(tiny_model_dir(arch))
    seq = prompts(1, seed=6)[0] * 3
    ref = LLM(path, dtype="float32")
    folded = LLM(path, dtype="float32")
    model = folded.engine.model
    fold_key_order(model, key_pair_order(model))
    assert not torch.equal(model.rope.cos, ref.engine.model.rope.cos)
    torch.testing.assert_close(folded.score(seq, chunk=5), ref.score(seq, chunk=5), rtol=0, atol=1e-5)
    assert not hasattr(PagedKVCache, "_permute")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bfp16_reorder_keeps_the_logits(tiny_model_dir, arch):
    """16-bit mantissas are within 2^-15 of each block's max: the logits match the plain cache's
    to float32-level tolerance, which a wrong permutation of q or k would break at once."""
    path = str(tiny_model_dir(arch))
    seq = prompts(1, seed=6)[0] * 3
    ref = LLM(path, dtype="float32").score(seq, chunk=5)
    got = LLM(path, dtype="float32", kv="bfp:16:reorder").score(seq, chunk=5)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert (LLM(path, dtype="float32", kv="bfp:4:reorder").score(seq, chunk=5) - ref).abs().max() > 1e-3


def test_eval_ppl_with_kv_writes_the_footprint(path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 37}" for i in range(3000)))
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--model", path, "--dtype", "float32", "--kv", "kivi:4", "--data", str(text),
                 "--ctx", "128", "--limit", "2", "--json", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    # 3 layers x 2 KV heads x (16 codes + 4 key (s, z) per 16 tokens + 4 value (s, z)) = 144 bytes
    assert (data["kv"], data["chunk"], data["kv_bytes_per_token"]) == ("kivi:4:g16", 64, 144)
    assert data["kv_compression"] == round(2 * 3 * 2 * 16 * 2 / 144, 4)
    llm = LLM(path, dtype="float32", kv="kivi:4")
    from leanlm.bench.perplexity import perplexity
    ids_ = llm.get_tokenizer().encode(text.read_text(), add_special_tokens=False)
    assert data["ppl"] == pytest.approx(perplexity(llm, ids_, ctx=128, chunk=64, limit=2).ppl, rel=1e-9)


def test_kv_with_compile_is_a_clear_error(path):
    with pytest.raises(ValueError, match="kv='kivi:4' needs the paged cache"):
        LLM(path, kv="kivi:4", compile=True)
