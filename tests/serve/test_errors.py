"""Bad requests get a 4xx in OpenAI's error schema and leave the engine clean; API keys;
body size limit; a client that goes away mid-request aborts it."""
from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from tests.serve.conftest import API_KEY, MODEL_NAME, wait_idle
from tests.serve.test_server import scrape

MSG = [{"role": "user", "content": "hi"}]

# (route, body (dict, or raw bytes), status, param, words the message must contain)
BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "hi",', 400, None, ["not valid JSON"]),
    ("/v1/completions", b'["hi"]', 400, None, ["object"]),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", ["prompt", "required"]),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", ["prompt", "list[int]"]),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", ["temperature", "hot"]),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "3"}, 400, "max_tokens", ["max_tokens"]),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model", ["gpt-9", "does not exist"]),
    ("/v1/completions", {"prompt": [5] * 300}, 400, "prompt", ["256", "300"]),
    ("/v1/completions", {"prompt": [5] * 10, "max_tokens": 250}, 400, "max_tokens", ["256", "260", "10", "250"]),
    ("/v1/completions", {"prompt": [5, 300]}, 400, "prompt", ["300", "vocabulary"]),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", ["empty"]),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", ["2 prompts"]),
    ("/v1/completions", {"prompt": "hi", "top_p": 2}, 400, "top_p", ["top_p", "2"]),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", ["temperature"]),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", ["n must be"]),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty", ["[-2, 2]"]),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs", ["logprobs", "50"]),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop", ["stop"]),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo", ["echo"]),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", ["messages"]),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "max_tokens": 2}, 400, "messages", ["messages"]),
    ("/v1/chat/completions", {"messages": MSG, "model": "nope"}, 404, "model", ["nope"]),
    ("/v1/chat/completions", {"messages": MSG, "max_completion_tokens": 1000}, 400,
     "max_completion_tokens", ["256", "1000"]),
    ("/v1/chat/completions", {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs", ["logprobs"]),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs", ["21"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 2000}]}, 400,
     "messages", ["context length"]),
]


@pytest.mark.parametrize("route,body,status,param,words", BAD_REQUESTS,
                         ids=[f"{i}-{r[0][4:]}-{r[3]}" for i, r in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_openai_error(http, route, body, status, param, words):
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    for word in words:
        assert word in error["message"], (word, error["message"])
    if status == 404:
        assert error["code"] == "model_not_found"


def test_errors_through_the_client_and_framework_errors(client, http, async_llm):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="missing", prompt="hi")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model=MODEL_NAME, messages=MSG, top_p=0)
    for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/completions", 405)):
        r = http.request(method, path)
        assert r.status_code == status and r.json()["error"]["message"]
    # none of it left anything in the engine, and the server still serves
    assert wait_idle(async_llm)
    assert client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).choices


def test_api_key(keyed_server, async_llm):
    url = keyed_server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # probes and scrapers need no key
    assert httpx.get(f"{url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    assert good.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).usage.completion_tokens <= 2


def test_body_over_the_limit_gets_413(keyed_server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    big = {"prompt": "hi " * 3000}
    r = httpx.post(f"{keyed_server.url}/v1/completions", json=big, headers=auth)
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit holds while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(f"{keyed_server.url}/v1/completions", content=chunked(), headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


LONG = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 250, "ignore_eos": True, "temperature": 0}
ABORTS = ("leanlm:request_success_total", (("finished_reason", "abort"),))


def test_client_disconnect_mid_stream_aborts_the_request(server, http, async_llm, engine_spy):
    before = scrape(http).get(ABORTS, 0)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()).startswith("data: {")
    assert wait_idle(async_llm, timeout=5), "the engine still holds the request"
    engine_spy.assert_aborted_early(LONG["max_tokens"])
    assert scrape(http).get(ABORTS, 0) == before + 1


def test_client_disconnect_during_non_streamed_request_aborts_it(server, http, async_llm, engine_spy):
    before = scrape(http).get(ABORTS, 0)
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 5
        while not async_llm.has_unfinished():  # hang up once the engine is generating
            assert time.monotonic() < deadline
            time.sleep(0.001)
    assert wait_idle(async_llm, timeout=5), "the engine still holds the request"
    engine_spy.assert_aborted_early(LONG["max_tokens"])
    assert scrape(http).get(ABORTS, 0) == before + 1
