"""Continuous batching over the paged cache: requests join and leave at every step, prefix
caching reuses blocks, preemption under a small KV budget still gives the unconstrained outputs,
aborts free blocks, and n > 1 samples share their prompt."""
import pytest
import torch

from leanlm import LLM, LLMEngine, SamplingParams
from leanlm.config import EngineConfig

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompts(n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (length + 3 * i,), generator=g).tolist() for i in range(n)]


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def test_requests_joining_mid_run_equal_single_requests(path):
    ps = prompts(5, 20)
    alone = [token_ids(LLM(path).generate([p], GREEDY))[0] for p in ps]
    engine = LLMEngine(EngineConfig(model=path, block_size=4))
    done = {}
    for step in range(400):
        if step % 3 == 0 and step // 3 < len(ps):  # a new request every third step
            engine.add_request(str(step // 3), ps[step // 3], GREEDY)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        if len(done) == len(ps):
            break
    assert [done[i] for i in range(len(ps))] == alone
    assert engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0


def test_preemption_under_small_budget_keeps_outputs(path):
    ps = prompts(6, 30, seed=1)
    free = LLM(path)
    expected = token_ids(free.generate(ps, GREEDY))
    seeded = SamplingParams(temperature=0.9, top_k=50, max_tokens=24, seed=5, ignore_eos=True)
    expected_sampled = token_ids(free.generate(ps, seeded))
    # 3 layers x 2 (K, V) x 2 heads x 16 dims x 4 bytes = 768 bytes per token; 40 blocks of 4
    # tokens hold 160 tokens, while the six requests need ~380 together
    tight = LLM(path, kv_cache_memory=40 * 4 * 768, block_size=4, max_model_len=128)
    assert tight.engine.stats().kv_blocks_free == 40
    assert token_ids(tight.generate(ps, GREEDY)) == expected
    assert token_ids(tight.generate(ps, seeded)) == expected_sampled
    stats = tight.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.kv_blocks_used == 0


def test_prefix_caching_reuses_blocks_and_keeps_outputs(path):
    shared = prompts(1, 64, seed=2)[0]
    a, b = shared + [5, 6, 7], shared + [8, 9]
    plain = LLM(path, enable_prefix_caching=False)
    expected = token_ids(plain.generate([a], GREEDY)) + token_ids(plain.generate([b], GREEDY))
    assert plain.engine.stats().prefix_cache_hits == 0
    cached = LLM(path, block_size=16)
    got = token_ids(cached.generate([a], GREEDY)) + token_ids(cached.generate([b], GREEDY))
    assert got == expected
    stats = cached.engine.stats()
    assert stats.prefix_cache_hits == 64  # b found the four full blocks of the shared prefix
    assert stats.prefix_cache_queries == len(a) + len(b)


def test_n_samples_share_prompt_blocks(path):
    prompt = prompts(1, 64, seed=3)[0]
    llm = LLM(path, block_size=16)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=11, ignore_eos=True)
    outs = llm.generate([prompt], params)[0].outputs
    assert len({tuple(o.token_ids) for o in outs}) > 1  # distinct samples
    # samples 1..3 found the prompt's 3 full blocks (48 tokens; the last token is recomputed)
    assert llm.engine.stats().prefix_cache_hits == 3 * 48
    # and each sample is what it would be alone: sample i is seeded with seed + i
    for i, o in enumerate(outs):
        alone = LLM(path).generate([prompt], SamplingParams(temperature=1.0, max_tokens=8, seed=11 + i,
                                                            ignore_eos=True))
        assert token_ids(alone)[0] == o.token_ids


def test_abort_frees_blocks_at_once(path):
    engine = LLMEngine(EngineConfig(model=path, block_size=4))
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    for i, p in enumerate(prompts(3, 20, seed=4)):
        engine.add_request(str(i), p, long)
    for _ in range(5):
        engine.step()
    before = engine.stats().kv_blocks_used
    engine.abort("1")
    after = engine.stats()
    assert after.num_running == 2 and after.kv_blocks_used < before
    engine.abort("0")
    engine.abort("2")
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished()


def test_budget_too_small_for_the_context_is_a_clear_error(path):
    with pytest.raises(ValueError, match="max_model_len=128"):
        LLM(path, kv_cache_memory=10 * 4 * 768, block_size=4, max_model_len=128)
    with pytest.raises(ValueError, match="kv cache memory"):
        LLM(path, kv_cache_memory="lots")
