"""Speculation under repetition / presence / frequency penalties and min_tokens: the verifier
processes draft position j with the output tokens before it, the accepted drafts included, and
blocks EOS / stop tokens there only while fewer than min_tokens outputs precede it.

- by hand: constructed logits where the step-start state (the drafts not counted) gives another
  token than plain decoding; the verifier gives plain decoding's, the wrong rule does not;
- sampling: the emitted tokens follow the target's penalised distribution at each position
  (chi-square, as tests/spec/test_verify.py), and the step-start state fails the same test;
- end to end on the tiny model: greedy with penalties / min_tokens, speculating with ngram,
  self:rtn:int8 and early-exit:1, is token for token plain greedy's; with the step-start state
  patched in, the same comparison fails."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.engine import sampling
from leanlm.engine.sampling import Sampler, SamplingState
from leanlm.spec import speculator as speculator_module
from leanlm.spec.config import SpecConfig
from leanlm.spec.proposer import Draft, NgramProposer
from leanlm.spec.speculator import Speculator
from tests.spec.test_spec_engine import prompts, speculating, token_ids
from tests.spec.test_verify import chi_square_pvalue

EOS = 4


class FakeSeq:
    """What Speculator.verify reads of a sequence."""

    def __init__(self, state: SamplingState):
        self.state, self.params = state, state.params


def make_state(outputs=(), prompt=(0,), **params) -> SamplingState:
    state = SamplingState.create(SamplingParams(max_tokens=100, **params), list(prompt), eos_token_id=EOS)
    for t in outputs:
        state.append(t)
    return state


def verifier() -> Speculator:
    return Speculator(SpecConfig.parse("ngram"), NgramProposer(2), None, 4, 100, None)


def verify(state, logits, draft) -> list[int]:
    seq = FakeSeq(state)
    return verifier().verify([seq], [logits], {seq: Draft(list(draft))}, Sampler())[0]


def step_start_states(monkeypatch):
    """The bug the tests must catch: every position processed with the step's starting state."""
    monkeypatch.setattr(speculator_module, "position_states", lambda state, draft: [state] * (len(draft) + 1))


def plain_greedy(state_args, logits, draft) -> list[int]:
    """Plain decoding, one position at a time, for as long as it agrees with the draft."""
    state, sampler, out = make_state(**state_args), Sampler(), []
    for j in range(logits.shape[0]):
        token = sampler.sample(logits[j:j + 1], [state]).token_ids[0]
        out.append(token)
        state.append(token)
        if j == len(draft) or token != draft[j]:
            return out


# (state, logits rows [k+1, V], draft): plain decoding's token at row 1 depends on draft[0]
CASES = {
    # token 2 leads row 1 by 0.1 unless penalised for having been drafted at row 0
    "repetition": (dict(temperature=0, repetition_penalty=1.3),
                   [[0.0, 0.1, 2.0, 0.5, 0.0], [0.0, 0.2, 1.0, 0.9, 0.0], [0.0, 3.0, 0.0, 0.0, 0.0]], [2, 2]),
    "presence": (dict(temperature=0, presence_penalty=0.5),
                 [[0.0, 0.1, 2.0, 0.5, 0.0], [0.0, 0.2, 1.0, 0.9, 0.0], [0.0, 3.0, 0.0, 0.0, 0.0]], [2, 2]),
    # token 2 was output once before the step: the draft makes it twice at row 1
    "frequency": (dict(temperature=0, frequency_penalty=0.3, outputs=[2]),
                  [[0.0, 0.1, 2.0, 0.5, 0.0], [0.0, 0.2, 1.2, 0.7, 0.0], [0.0, 3.0, 0.0, 0.0, 0.0]], [2, 2]),
    # EOS leads every row; blocked at row 0 (0 outputs < 1), free at row 1 (1 output)
    "min_tokens": (dict(temperature=0, min_tokens=1),
                   [[0.0, 1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 0.0, 0.0, 2.0]], [1]),
    # blocked at rows 0 and 1 (1 and 2 outputs < 3), free at row 2
    "min_tokens_stop_ids": (dict(temperature=0, min_tokens=3, stop_token_ids=[3], ignore_eos=True, outputs=[1]),
                            [[0.0, 1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 1.0, 2.0, 0.0],
                             [0.0, 1.0, 0.0, 2.0, 0.0]], [1, 2]),
}


@pytest.mark.parametrize("case", CASES)
def test_each_position_is_processed_as_plain_decoding_would(case, monkeypatch):
    args, rows, draft = CASES[case]
    logits = torch.tensor(rows)
    want = plain_greedy(args, logits, draft)
    assert verify(make_state(**args), logits, draft) == want
    step_start_states(monkeypatch)  # negative control: the step-start state for every position
    assert verify(make_state(**args), logits, draft) != want


def test_the_base_state_is_left_alone():
    state = make_state(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=2, outputs=[1])
    verify(state, torch.randn(4, 5), [2, 3, 2])
    seen, counts = state.penalty_tensors(5, torch.device("cpu"))
    assert seen.tolist() == [True, True, False, False, False] and counts.tolist() == [0, 1, 0, 0, 0]
    assert state.num_output_tokens == 1 and state.min_tokens_blocked


