"""End to end through the engine on tiny random models: batched generation equals transformers'
greedy generate, is independent of batch composition, and honours the sampling parameters."""
import pytest
import torch

from leanlm import LLM, SamplingParams

PROMPTS = [[5, 17, 42], [7] * 11 + [99, 3], [250, 1, 2, 3, 4, 5, 6], [33]]


def hf_greedy(path, prompt, n):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def llama_llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), dtype="float32")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_batched_greedy_equals_transformers_generate(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    llm = LLM(str(path), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 12), arch
        assert out.outputs[0].finish_reason == "length"


def test_batch_composition_and_chunking_do_not_change_greedy_output(tiny_model_dir):
    path = str(tiny_model_dir("qwen2"))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in LLM(path).generate(PROMPTS, params)]
    alone = [LLM(path).generate([p], params)[0].outputs[0].token_ids for p in PROMPTS]
    # two seats and 4-token steps: requests queue, prompts are prefilled in chunks mixed with decodes
    tight = LLM(path, max_num_seqs=2, max_num_batched_tokens=4)
    chunked = [o.outputs[0].token_ids for o in tight.generate(PROMPTS, params)]
    assert together == alone == chunked


def test_seeded_sampling_is_per_request(llama_llm):
    p = SamplingParams(temperature=1.0, max_tokens=8, seed=1234, ignore_eos=True)
    other = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=5, ignore_eos=True)
    alone = llama_llm.generate([PROMPTS[0]], p)[0].outputs[0].token_ids
    mixed = llama_llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [other, p, other])
    assert mixed[1].outputs[0].token_ids == alone
    different = llama_llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=8, seed=99,
                                                                ignore_eos=True))
    assert different[0].outputs[0].token_ids != alone


def test_n_samples_are_distinct_and_reproducible(llama_llm):
    p = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    a = llama_llm.generate([PROMPTS[2]], p)[0]
    b = llama_llm.generate([PROMPTS[2]], p)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    single = llama_llm.generate([PROMPTS[2]], SamplingParams(temperature=1.0, max_tokens=8, seed=7,
                                                             ignore_eos=True))[0]
    assert single.outputs[0].token_ids == a.outputs[0].token_ids  # sample 0 uses the seed itself


def test_stop_token_ids_max_tokens_and_eos(llama_llm):
    greedy = llama_llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    ids = greedy[0].outputs[0].token_ids
    stop_id = ids[4]
    out = llama_llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                          stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == ids[: ids.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    short = llama_llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert short[0].outputs[0].token_ids == ids[:3] and short[0].outputs[0].finish_reason == "length"
    # EOS ends generation unless ignore_eos: make the EOS the token greedy would produce next
    llm_eos = llama_llm.engine
    saved = set(llm_eos.eos_token_ids)
    try:
        llm_eos.eos_token_ids.clear()
        llm_eos.eos_token_ids.add(ids[2])
        out = llama_llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
        assert out.token_ids == ids[: ids.index(ids[2]) + 1]
        assert out.finish_reason == "stop" and out.stop_reason is None
    finally:
        llm_eos.eos_token_ids.clear()
        llm_eos.eos_token_ids.update(saved)


def test_stop_string_truncates_text(llama_llm):
    full = llama_llm.generate(["hello world"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    text = full[0].outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    out = llama_llm.generate(["hello world"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                             stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]


def test_logprobs_are_log_softmax_of_the_model(llama_llm, tiny_model_dir):
    import transformers as tf

    out = llama_llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=3, logprobs=4,
                                                          ignore_eos=True))[0].outputs[0]
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()
    seq = PROMPTS[1] + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
    assert len(out.logprobs) == 3
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(PROMPTS[1]) - 1 + i]
        assert abs(entry[tok].logprob - row[tok].item()) < 1e-4
        best = torch.topk(row, 4).indices.tolist()
        assert [t for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 99)][:4] == best
        assert entry[tok].rank == 1  # greedy picks the top token
    assert abs(out.cumulative_logprob - sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs))) < 1e-6


def test_chat_applies_the_template(llama_llm):
    msgs = [{"role": "user", "content": "hello"}]
    out = llama_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    tok = llama_llm.get_tokenizer()
    expected = tok.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert out.prompt_token_ids == expected
    assert tok.tok.token_to_id("<|im_start|>") in expected


def test_stream_deltas_add_up_to_the_text(llama_llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    deltas = [o.deltas[0] for o in llama_llm.stream("the quick", params)]
    final = llama_llm.generate(["the quick"], params)[0].outputs[0].text
    assert "".join(deltas) == final and len(deltas) == 10


@pytest.mark.parametrize("bad, match", [
    (dict(prompts=[[1] * 300]), "context"),
    (dict(prompts=[""]), "empty"),
    (dict(prompts=[[1, 2, 999]]), "vocabulary"),
    (dict(prompts=[3.5]), "string or a list"),
])
def test_bad_prompts_raise_clear_errors(llama_llm, bad, match):
    with pytest.raises(ValueError, match=match):
        llama_llm.generate(bad["prompts"], SamplingParams(max_tokens=2))
    assert not llama_llm.engine.has_unfinished()  # nothing half-queued


def test_bad_engine_arguments(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown model"):
        LLM("/no/such/model")
    with pytest.raises(ValueError, match="dtype 'float8'"):
        LLM(str(tiny_model_dir("llama")), dtype="float8")
    with pytest.raises(ValueError, match="device"):
        LLM(str(tiny_model_dir("llama")), device="tpu")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(tiny_model_dir("llama")), max_model_len=10**6)


def test_bfloat16_engine_generates(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="bfloat16")
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 5 for o in out)


def test_score_equals_transformers_log_softmax_for_any_chunk(llama_llm, tiny_model_dir):
    import transformers as tf

    seq = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
    ref = logp[:-1].gather(1, torch.tensor(seq[1:])[:, None]).squeeze(1)
    for chunk in (1, 7, 64):
        got = llama_llm.score(seq, chunk=chunk)
        assert got.shape == (39,) and torch.allclose(got, ref, atol=1e-4), chunk
    assert llama_llm.engine.stats().kv_blocks_used == 0  # the blocks were returned
