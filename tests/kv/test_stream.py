"""Eviction (`--kv stream:WINDOW[:sinkS]+CODEC`): StreamingLLM's attention sinks plus a recent
window, at block granularity, on top of any codec. Checked against Hugging Face transformers run
with the same visibility as an explicit attention mask; the freed blocks really come back to the
pool (a long generation runs in a pool far smaller than its context); batching, prefix caching and
the footprint reports."""
import json

import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.cli import main
from leanlm.kv.blocks import EVICTED, BlockManager
from leanlm.kv.spec import KVSpec
from tests.kv.engine_checks import check_batched_and_prefix_cache

BS = 16  # the tiny models' block size


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def visible(T: int, window: int, sink: int, bs: int = BS) -> torch.Tensor:
    """[T, T] bool: query i sees token j <= i in the first sink tokens or in the window blocks
    before its own block (and its own block)."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    return (j <= i) & ((j // bs < sink // bs) | (j // bs >= i // bs - window // bs))


def hf_logprobs(path: str, seq: list[int], mask: torch.Tensor | None) -> torch.Tensor:
    """float64 log p(seq[t+1] | seq[:t+1]) from transformers with `mask` as the attention mask."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        logits = model(torch.tensor([seq]), **kwargs).logits[0].double()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0]


def long_prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- the spec ----------------------------------------------------------------------------------

def test_spec_round_trips_and_wraps_any_codec():
    for text in ["stream:1024+bf16", "stream:768:sink128+kivi:3.5:g128:v4:c64:s8:prerope:rotate:kmix",
                 "stream:512:sink0+minicache:0.6:0.05+kivi:4"]:
        spec = KVSpec.parse(text)
        assert str(spec) == text and KVSpec.parse(str(spec)) == spec
    spec = KVSpec.parse("stream:64+kivi:4")
    assert (spec.kind, spec.bits, spec.window, spec.stream_sink) == ("kivi", 4, 64, None)
    assert str(KVSpec.parse("stream:64")) == "stream:64+bf16"


@pytest.mark.parametrize("text, match", [
    ("stream", "WINDOW, a number of tokens"), ("stream:0+bf16", "got 0"), ("stream:64:s16", "sinkS"),
    ("stream:64:sink16:sink32", "only sinkS"), ("stream:64+stream:32", "twice"),
    ("minicache+stream:64+kivi:4", "write it first")])
def test_bad_specs_name_the_value(text, match):
    with pytest.raises(ValueError, match=match):
        KVSpec.parse(text)


def test_a_pool_smaller_than_one_seat_is_a_clear_error(path):
    bpt = LLM(path, dtype="float32", kv="fp32").engine.cache.bytes_per_token()
    with pytest.raises(ValueError, match="holds 32 tokens, less than the 64 tokens a sequence holds under "
                                         "stream:32:sink16\\+fp32"):
        LLM(path, dtype="float32", kv="stream:32:sink16+fp32", kv_cache_memory=2 * BS * bpt, max_model_len=200)


def test_window_and_sink_must_be_whole_blocks(path):
    with pytest.raises(ValueError, match="WINDOW 40 must be a positive multiple of the block size 16"):
        LLM(path, dtype="float32", kv="stream:40")
    with pytest.raises(ValueError, match="sink 8 must be"):
        LLM(path, dtype="float32", kv="stream:32:sink8+kivi:4")


# ---- the block manager -------------------------------------------------------------------------

def test_evict_frees_blocks_and_keeps_positions():
    bm = BlockManager(8, 4)
    tokens = list(range(100, 120))
    table, _ = bm.match_prefix(tokens)
    assert bm.grow(table, 20)
    bm.commit(table, tokens, 20)
    blocks = list(table.blocks)
    assert bm.num_used == 5 and bm.num_free == 3
    assert bm.evict(table, 1, 4) == blocks[1:4]
    assert table.blocks == [blocks[0], EVICTED, EVICTED, EVICTED, blocks[4]]
    assert bm.num_used == 2 and bm.num_free == 6
    assert bm.evict(table, 1, 4) == []  # already gone: nothing is freed twice
    fork = bm.fork(table)  # skips the evicted entries
    assert bm.ref_count(blocks[0]) == 2 and bm.num_used == 2
    bm.free(fork)
    # the evicted blocks were hashed: a request with the same prefix takes them back
    again, covered = bm.match_prefix(tokens + [1])
    assert covered == 20 and again.blocks == blocks
    bm.free(again)
    bm.free(table)
    assert bm.num_used == 0 and bm.num_free == 8


