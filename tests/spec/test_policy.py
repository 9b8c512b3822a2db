"""How much to draft: the confidence stop of the model drafters (conf=C), the batch-size
turn-down of the fixed proposers (cost model + spec_max_batch cap, reported in the stats), and
logprobs under speculation (the verifier's target logits at each emitted position)."""
import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.spec.early_exit import low_confidence
from tests.spec.test_spec_engine import prompts, speculating, token_ids as ids

GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return str(tiny_model_dir("qwen3"))


@pytest.fixture(scope="module")
def expected(path):
    return ids(LLM(path).generate(prompts(), GREEDY))


def test_low_confidence_is_the_max_softmax_under_the_threshold():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, -50.0]])
    # max probs: ~1.0, 1/3, e/(e+1) = 0.731
    assert low_confidence(logits, 0.5) == [False, True, False]
    assert low_confidence(logits, 0.8) == [False, True, True]
    assert low_confidence(logits, 0.0) == [False, False, False]  # off


@pytest.mark.parametrize("spec", ["early-exit:1:k=5", "self:rtn:int4:g32:k=5"])
def test_confidence_stop_drafts_fewer_and_stays_exact(path, expected, spec):
    """conf=0.99: the tiny model's drafts are never that sure, so every sequence stops after its
    first draft token; without conf every verification carries k=5 drafts (room permitting)."""
    counts = {}
    for conf in ("", ":conf=0.99"):
        llm = LLM(path, spec=spec + conf)
        assert [ids(llm.generate([p], GREEDY))[0] for p in prompts()] == expected  # batch 1: drafting
        s = llm.engine.stats().spec
        counts[conf] = s.drafted / s.verifications
    assert counts[":conf=0.99"] == 1.0
    assert counts[""] > 3.0


def test_fixed_proposers_turn_down_in_batches_not_at_batch_1(path):
    """Believed acceptance 5%: with 4 decoding sequences the cost model predicts a loss and
    drafts nothing (off_cost steps); once one sequence is left (batch 1) the fixed proposer
    drafts its k as asked. Outputs stay exact."""
    llm = LLM(path, spec="ngram:n=2:k=4", spec_max_batch=64, spec_calibrate=False)
    llm.engine.speculator.set_estimate(0.05, weight=1e6)  # a belief no verification moves much
    staggered = prompts()
    params = [SamplingParams(temperature=0, max_tokens=30 + 10 * i, ignore_eos=True) for i in range(4)]
    for i, p in enumerate(staggered):
        llm.engine.add_request(str(i), p, params[i])
    done = {}
    while llm.engine.has_unfinished():
        for o in llm.engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    plain = LLM(path)
    want = [ids(plain.generate([p], params[i]))[0] for i, p in enumerate(staggered)]
    assert [done[str(i)] for i in range(4)] == want
    s = llm.engine.stats().spec
    assert s.off_cost > 0 and s.choices["off"] == s.off_cost
    assert s.choices["k=4"] > 0 and s.drafted > 0  # the last sequence alone: batch 1


def test_optimistic_estimate_drafts_in_small_batches(path, expected):
    llm = LLM(path, spec="ngram:n=2:k=4", spec_max_batch=64, spec_calibrate=False)
    llm.engine.speculator.set_estimate(0.99, weight=1e6)
    assert ids(llm.generate(prompts(), GREEDY)) == expected
    s = llm.engine.stats().spec
    assert s.off_cost == 0 and any(c.startswith("k=") for c in s.choices)


def test_the_batch_cap_is_counted(path, expected):
    llm = LLM(path, spec="ngram:n=2:k=4", spec_max_batch=2)
    assert ids(llm.generate(prompts(), GREEDY)) == expected
    assert llm.engine.stats().spec.off_batch > 0


@pytest.mark.parametrize("spec", ["ngram:n=2:k=4", "early-exit:2:k=3"])
def test_logprobs_under_speculation_are_plain_decodings(path, spec):
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=3)
    plain = LLM(path).generate(prompts(), p)
    llm = LLM(path, spec=spec)
    speculating(llm)  # draft in this batch of 4 (see above)
    outs = llm.generate(prompts(), p)
    assert llm.engine.stats().spec.accepted > 0  # logprob requests really were speculated
    for a, b in zip(plain, outs):
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids == b.token_ids and len(b.logprobs) == len(b.token_ids)
        for ea, eb in zip(a.logprobs, b.logprobs):
            assert list(ea) == list(eb)  # same top tokens, same order, the chosen one included
            for t in ea:
                assert eb[t].logprob == pytest.approx(ea[t].logprob, abs=1e-4)
                assert eb[t].rank == ea[t].rank and eb[t].decoded_token == ea[t].decoded_token
        assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-3)
