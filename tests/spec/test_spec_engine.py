"""Speculative decoding in the engine on a tiny random model (qwen3: its greedy outputs vary, so
drafts are both accepted and rejected): greedy outputs are token for token plain greedy's, alone
and inside a continuous batch, under KV codecs and weight quantization; rollback frees blocks and
leaves the cache as a plain run leaves it; seeded sampling stays reproducible."""
from pathlib import Path

import pytest
import torch

from leanlm import LLM, LLMEngine, SamplingParams
from leanlm.config import EngineConfig

GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


def prompts(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, 300, (12 + 5 * i,), generator=g).tolist()
        out.append(p + p[:8])  # a repeat, so n-gram lookup finds matches
    return out


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def speculating(llm):
    """Believe the proposer's drafts are always accepted, with the prior β and a cheap draft model
    (on a tiny model the measured costs are timing noise around per-call overhead), so that the batch-size turn-down
    (tests/spec/test_policy.py) keeps drafting in these batches: here the point is that batched
    verification and rollback stay exact, whatever the acceptance."""
    from dataclasses import replace

    from leanlm.spec.cost import TOKEN_COST

    sp = (llm.engine if hasattr(llm, "engine") else llm).speculator
    sp.set_estimate(1.0, weight=1e9)
    sp.cost = replace(sp.cost, token_cost=TOKEN_COST)  # not the tiny model's noisy measurement
    if hasattr(sp.proposer, "draft_cost"):
        sp.proposer.draft_cost = 0.1
    return llm


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return str(tiny_model_dir("qwen3"))