# ------------------------------------------------------------------ sampling


V, TRIALS = 6, 6000


# the target's logits at the 3 positions; every token likely enough for the chi-square (EOS = 4
# too), and token 1 (the fixed first draft) likely enough to be accepted often
TARGET = torch.tensor([[0.15, 0.20, 0.15, 0.20, 0.15, 0.15],
                       [0.10, 0.20, 0.15, 0.15, 0.25, 0.15],
                       [0.20, 0.15, 0.15, 0.15, 0.20, 0.15]]).log()
DRAFT_Q = torch.tensor([[0.10, 0.40, 0.10, 0.20, 0.10, 0.10],
                        [0.20, 0.20, 0.20, 0.10, 0.20, 0.10]])


SAMPLED = {
    "penalties": dict(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.8,
                      outputs=[3], seed=5),
    "min_tokens": dict(temperature=1.0, min_tokens=2, outputs=[3], seed=5),  # EOS blocked at row 0 only
}


def sampled_trials(args, logits, q):
    """Emitted tokens of TRIALS verifications of 2 drafts drawn from q (None: fixed drafts [1, 2])."""
    state, sampler, spec, g = make_state(**args), Sampler(), verifier(), torch.Generator().manual_seed(0)
    first, second = Counter(), Counter()  # second: (accepted first draft, the token after it)
    for _ in range(TRIALS):
        draft = [1, 2] if q is None else [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
        seq = FakeSeq(state)
        out = spec.verify([seq], [logits], {seq: Draft(draft, q)}, sampler)[0]
        first[out[0]] += 1
        if len(out) > 1:
            second[out[0], out[1]] += 1
    return first, second


def plain_probs(args, logits_row, outputs=()) -> torch.Tensor:
    """The distribution plain decoding draws from at a position after `outputs` more tokens."""
    state = make_state(**args)
    for t in outputs:
        state.append(t)
    return Sampler().filtered_probs(logits_row[None], [state])[0]


def pvalue(counts: torch.Tensor, p: torch.Tensor) -> float:
    """Chi-square p-value over the tokens p can draw; 0 if anything else was drawn."""
    return 0.0 if counts[p == 0].sum() else chi_square_pvalue(counts[p > 0], p[p > 0])


def follows_plain(args, logits, first, second) -> list[float]:
    """p-values: the first token against row 0's plain distribution, and the token after each
    frequent accepted first draft t against row 1's plain distribution after t."""
    pvalues = [pvalue(torch.tensor([first[v] for v in range(V)]), plain_probs(args, logits[0]))]
    for t in {t for t, _ in second}:
        counts = torch.tensor([second[t, v] for v in range(V)])
        if counts.sum() >= 600:
            pvalues.append(pvalue(counts, plain_probs(args, logits[1], [t])))
    assert len(pvalues) >= 2
    return pvalues


@pytest.mark.parametrize("q_kind", ["draft-distribution", "one-hot"])
@pytest.mark.parametrize("case", SAMPLED)
def test_speculative_sampling_follows_the_penalised_target(case, q_kind, monkeypatch):
    args, logits = SAMPLED[case], TARGET
    q = DRAFT_Q if q_kind == "draft-distribution" else None
    first, second = sampled_trials(args, logits, q)
    assert min(follows_plain(args, logits, first, second)) > 1e-3
    step_start_states(monkeypatch)  # negative control: the same test rejects the step-start state
    first, second = sampled_trials(args, logits, q)
    assert min(follows_plain(args, logits, first, second)) < 1e-6


# ------------------------------------------------------------------ end to end


SPECS = ["ngram:n=2:k=4", "self:rtn:int8:k=4", "early-exit:1:k=3"]
PENALTIES = {
    "repetition": dict(repetition_penalty=1.3),
    "presence": dict(presence_penalty=0.8),
    "frequency": dict(frequency_penalty=0.7),
    "all": dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5),
    # mild enough that n-gram drafts (repeats of the context) get accepted too
    "mild": dict(repetition_penalty=1.02, presence_penalty=-0.5, frequency_penalty=0.3),
}


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return str(tiny_model_dir("qwen3"))


@pytest.fixture(scope="module")
def free(path):
    """Plain greedy without penalties or min_tokens."""
    return token_ids(LLM(path, block_size=4).generate(prompts(), SamplingParams(temperature=0, max_tokens=30,
                                                                                   ignore_eos=True)))


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=30, **kw)


@pytest.fixture(scope="module")
def llms(path):
    """spec (None: plain) -> an LLM, built once for the module; plain outputs are memoised."""
    made, plain_runs = {}, {}

    def get(spec):
        if spec not in made:
            made[spec] = LLM(path, block_size=4) if spec is None else speculating(LLM(path, spec=spec, block_size=4))
        return made[spec]

    def plain(params):
        key = (repr(params), tuple(sorted(get(None).engine.eos_token_ids)))
        if key not in plain_runs:
            plain_runs[key] = get(None).generate(prompts(), params)
        return plain_runs[key]

    get.plain = plain
    return get


