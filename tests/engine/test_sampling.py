import math

import pytest
import torch

from leanlm.engine.sampling import SampleResult, Sampler, SamplingParams, SamplingState

EOS = 7


def make_state(prompt=(1, 2, 3), eos=EOS, generator=None, sample_index=0, **params):
    params = SamplingParams(**params)
    return SamplingState.create(params, list(prompt), generator, eos, sample_index)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs, name", [
    ({"n": 0}, "n"),
    ({"n": 2.0}, "n"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 3.0}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.01}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.2}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 17}, "min_tokens"),  # > default max_tokens=16
    ({"stop": ""}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": ["ok", 3]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"seed": "42"}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
])
def test_invalid_params_name_param_and_value(kwargs, name):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    message = str(err.value)
    assert message.startswith(f"{name} must be ")
    assert repr(next(iter(kwargs.values()))) in message


def test_error_message_states_allowed_range():
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match=r"min_tokens must be .* <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.top_p, p.min_p) == (1, 1.0, 0, 1.0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.seed) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and not p.greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    SamplingParams(top_k=-1, max_tokens=None, min_tokens=100, logprobs=20, seed=-3)  # all allowed


# ------------------------------------------------------------------ greedy, shapes


def test_greedy_is_argmax_in_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    states = [make_state(temperature=0.0) if i % 2 == 0 else make_state(top_k=5, seed=i)
              for i in range(6)]
    tokens = Sampler().sample(logits, states).token_ids
    assert tokens[0::2] == logits[0::2].argmax(-1).tolist()
    assert all(0 <= t < 50 for t in tokens)


def test_all_greedy_batch_and_shape_check():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    states = [make_state(temperature=0) for _ in range(3)]
    assert Sampler().sample(logits, states).token_ids == logits.argmax(-1).tolist()
    with pytest.raises(ValueError, match="logits must be"):
        Sampler().sample(logits, states[:2])


