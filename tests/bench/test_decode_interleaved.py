"""benchmarks/decode_interleaved.py: engines of several (KV codec, batch) configurations decoding in
turn in one process, each generating exactly what it generates alone."""
from __future__ import annotations

import gc

import pytest

from leanlm import LLM, SamplingParams
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("decode_interleaved")


def test_parse_config(script):
    assert script.parse_config("bf16@4") == ("bf16", 4)
    assert script.parse_config("kivi:4:g64:v3@2") == ("kivi:4:g64:v3", 2)
    for bad in ("bf16", "bf16@", "@4", "bf16@0", "bf16@x"):
        with pytest.raises(ValueError, match="KV@B"):
            script.parse_config(bad)


def test_interleaved_engines_generate_what_they_generate_alone(script, tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    steps, context = 6, 20
    results = script.measure([("bf16", 1), ("kivi:8:g16", 2)], context, steps, model)
    assert [(r["kv"], r["batch"]) for r in results] == [("bf16", 1), ("kivi:8:g16", 2)]
    for r in results:
        assert r["steps"] == steps
        assert r["step_ms"] > 0 and 0 <= r["executor_ms"] <= r["step_ms"]
        assert r["outside_ms"] == pytest.approx(r["step_ms"] - r["executor_ms"])
        assert r["tok_s"] == pytest.approx(r["batch"] / r["step_ms"] * 1e3)
        assert [len(t) for t in r["token_ids"]] == [steps + 1] * r["batch"]
        # the same prompts through a fresh engine, alone: interleaving changed nothing
        llm = LLM(model, dtype="float32", kv=r["kv"], enable_prefix_caching=False, max_num_seqs=r["batch"])
        prompts = script.prompts(r["batch"], context, llm.engine.runner.model.cfg.vocab_size)
        alone = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
        assert [list(o.outputs[0].token_ids) for o in alone] == r["token_ids"]
    del llm
    gc.collect()  # the engines' cycles: collected here, not inside a later test's timed window


def test_bad_sizes_are_refused(script, tiny_model_dir):
    with pytest.raises(ValueError, match="context and steps"):
        script.measure([("bf16", 1)], 0, 5, str(tiny_model_dir("llama")))
