"""benchmarks/step_profile.py: decode steps of one engine under torch.profiler or cProfile."""
from __future__ import annotations

import gc
import pstats

import pytest

from leanlm import LLM, SamplingParams
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("step_profile")


@pytest.mark.parametrize("python", [False, True])
def test_profiles_the_decode_steps_and_generates_what_the_engine_does(script, tiny_model_dir, python):
    model = str(tiny_model_dir("llama"))
    steps, context, warmup = 4, 20, 2
    prof, step_s, tokens = script.profile_steps("kivi:8:g16", 2, context, steps, model, "cpu",
                                                warmup=warmup, python=python)
    assert step_s > 0 and [len(t) for t in tokens] == [1 + warmup + steps] * 2
    if python:  # the engine's step ran under cProfile once per profiled step
        stats = pstats.Stats(prof).stats
        assert sum(v[0] for (f, _, name), v in stats.items() if name == "step" and f.endswith("engine.py")) == steps
    else:  # the ops of the profiled steps only: greedy sampling takes one max per step
        assert {e.key: e.count for e in prof.key_averages()}.get("aten::max") == steps
    llm = LLM(model, dtype="float32", kv="kivi:8:g16", enable_prefix_caching=False, max_num_seqs=2)
    prompts = load_benchmark("decode_interleaved").prompts(2, context, llm.engine.runner.model.cfg.vocab_size)
    alone = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1 + warmup + steps, ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in alone] == tokens
    del llm
    gc.collect()


def test_bad_sizes_are_refused(script, tiny_model_dir):
    with pytest.raises(ValueError, match="context and steps"):
        script.profile_steps("bf16", 1, 0, 4, str(tiny_model_dir("llama")), "cpu")