@pytest.fixture(scope="module")
def draft_path(path, tmp_path_factory):
    """The target with noise on its last layer's MLP: a draft that agrees often but not always."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-draft")
    for f in Path(path).iterdir():
        shutil.copy(f, out / f.name)
    tensors = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    for name, t in tensors.items():
        if "layers.2.mlp" in name:
            tensors[name] = t + 0.5 * t.std() * torch.randn(t.shape, generator=g)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


@pytest.fixture(scope="module")
def expected(path):
    return token_ids(LLM(path, block_size=4).generate(prompts(), GREEDY))


def specs(path, draft_path):
    return ["ngram:n=2:k=4", "early-exit:1:k=3", "early-exit:2:k=5", f"draft:{draft_path}:k=3",
            "self:rtn:int4:g32:k=4"]


@pytest.mark.parametrize("which", range(5), ids=["ngram", "early-exit-1", "early-exit-2", "draft", "self"])
def test_greedy_identical_alone_and_batched(path, draft_path, expected, which):
    llm = speculating(LLM(path, spec=specs(path, draft_path)[which], block_size=4))
    alone = [token_ids(llm.generate([p], GREEDY))[0] for p in prompts()]
    assert alone == expected
    drafted_alone = llm.engine.stats().spec.drafted
    assert token_ids(llm.generate(prompts(), GREEDY)) == expected
    s = llm.engine.stats()
    assert s.spec.drafted > drafted_alone  # the batch drafted too
    assert s.spec.drafted > 0 and 0 < s.spec.accepted <= s.spec.drafted
    if which in (1, 3):  # these drafts disagree with the target somewhere: rejection is exercised
        assert s.spec.accepted < s.spec.drafted
    assert s.kv_blocks_used == 0  # every block back, the draft model's too
    if which >= 3:
        assert llm.engine.speculator.proposer.cache.usage()[0] == 0


def test_requests_joining_mid_run(path, expected):
    """Continuous batching: requests arrive while others verify drafts, one of them with a
    repetition penalty (it drafts too, each position with its own penalty state)."""
    engine = speculating(LLMEngine(EngineConfig(model=path, spec="early-exit:2:k=3", block_size=4)))
    penalised = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3)
    plain_penalised = token_ids(LLM(path, block_size=4).generate(prompts()[:1], penalised))[0]
    done = {}
    ps = prompts()
    for step in range(400):
        if step % 2 == 0 and step // 2 < len(ps):
            engine.add_request(str(step // 2), ps[step // 2], GREEDY)
        if step == 3:
            engine.add_request("pen", ps[0], penalised)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        if len(done) == len(ps) + 1:
            break
    assert [done[str(i)] for i in range(len(ps))] == expected
    assert done["pen"] == plain_penalised
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("kv", ["fp8:e4m3", "kivi:4", "bfp:8"])
def test_greedy_identical_under_kv_codecs(path, kv):
    want = token_ids(LLM(path, kv=kv).generate(prompts(), GREEDY))
    for spec in ("ngram:n=2:k=4", "early-exit:2:k=3"):
        llm = speculating(LLM(path, kv=kv, spec=spec))
        assert token_ids(llm.generate(prompts(), GREEDY)) == want, spec
        assert llm.engine.stats().spec.drafted > 0


def test_greedy_identical_under_weight_quantization(path):
    want = token_ids(LLM(path, quant="rtn:int8").generate(prompts(), GREEDY))
    llm = speculating(LLM(path, quant="rtn:int8", spec="early-exit:1:k=4"))
    assert token_ids(llm.generate(prompts(), GREEDY)) == want


def test_rollback_leaves_the_cache_as_plain_decoding(path):
    """At the same length, a speculating sequence holds as many blocks as a plain one, with the
    same K/V in every committed slot (rejected drafts were written and rolled back)."""
    runs = {}
    for spec in (None, "early-exit:1:k=5"):
        engine = LLMEngine(EngineConfig(model=path, spec=spec, block_size=4, enable_prefix_caching=False))
        engine.add_request("a", prompts()[1], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
        seq = engine.requests["a"].seqs[0]
        while seq.num_output_tokens < 25:
            engine.step()
        runs[spec] = (engine, seq)
    (plain, ps), (spec_engine, ss) = runs[None], runs["early-exit:1:k=5"]
    assert spec_engine.stats().spec.accepted < spec_engine.stats().spec.drafted  # drafts were rejected
    while len(ps.token_ids) < len(ss.token_ids):
        plain.step()
    assert ps.token_ids == ss.token_ids and ps.num_cached == ss.num_cached
    assert len(ss.kv.blocks) == len(ps.kv.blocks) == -(-ss.num_cached // 4)
    assert spec_engine.stats().kv_blocks_used == plain.stats().kv_blocks_used
    n = ss.num_cached
    for layer in range(len(plain.model.layers)):
        for a, b in zip(plain.cache.codec.read_blocks(layer, torch.tensor([ps.kv.blocks])),
                        spec_engine.cache.codec.read_blocks(layer, torch.tensor([ss.kv.blocks]))):
            torch.testing.assert_close(b[0, :n], a[0, :n])


def test_prefix_cache_hashes_only_committed_tokens(path):
    """Blocks registered in the prefix cache by a speculating run serve a later plain request."""
    llm = LLM(path, spec="ngram:n=2:k=4", block_size=4)
    first = token_ids(llm.generate(prompts()[:1], GREEDY))[0]
    full = prompts()[0] + first
    hits_before = llm.engine.stats().prefix_cache_hits
    again = token_ids(llm.generate([full[:-1]], SamplingParams(temperature=0, max_tokens=1)))[0]
    assert again == [first[-1]]
    assert llm.engine.stats().prefix_cache_hits - hits_before >= (len(full) - 2) // 4 * 4 - 4


def test_seeded_sampling_is_reproducible_and_batch_independent(path):
    p = SamplingParams(temperature=0.8, top_k=40, max_tokens=24, seed=11, ignore_eos=True)
    llm = speculating(LLM(path, spec="early-exit:2:k=3"))
    alone = token_ids(llm.generate(prompts()[:1], p))[0]
    assert token_ids(llm.generate(prompts()[:1], p))[0] == alone
    assert token_ids(llm.generate(prompts(), p))[0] == alone
    assert llm.engine.stats().spec.drafted > 0


def test_no_drafting_in_large_batches(path, expected):
    llm = LLM(path, spec="ngram:n=2:k=4", spec_max_batch=2)
    assert token_ids(llm.generate(prompts(), GREEDY)) == expected
    alone = llm.engine.stats().spec.drafted
    assert token_ids(llm.generate(prompts()[:1], GREEDY)) == expected[:1]
    assert llm.engine.stats().spec.drafted > alone  # batch 1 drafts again


def test_self_draft_head_is_shared_or_quantized(path):
    from leanlm.quant.weight_only import WeightOnlyMethod

    shared = LLM(path, spec="self:rtn:int8").engine
    assert shared.speculator.proposer.model.lm_head is shared.model.lm_head
    own = LLM(path, spec="self:rtn:int8:head=quant").engine
    head = own.speculator.proposer.model.lm_head
    assert head is not own.model.lm_head and isinstance(head.method, WeightOnlyMethod)
    assert own.speculator.proposer.model.embed_tokens is own.model.embed_tokens  # still shared
    plain = [o.outputs[0].token_ids for o in LLM(path).generate(prompts(), GREEDY)]
    llm = speculating(LLM(path, spec="self:rtn:int8:head=quant"))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts(), GREEDY)] == plain
    assert llm.engine.stats().spec.accepted > 0


def test_streamed_deltas_carry_every_verified_token(path):
    """A step that accepts drafts appends several tokens: its delta must hold all their text (it
    held only the last token's, so `leanlm generate --spec` and SSE streams dropped text)."""
    llm = speculating(LLM(path, spec="self:rtn:int8"))
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    text, sizes, last = "", [], None
    for out in llm.stream(prompts()[0], p):
        text += out.deltas.get(0, "")
        sizes.append(len(out.outputs[0].token_ids) - (len(last.outputs[0].token_ids) if last else 0))
        last = out
    assert max(sizes) > 1  # some step emitted accepted drafts
    assert text == last.outputs[0].text and len(last.outputs[0].token_ids) == 30