# ---- through the engine ------------------------------------------------------------------------

@pytest.mark.parametrize("kv", ["stream:32:sink16+fp32", "stream:16:sink0+fp32", "stream:48+bf16"])
def test_scores_equal_transformers_with_the_visibility_mask(path, kv):
    """Every chunking (1: token-by-token decoding on the fused kernels; 7: rows of a chunk, each
    with its own view; 64 and all: prefill masks) gives what transformers gives with the mask."""
    spec = KVSpec.parse(kv)
    sink = BS if spec.stream_sink is None else spec.stream_sink
    seq = long_prompt(150)
    ref = hf_logprobs(path, seq, visible(len(seq), spec.window, sink))
    unmasked = hf_logprobs(path, seq, None)
    assert (ref - unmasked).abs().max() > 1e-2  # the window really hides something
    llm = LLM(path, dtype="float32", kv=kv)
    tol = 2e-5 if spec.dtype == "fp32" else 2e-2  # bf16 pages round K/V
    for chunk in (1, 7, 64, 150):
        got = llm.score(seq, chunk=chunk)
        assert (got - ref).abs().max() < tol, chunk
    assert llm.engine.stats().kv_blocks_used == 0


def test_a_long_generation_runs_in_a_pool_smaller_than_its_context(path):
    """Freed blocks come back: 240 tokens in a pool of 5 blocks (80 tokens) at 3 blocks a
    sequence, with the outputs of a roomy pool (eviction changes what is held, not what is seen)."""
    kv = "stream:16:sink16+fp32"
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    prompt = long_prompt(40, seed=2)
    roomy = LLM(path, dtype="float32", kv=kv, enable_prefix_caching=False)
    bpt = roomy.engine.cache.bytes_per_token()
    small = LLM(path, dtype="float32", kv=kv, enable_prefix_caching=False, kv_cache_memory=5 * BS * bpt)
    assert small.engine.cache.blocks.num_blocks == 5 and small.engine.max_model_len >= 240
    peak = []
    real = small.engine.cache.prepare

    def prepare(seqs):
        ctx = real(seqs)
        peak.append(small.engine.cache.blocks.num_used)
        # after eviction: sink + window + the block being written; fail here, not in a scheduler
        # that preempts the only sequence forever when blocks never come back
        assert peak[-1] <= 3, peak
        return ctx

    small.engine.cache.prepare = prepare
    out = small.generate([prompt], params)[0].outputs[0].token_ids
    assert len(out) == 200 and out == roomy.generate([prompt], params)[0].outputs[0].token_ids
    assert len(peak) >= 200 and max(peak) == 3
    assert small.engine.stats().kv_blocks_used == 0
    # without eviction the same pool cannot hold the sequence: the engine says so
    with pytest.raises(ValueError, match="holds 80 tokens"):
        LLM(path, dtype="float32", kv="fp32", kv_cache_memory=5 * BS * bpt, max_model_len=240)


@pytest.mark.parametrize("kv", ["stream:16:sink16+kivi:4:prerope", "stream:16:sink16+fp8:e4m3"])
def test_batched_and_prefix_cache_with_eviction(path, kv):
    check_batched_and_prefix_cache(path, kv)


def test_eval_ppl_reports_the_held_tokens(path, tmp_path):
    """kv_compression counts what a ctx-token sequence holds: 64 of 128 tokens here."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 37}" for i in range(3000)))
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--model", path, "--dtype", "float32", "--kv", "stream:32:sink16+bf16",
                 "--data", str(text), "--ctx", "128", "--limit", "2", "--json", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert data["kv"] == "stream:32:sink16+bf16" and data["kv_compression"] == 2.0


def test_speculative_decoding_keeps_the_outputs(path):
    """n-gram drafts are verified in chunks and rolled back on a cache that evicts: the greedy
    outputs are those of plain decoding with the same eviction."""
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    ps = [(long_prompt(20, seed=s) * 3)[:50] for s in range(3)]  # repetitive: drafts get accepted
    kv = "stream:32:sink16+kivi:4"
    base = [o.outputs[0].token_ids for o in LLM(path, dtype="float32", kv=kv).generate(ps, params)]
    llm = LLM(path, dtype="float32", kv=kv, spec="ngram")
    assert [o.outputs[0].token_ids for o in llm.generate(ps, params)] == base
    assert llm.engine.stats().kv_blocks_used == 0