# ------------------------------------------------------------------ filters vs float64


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The filtered distribution, computed in float64 one token at a time."""
    probs = torch.softmax(logits.double() / temperature, -1).tolist()
    keep = set(range(len(probs)))
    order = sorted(keep, key=lambda i: -probs[i])
    if top_k > 0:
        keep = set(order[:top_k])
    if top_p < 1:
        total = sum(probs[i] for i in keep)
        kept, mass = set(), 0.0
        for i in (i for i in order if i in keep):
            kept.add(i)
            mass += probs[i] / total
            if mass >= top_p:
                break
        keep = kept
    if min_p > 0:
        top = max(probs)
        keep = {i for i in keep if probs[i] >= min_p * top}
    total = sum(probs[i] for i in keep)
    return torch.tensor([probs[i] / total if i in keep else 0.0 for i in range(len(probs))],
                        dtype=torch.float64)


BASE = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04]).log()


@pytest.mark.parametrize("settings, kept", [
    ({"top_k": 2}, {0, 1}),
    ({"top_k": 100}, {0, 1, 2, 3, 4, 5}),
    ({"top_p": 0.7}, {0, 1, 2}),  # 0.65 < 0.7 <= 0.80
    ({"top_p": 0.3}, {0}),
    ({"top_p": 0.01}, {0}),  # always at least one
    ({"top_k": 3, "top_p": 0.75}, {0, 1}),  # top-p over the top-3 renormalised: 0.4/0.8 + 0.25/0.8
    ({"min_p": 0.3}, {0, 1, 2}),  # 0.3 * 0.40 = 0.12
    ({"min_p": 0.26}, {0, 1, 2}),  # 0.104: just above 0.10
    ({"min_p": 0.24}, {0, 1, 2, 3}),  # 0.096: just below
    ({"min_p": 0.45, "temperature": 2.0}, {0, 1, 2, 3}),  # sqrt-flattened: 0.45 * 0.632 = 0.285
    ({"top_p": 0.9, "temperature": 0.5}, {0, 1, 2}),
])
def test_filters_match_float64_reference(settings, kept):
    logits = BASE.unsqueeze(0)
    probs = Sampler().filtered_probs(logits, [make_state(**settings)])[0].double()
    expected = reference_probs(BASE, **settings)
    assert {i for i, p in enumerate(expected.tolist()) if p > 0} == kept
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-7)


def test_filters_vectorised_rows_match_reference():
    torch.manual_seed(3)
    logits = torch.randn(5, 40) * 2
    settings = [{"top_k": 7}, {"top_p": 0.6, "temperature": 0.8}, {"min_p": 0.2},
                {"top_k": 10, "top_p": 0.5, "min_p": 0.1, "temperature": 1.3}, {}]
    probs = Sampler().filtered_probs(logits, [make_state(**s) for s in settings]).double()
    for row, s in enumerate(settings):
        expected = reference_probs(logits[row], **s)
        torch.testing.assert_close(probs[row], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rows", [["peaked"], ["flat"], ["peaked", "flat"]])
def test_top_p_on_a_large_vocabulary(rows):
    # peaked rows find their set among the top tokens; flat rows need the full sort
    gen = torch.Generator().manual_seed(8)
    scale = {"peaked": 4.0, "flat": 0.05}
    logits = torch.stack([torch.randn(3000, generator=gen) * scale[r] for r in rows])
    probs = Sampler().filtered_probs(logits, [make_state(top_p=0.9) for _ in rows]).double()
    for row in range(len(rows)):
        torch.testing.assert_close(probs[row], reference_probs(logits[row], top_p=0.9),
                                   rtol=1e-5, atol=1e-8)


def test_top_p_reached_exactly_keeps_the_smallest_set():
    probs = Sampler().filtered_probs(torch.zeros(1, 4), [make_state(top_p=0.5)])[0]
    assert sorted(probs.tolist()) == [0.0, 0.0, 0.5, 0.5]  # 0.25 + 0.25 >= 0.5: stop at two


def test_top_p_off_keeps_tokens_whose_float32_mass_rounds_away():
    logits = torch.zeros(2, 50)
    logits[:, 0] = 20.0  # p0 rounds to 1.0 in float32; the rest are ~2e-9 each
    states = [make_state(top_p=1.0), make_state(top_p=0.5)]
    probs = Sampler().filtered_probs(logits, states)
    assert (probs[0] > 0).all()
    assert (probs[1] > 0).tolist() == [True] + [False] * 49


def test_empirical_distribution_matches_filtered_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -3.0])
    settings = {"temperature": 0.8, "top_p": 0.9}
    expected = reference_probs(logits, **settings)
    n = 40_000
    gen = torch.Generator().manual_seed(1234)
    states = [make_state(generator=gen, **settings) for _ in range(n)]
    tokens = torch.tensor(Sampler().sample(logits.expand(n, -1), states).token_ids)
    observed = torch.bincount(tokens, minlength=len(logits)).double()
    support = expected > 0
    assert observed[~support].sum() == 0  # filtered tokens never drawn
    e = expected[support] * n
    chi2 = ((observed[support] - e) ** 2 / e).sum().item()
    assert chi2 < 20.5  # chi-square, 4 dof, p = 0.0004


def test_seeded_row_draws_follow_the_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    expected = torch.softmax(logits[0].double(), -1)
    state = make_state(seed=99)
    sampler, n = Sampler(), 3000
    tokens = torch.tensor([sampler.sample(logits, [state]).token_ids[0] for _ in range(n)])
    observed = torch.bincount(tokens, minlength=4).double()
    chi2 = ((observed - expected * n) ** 2 / (expected * n)).sum().item()
    assert chi2 < 16.3  # 3 dof, p = 0.001


# ------------------------------------------------------------------ reproducibility


def run_steps(target_position, others, steps=12, vocab=500):
    """Sample `steps` tokens for a seed-7 request placed among `others`."""
    logit_gen = torch.Generator().manual_seed(5)
    target = make_state(seed=7, top_p=0.95, temperature=1.2)
    states = list(others)
    states.insert(target_position, target)
    sampler, out = Sampler(), []
    for _ in range(steps):
        logits = torch.randn(len(states), vocab, generator=logit_gen)
        target_logits = torch.randn(vocab, generator=torch.Generator().manual_seed(len(out)))
        logits[target_position] = target_logits
        token = sampler.sample(logits, states).token_ids[target_position]
        out.append(token)
        for s in states:
            s.append(token)
    return out


def test_same_seed_same_tokens_whatever_the_batch():
    shared = torch.Generator().manual_seed(0)
    alone = run_steps(0, [])
    crowd = [make_state(generator=shared), make_state(seed=7), make_state(temperature=0),
             make_state(seed=123, top_k=3), make_state(generator=shared, min_p=0.1)]
    assert run_steps(0, crowd[:2]) == alone
    assert run_steps(3, crowd[:3]) == alone
    assert run_steps(5, crowd) == alone


def test_different_seeds_and_sample_indices_differ():
    logits = torch.zeros(1, 1000)
    sampler = Sampler()

    def tokens(**kw):
        state = make_state(**kw)
        return [sampler.sample(logits, [state]).token_ids[0] for _ in range(8)]

    assert tokens(seed=1) == tokens(seed=1)
    assert tokens(seed=1) != tokens(seed=2)
    assert tokens(seed=1, sample_index=1) != tokens(seed=1)
    assert tokens(seed=1, sample_index=1) == tokens(seed=2)  # seed + index, as vLLM


# ------------------------------------------------------------------ penalties


def reference_penalised(logits, prompt, outputs, repetition=1.0, presence=0.0, frequency=0.0):
    out = logits.double().tolist()
    for t in set(prompt) | set(outputs):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(outputs):
        out[t] -= frequency * outputs.count(t) + presence
    return torch.tensor(out, dtype=torch.float64)


def test_penalties_match_float64_reference_and_update_incrementally():
    logits = torch.tensor([[1.5, -0.7, 2.0, 0.3, -1.2, 0.9, 1.9, 0.0]])
    prompt, settings = [1, 2, 2, 5], dict(repetition_penalty=1.3, presence_penalty=0.5,
                                          frequency_penalty=0.3, temperature=1.0)
    state = make_state(prompt=prompt, eos=None, **settings)
    sampler, outputs = Sampler(), []
    for new_tokens in ([], [3, 6, 6], [6, 0]):  # probe before and between appends
        for t in new_tokens:
            state.append(t)
            outputs.append(t)
        probs = sampler.filtered_probs(logits, [state])[0].double()
        expected = reference_penalised(logits[0], prompt, outputs, 1.3, 0.5, 0.3).softmax(-1)
        torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-7)
    assert logits[0].argmax() == 2  # the raw argmax ...
    greedy = make_state(prompt=prompt, eos=None, temperature=0, repetition_penalty=1.3)
    assert sampler.sample(logits, [greedy]).token_ids == [6]  # ... loses to the penalty
    assert logits[0, 2] == 2.0  # the caller's logits are left alone


def test_each_penalty_alone_in_one_batch():
    torch.manual_seed(2)
    logits = torch.randn(4, 30)
    prompt, outputs = [4, 9, 9, 11], [9, 12, 12, 12, 20]
    kinds = [dict(repetition_penalty=0.7), dict(presence_penalty=-1.5),
             dict(frequency_penalty=1.1), dict()]
    states = [make_state(prompt=prompt, **k) for k in kinds]
    for s in states:
        for t in outputs:
            s.append(t)
    probs = Sampler().filtered_probs(logits, states).double()
    for row, k in enumerate(kinds):
        expected = reference_penalised(
            logits[row], prompt, outputs, k.get("repetition_penalty", 1.0),
            k.get("presence_penalty", 0.0), k.get("frequency_penalty", 0.0))
        torch.testing.assert_close(probs[row], expected.softmax(-1), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ logprobs


def test_logprobs_are_raw_log_softmax_with_sorted_top_n():
    torch.manual_seed(4)
    logits = torch.randn(3, 64) * 3
    states = [make_state(logprobs=5, temperature=0.5, repetition_penalty=1.5, top_k=3, seed=0),
              make_state(),
              make_state(logprobs=0, temperature=0)]
    result = Sampler().sample(logits, states)
    reference = torch.log_softmax(logits.double(), -1)
    assert result.logprobs[1] is None and result.top_logprobs[1] is None
    for row in (0, 2):
        token = result.token_ids[row]
        assert result.logprobs[row] == pytest.approx(reference[row, token].item(), abs=1e-5)
    top = result.top_logprobs[0]
    values, ids = reference[0].topk(5)
    assert [t for t, _ in top] == ids.tolist()
    assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    assert result.top_logprobs[2] == []


def test_no_logprobs_fields_when_nobody_asks():
    result = Sampler().sample(torch.randn(2, 10), [make_state(), make_state()])
    assert isinstance(result, SampleResult)
    assert result.logprobs is None and result.top_logprobs is None


# ------------------------------------------------------------------ min_tokens


def test_min_tokens_blocks_eos_and_stop_token_ids():
    logits = torch.full((1, 10), -5.0)
    logits[0, EOS], logits[0, 3], logits[0, 5] = 10.0, 9.0, 1.0
    state = make_state(temperature=0, min_tokens=3, stop_token_ids=[3])
    assert state.stop_token_ids == {EOS, 3}
    sampler, tokens = Sampler(), []
    for _ in range(4):
        tokens.append(sampler.sample(logits, [state]).token_ids[0])
        state.append(tokens[-1])
    assert tokens == [5, 5, 5, EOS]


def test_min_tokens_with_ignore_eos_leaves_eos_sampleable():
    logits = torch.zeros(1, 10)
    logits[0, EOS] = 10.0
    state = make_state(temperature=0, min_tokens=3, ignore_eos=True)
    assert state.stop_token_ids == frozenset()
    assert Sampler().sample(logits, [state]).token_ids == [EOS]


def test_min_tokens_blocked_tokens_get_zero_probability_when_sampling():
    logits = torch.zeros(2, 10)
    logits[:, EOS] = 5.0
    states = [make_state(min_tokens=2, seed=3), make_state(seed=3)]
    probs = Sampler().filtered_probs(logits, states)
    assert probs[0, EOS] == 0 and probs[1, EOS] > 0.9
    assert math.isclose(probs[0].sum().item(), 1.0, rel_tol=1e-6)
