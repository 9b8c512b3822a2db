"""Pre-RoPE keys (kivi:...:prerope) on the embedded SmolLM2-135M: the same bits cost less
perplexity than keys quantized after RoPE. 1024 WikiText tokens fed in chunks of 64 (each chunk
attends to the cache as stored), values at 8 bits so the keys' error dominates."""
import math

import pytest

from leanlm import LLM
from leanlm.bench.data import find_data_file


@pytest.fixture(scope="module")
def tokens():
    text = open(find_data_file("wikitext2_test_gptq_joined.txt")).read()[:20000]
    return LLM(dtype="float32", kv="bf16").engine.tokenizer.encode(text)[:1024]


def ppl(tokens, kv):
    llm = LLM(dtype="float32", kv=kv, enable_prefix_caching=False, max_num_seqs=1)
    return math.exp(-llm.score(tokens, chunk=64).mean().item())


@pytest.mark.parametrize("bits", [4, 3])
def test_prerope_keys_cost_less_than_post_rope_keys(tokens, bits):
    base = ppl(tokens, "bf16")
    post = ppl(tokens, f"kivi:{bits}:g64:v8:c64") / base - 1
    pre = ppl(tokens, f"kivi:{bits}:g64:v8:c64:prerope") / base - 1
    # measured: 4-bit +2.5% -> +1.4%, 3-bit +13.6% -> +8.4%. The margin is wide on purpose: at
    # 3 bits a rounding-level change upstream (e.g. another RoPE kernel for q, 2e-7 apart) flips
    # codes and moved the 3-bit prerope cost to +10.3% over these 1024 tokens
    assert 0 < pre < 0.85 * post, (bits, pre, post)
