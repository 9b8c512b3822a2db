"""The OpenAI-compatible server through the official `openai` client: completions and chat,
streamed and not, usage, n, seeds, stop strings, logprobs, tokenizer routes and metrics."""
from __future__ import annotations

import pytest

from leanlm import LLM, SamplingParams
from tests.serve.conftest import MODEL_NAME, wait_idle

PROMPT = "hello world, the quick brown fox"
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the lazy dog"}]


def scrape(http) -> dict[tuple, float]:
    """/metrics as {(sample name, sorted labels without model_name): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_models_and_health(client, http):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME] and models[0].object == "model"
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    assert http.get("/health").status_code == 200


def test_greedy_completion_equals_offline_llm(client, model_path):
    offline = LLM(str(model_path), dtype="float32").generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL_NAME
    assert r.choices[0].text == offline.outputs[0].text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    by_ids = client.completions.create(model=MODEL_NAME, prompt=offline.prompt_token_ids, **GREEDY)
    assert by_ids.choices[0].text == offline.outputs[0].text


def test_streamed_completion_equals_non_streamed(client):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.id == chunks[0].id for c in chunks)


def test_chat_streamed_equals_non_streamed(client):
    full = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, **GREEDY)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content and full.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-1].usage.model_dump() == {**full.usage.model_dump()}
    # max_completion_tokens is chat's newer name for max_tokens
    short = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=0,
                                           max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3 and msg.content.startswith(short.choices[0].message.content)


def test_n_samples_with_seed_are_distinct_and_reproducible(client):
    def run():
        r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, n=2, seed=1234, temperature=1.0,
                                      max_tokens=8, extra_body={"ignore_eos": True})
        assert sorted(c.index for c in r.choices) == [0, 1] and r.usage.completion_tokens == 16
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = run()
    assert first == run() and first[0] != first[1]
    # streamed chat with n=2: both choices open with the role and get their own deltas
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, n=2, seed=7,
                                                 max_tokens=5, stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_stop_strings(client):
    text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY).choices[0].text
    stop = text[4:6]
    expected = text[:text.index(stop)]
    for stops in (stop, ["zzzz", stop]):
        r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, stop=stops, **GREEDY)
        assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
        assert r.choices[0].model_extra["stop_reason"] == stop
        streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, stop=stops, stream=True, **GREEDY)
        assert "".join(c.choices[0].text for c in streamed) == expected


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert "".join(lp.tokens) == r.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(value)  # greedy: the chosen token is the best
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, logprobs=3, stream=True, **GREEDY))
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, logprobs=True, top_logprobs=2, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 12
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())
    plain = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, logprobs=True, **GREEDY)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert client.chat.completions.create(model=MODEL_NAME, messages=CHAT, **GREEDY).choices[0].logprobs is None


def test_tokenize_and_detokenize(http, async_llm):
    r = http.post("/tokenize", json={"prompt": PROMPT})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == async_llm.tokenizer.encode(PROMPT) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 256
    chat = http.post("/tokenize", json={"model": MODEL_NAME, "messages": CHAT}).json()
    assert chat["tokens"] == async_llm.tokenizer.encode_chat(CHAT)
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": PROMPT}
    assert http.post("/tokenize", json={}).status_code == 400
    assert http.post("/detokenize", json={"tokens": [5, 300]}).json()["error"]["param"] == "tokens"


def test_metrics_count_requests_and_engine_is_empty_after(client, http, async_llm):
    before = scrape(http)
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY)
    client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2, stop=None)
    assert wait_idle(async_llm)
    after = scrape(http)

    def moved(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert moved("leanlm:prompt_tokens_total") >= r.usage.prompt_tokens + 1
    assert moved("leanlm:generation_tokens_total") >= r.usage.completion_tokens + 1
    assert moved("leanlm:request_success_total", (("finished_reason", "length"),)) >= 1
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert moved(f"leanlm:{hist}_count") >= 1
        assert after[(f"leanlm:{hist}_bucket", (("le", "+Inf"),))] == after[(f"leanlm:{hist}_count", ())]
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_blocks_used"):
        assert after[(f"leanlm:{gauge}", ())] == 0, gauge
    for name in ("kv_blocks_free", "kv_cache_usage_perc", "prefix_cache_hit_rate"):
        assert (f"leanlm:{name}", ()) in after


def test_sse_payload_is_one_line_for_any_client():
    """U+0085 / U+2028 / U+2029 are line breaks to str.splitlines (httpx's aiter_lines): the
    server escapes them so a chunk holding them still arrives as one `data:` line."""
    import json

    from leanlm.serve.serving import sse

    text = "a\x85b\u2028c\u2029d\né\x0c"
    event = sse({"text": text})
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event[len("data: "):-2])["text"] == text