def compare(llms, spec, params, eos=None):
    """(plain greedy, speculative greedy, drafted, accepted) on prompts(); `eos`: the model's EOS ids."""
    plain, llm = llms(None), llms(spec)
    saved = plain.engine.eos_token_ids, llm.engine.eos_token_ids
    if eos is not None:
        plain.engine.eos_token_ids = llm.engine.eos_token_ids = set(eos)
    before = llm.engine.stats().spec
    try:
        want, got = llms.plain(params), llm.generate(prompts(), params)
    finally:
        plain.engine.eos_token_ids, llm.engine.eos_token_ids = saved
    after = llm.engine.stats()
    assert after.kv_blocks_used == 0
    return want, got, after.spec.drafted - before.drafted, after.spec.accepted - before.accepted


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("setting", PENALTIES)
def test_greedy_with_penalties_is_plain_greedy(llms, free, spec, setting):
    want, got, drafted, accepted = compare(llms, spec, greedy(ignore_eos=True, **PENALTIES[setting]))
    assert token_ids(got) == token_ids(want)
    assert token_ids(want) != free  # the penalties changed the outputs
    if "ngram" not in spec or setting == "mild":  # strong penalties leave n-gram lookup no match
        assert drafted > 0 and accepted > 0  # penalised sequences draft, and drafts pass


def common_tokens(free) -> list[int]:
    return [t for t, _ in Counter(t for out in free for t in out).most_common(3)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("how", ["eos", "stop_token_ids"])
def test_greedy_with_min_tokens_is_plain_greedy(llms, free, spec, how):
    """The free run's three most common tokens end a sequence (as the model's EOS, or as
    stop_token_ids), blocked for the first 10 outputs."""
    stop = common_tokens(free)
    params = greedy(min_tokens=10, **(dict(stop_token_ids=stop, ignore_eos=True) if how == "stop_token_ids" else {}))
    want, got, drafted, accepted = compare(llms, spec, params, eos=stop if how == "eos" else set())
    assert token_ids(got) == token_ids(want)
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in want]
    assert drafted > 0 and accepted > 0
    lengths = [len(t) for t in token_ids(want)]
    assert min(lengths) >= 10 and min(lengths) < 30  # blocked first, then a stop token ended one
    assert any(t in stop for out in free for t in out[:10])  # the block mattered


def test_the_step_start_state_is_caught_end_to_end(llms, free, monkeypatch):
    """Negative control: with each draft position processed with the state of the step's start
    (the drafts before it not counted), the comparison above fails: penalties..."""
    monkeypatch.setattr(sampling.SamplingState, "ahead", lambda self, tokens: self)
    want, got, _, _ = compare(llms, "self:rtn:int8:k=4", greedy(ignore_eos=True, repetition_penalty=1.3))
    assert token_ids(got) != token_ids(want)
    # ... and min_tokens: a step starting blocked blocks its later positions too
    want, got, _, _ = compare(llms, "self:rtn:int8:k=4", greedy(min_tokens=7, stop_token_ids=common_tokens(free),
                                                                   ignore_eos=True))
    assert token_ids(got) != token_ids(want)


def test_a_cached_prompt_drafts_at_its_first_step(path):
    """A prompt found whole in the prefix cache decodes, and drafts, at its first step: the
    drafter (in inference mode) is the first to build its penalty state, which the plain steps
    that follow (no room left to draft near max_tokens) then update."""
    llm = speculating(LLM(path, spec="early-exit:1:k=3", block_size=4))
    plain = LLM(path, block_size=4)
    for max_tokens in (30, 2, 3):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **PENALTIES["all"])
        hits = llm.engine.stats().prefix_cache_hits
        assert token_ids(llm.generate(prompts(), params)) == token_ids(plain.generate(prompts(), params))
    assert llm.engine.stats().prefix_cache_hits > hits


@pytest.mark.parametrize("spec", ["early-exit:1:k=3", "self:rtn:int8:k=4"])
def test_sampled_with_penalties_drafts_and_is_reproducible(path, spec):
    """Seeded sampling with penalties and min_tokens through the model drafters' sampled path
    (drafts drawn from q under the same per-position processing): drafts are accepted, and a
    seeded request gives the same tokens alone and in a batch. (No prefix cache: a prompt found
    whole there drafts at its first step, which draws other random numbers than a prefill.)"""
    params = SamplingParams(temperature=0.8, top_k=40, max_tokens=24, seed=3, min_tokens=5,
                            stop_token_ids=[7], **PENALTIES["all"])
    llm = speculating(LLM(path, spec=spec, block_size=4, enable_prefix_caching=False))
    alone = token_ids(llm.generate(prompts()[:1], params))[0]
    assert token_ids(llm.generate(prompts(), params))[0] == alone
    s = llm.engine.stats().spec
    assert s.drafted > 0 and s.accepted > 0
