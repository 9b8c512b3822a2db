"""early-exit:auto (DEL): the cost model's choice of exit layer and draft length, the acceptance
estimator, and end to end on tiny models built so that one exit layer agrees with the target
(DEL must find it and draft from it) or none does (DEL must turn itself off); greedy output is
plain greedy's token for token either way."""
import shutil
from pathlib import Path

import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.spec.cost import CostModel, expected_tokens
from leanlm.spec.dynamic_exit import AcceptanceEstimator, candidate_layers

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(0.7, 0) == 1.0


def test_cost_model_picks_the_exit_layer_and_draft_length_by_hand():
    # 4 layers, free head, free extra tokens: a step exiting at E with k drafts costs
    # k·E/4 (draft passes) + E/4 (the last draft's layers < E) + (4-E)/4 (verification)
    c = CostModel(4, head_frac=0.0, token_cost=0.0)
    assert c.early_exit_step(1, 2, 3) == pytest.approx(1 + 0.5 * 3)
    # E=2, α=0.9: T/(1+k/2) = 1.267, 1.355, 1.376, 1.365 for k = 1..4 -> k=3
    # E=1, α=0.6: T/(1+k/4) = 1.28, 1.307, 1.243 -> best 1.307 < 1.376
    E, k, gain = c.best_early_exit({1: [0.6], 2: [0.9]}, batch=1, k_max=6)
    assert (E, k) == (2, 3) and gain == pytest.approx((1 - 0.9 ** 4) / 0.1 / 2.5)
    assert c.best_early_exit({1: [0.0], 2: [0.05]}, batch=1, k_max=6) == (0, 0, 1.0)


def test_batch_size_turns_drafting_down():
    """The same acceptance pays at batch 1 and not at batch 32: verifying k+1 tokens per
    sequence costs more as the forward turns compute-bound; k shrinks on the way."""
    c = CostModel(30, head_frac=0.2, token_cost=0.1)
    ks = [c.best_early_exit({10: [0.9] * b, 20: [0.95] * b}, b, 6)[:2] for b in (1, 4, 32)]
    assert ks[0][1] >= ks[1][1] >= 1 and ks[2] == (0, 0)
    ngram = [c.best_draft_length(0.7, b, 8, lambda bb, k: c.draft_step(bb, k, 0.0)) for b in (1, 8, 32)]
    assert ngram[0][0] > ngram[1][0] >= 1 and ngram[2] == (0, 1.0)
    # per-sequence estimates: a sequence that never agrees pulls the choice down
    good = c.best_early_exit({10: [0.9, 0.9]}, 2, 6)
    mixed = c.best_early_exit({10: [0.9, 0.0]}, 2, 6)
    assert mixed[2] < good[2]


def test_estimator_global_prior_and_per_sequence_context():
    est = AcceptanceEstimator(2)
    assert est.alpha("a", 0) == 0.0  # nothing seen: no reason to draft
    est.observe("a", 0, [True] * 30)
    est.observe("b", 0, [False] * 30)
    g = est.global_alpha(0)
    assert 0.4 < g < 0.6
    assert est.alpha("new", 0) == pytest.approx(g)      # a new context starts from the prior
    assert est.alpha("a", 0) > 0.8 > 0.2 > est.alpha("b", 0)  # (9.6 + 4g) / 13.6 with g ~ 0.43
    est.observe("a", 0, [False] * 10)                   # the context changed: it follows fast
    assert est.alpha("a", 0) < 0.5
    est.drop("a")
    assert est.alpha("a", 0) == pytest.approx(est.global_alpha(0))


def test_candidate_layers():
    assert candidate_layers(30) == [4, 7, 10, 13, 16, 19, 22, 25, 28]
    assert candidate_layers(3) == [1, 2]


def scaled_model(src: str, out: Path, scale: float) -> str:
    """The tiny model with its last layer's residual writes (o_proj, down_proj) scaled."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in Path(src).iterdir():
        shutil.copy(f, out / f.name)
    tensors = load_file(out / "model.safetensors")
    for name in list(tensors):
        if "layers.2." in name and ("o_proj" in name or "down_proj" in name):
            tensors[name] = tensors[name] * scale
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


def prompts(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 300, (10 + 4 * i,), generator=g).tolist() for i in range(n)]


def ids(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return str(tiny_model_dir("qwen3"))


def test_finds_the_agreeing_exit_layer_and_stays_exact(base, tmp_path):
    # layer 2 nearly an identity: exiting after layer 2 agrees with the target almost always
    path = scaled_model(base, tmp_path / "late-identity", 0.02)
    want = ids(LLM(path).generate(prompts(), GREEDY))
    llm = LLM(path, spec="early-exit:auto", spec_calibrate=False)  # the prior β: a fixed policy
    assert [ids(llm.generate([p], GREEDY))[0] for p in prompts()] == want
    assert ids(llm.generate(prompts(), GREEDY)) == want  # batched: one exit layer for the step
    s = llm.engine.stats().spec
    assert s.drafted > 0 and s.accepted / s.drafted > 0.8
    used = {c for c in s.choices if c.startswith("E=")}
    assert used and all(c.startswith("E=2:") for c in used), s.choices
    assert s.layer_acceptance[2] > 0.8 and set(s.layer_acceptance) == {1, 2}
    assert llm.engine.stats().kv_blocks_used == 0


def test_turns_itself_off_when_no_layer_agrees(base, tmp_path):
    # layer 2 dominating the output: no earlier exit predicts the target's tokens
    path = scaled_model(base, tmp_path / "late-heavy", 30.0)
    want = ids(LLM(path).generate(prompts(), GREEDY))
    llm = LLM(path, spec="early-exit:auto", spec_calibrate=False)  # the prior β: a fixed policy
    est = llm.engine.speculator.proposer.estimator
    est.hits, est.count = [50.0, 50.0], [50.0, 50.0]  # start convinced that every layer agrees
    assert ids(llm.generate(prompts(), GREEDY)) == want
    s = llm.engine.stats().spec
    assert s.drafted > 0  # it did try, on the false belief
    assert max(est.global_alpha(0), est.global_alpha(1)) < 0.5
    tokens = 40 * len(prompts())
    assert s.drafted < tokens / 4 and s.choices["off"] > s.target_forwards / 2, s
    before = s.drafted
    assert ids(llm.generate(prompts()[:1], GREEDY)) == want[:1]
    assert llm.engine.stats().spec.drafted == before  # off: plain decoding, still exact
