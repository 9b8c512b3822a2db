"""Shared end-to-end check of a KV codec through the engine on a tiny random model."""
import torch

from leanlm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def prompts(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (9 + 13 * i,), generator=g).tolist() for i in range(n)]


def ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def check_batched_and_prefix_cache(path: str, kv: str) -> None:
    """Batched outputs equal each prompt run alone, every block comes back, and prefix-cache hits
    give the outputs a fresh engine recomputes."""
    llm = LLM(path, dtype="float32", kv=kv, enable_prefix_caching=False)
    ps = prompts()
    alone = [ids(llm.generate([p], GREEDY))[0] for p in ps]
    assert ids(llm.generate(ps, GREEDY)) == alone
    assert llm.engine.stats().kv_blocks_used == 0
    shared = prompts(1, seed=4)[0] * 4
    a, b = shared + [5, 6, 7], shared + [8, 9]
    expected = ids(llm.generate([a], GREEDY)) + ids(llm.generate([b], GREEDY))
    cached = LLM(path, dtype="float32", kv=kv)
    assert ids(cached.generate([a], GREEDY)) + ids(cached.generate([b], GREEDY)) == expected
    assert cached.engine.stats().prefix_cache_hits == len(shared) // 16 * 16
