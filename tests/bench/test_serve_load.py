"""`leanlm bench serve` against a fake OpenAI-compatible server with known timing: metric math,
failures (HTTP 500, a stream cut before [DONE], malformed chunks), request fields, concurrency
limit, Poisson arrivals, clear errors."""
import asyncio
import json
import math
import statistics
import threading
import time

import pytest

from leanlm.bench.serve_load import arrival_times, run_serve_bench
from leanlm.bench.sharegpt import SHAREGPT_FILE
from leanlm.cli import main

FIRST_S, GAP_S, CHUNKS = 0.05, 0.02, 3  # the fake's first text after 50 ms, then 2 more 20 ms apart


class FakeServer:
    """Streams CHUNKS text chunks per completion; a prompt containing FAIL gets HTTP 500, BREAK a
    stream cut before [DONE], GARBAGE a non-JSON chunk, NOUSAGE no usage chunk."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

        async def completions(request):
            body = await request.json()
            self.bodies.append(body)
            prompt = body.get("prompt") or body["messages"][0]["content"]
            if "FAIL" in prompt:
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            chat = "messages" in body

            def chunk(text):
                choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                return f"data: {json.dumps({'choices': [choice], 'usage': None})}\n\n"

            async def stream():
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    yield chunk("")  # role-only / empty first chunk: must not count as the first token
                    await asyncio.sleep(FIRST_S)
                    for i in range(CHUNKS):
                        if i:
                            await asyncio.sleep(GAP_S)
                        yield chunk(f"tok{i} ")
                        if "GARBAGE" in prompt:
                            yield "data: {not json\n\n"
                        if "BREAK" in prompt:
                            return
                    if "NOUSAGE" not in prompt:
                        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": 7,
                                 "total_tokens": len(prompt.split()) + 7}
                        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self.in_flight -= 1

            return StreamingResponse(stream(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"]),
                                 Route("/v1/chat/completions", completions, methods=["POST"])])


@pytest.fixture()
def fake():
    import uvicorn

    fake = FakeServer()
    server = uvicorn.Server(uvicorn.Config(fake.app(), host="127.0.0.1", port=0, log_level="error",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the fake server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    server.should_exit = True
    thread.join(timeout=5)


def write_prompts(folder, prompts):
    (folder / SHAREGPT_FILE).write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n"
                                                for i, p in enumerate(prompts)))


def test_cli_metrics_match_the_fake_servers_timing(fake, tmp_path, monkeypatch, capsys):
    prompts = ["one two three", "four five", "FAIL please", "BREAK here", "six", "GARBAGE in", "NOUSAGE x y"]
    write_prompts(tmp_path, prompts)
    monkeypatch.setenv("LEANLM_DATA", str(tmp_path))
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--base-url", fake.url, "--num-prompts", str(len(prompts)),
               "--output-len", "7", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert (r["completed"], r["failed"]) == (4, 3) and r["model"] == "fake-model"
    errors = r["errors"]
    assert "HTTP 500" in errors[2] and "boom" in errors[2]
    assert "without data: [DONE]" in errors[3] and "malformed chunk" in errors[5]
    assert [bool(e) for e in errors] == [False, False, True, True, False, True, False]
    # usage chunk counts where sent; the NOUSAGE reply falls back to its 3 text chunks
    assert r["output_lens"] == [7, 7, 0, 0, 7, 0, 3] and r["input_lens"] == [3, 2, 0, 0, 1, 0, 0]
    assert (r["total_output_tokens"], r["total_input_tokens"], r["requests_without_usage"]) == (24, 6, 1)
    d = r["duration"]
    assert 0.09 < d < 2.0
    assert r["request_throughput"] == pytest.approx(4 / d)
    assert r["output_throughput"] == pytest.approx(24 / d)
    assert r["total_token_throughput"] == pytest.approx(30 / d)
    slack = 0.25  # seconds: a busy 2-core machine, but far from the timing being wrong
    ok = [i for i, e in enumerate(errors) if not e]
    ttfts, e2els = [r["ttfts"][i] for i in ok], [r["e2els"][i] for i in ok]
    assert all(FIRST_S <= t < FIRST_S + slack for t in ttfts)
    assert all(FIRST_S + 2 * GAP_S <= e < FIRST_S + 2 * GAP_S + slack for e in e2els)
    assert r["mean_ttft_ms"] == pytest.approx(1e3 * statistics.mean(ttfts))
    assert r["median_e2el_ms"] == pytest.approx(1e3 * statistics.median(e2els))
    # 8 gaps of 20 ms at the server; delivery jitter can shorten one, not the middle of them by half
    assert GAP_S * 1e3 * 0.5 <= r["median_itl_ms"] < (GAP_S + slack) * 1e3 and r["p99_itl_ms"] >= r["median_itl_ms"]
    # TPOT = (e2el - ttft) / (tokens - 1): the usage replies claim 7 tokens over 2 gaps, NOUSAGE 3 tokens
    tpots = [(e2els[k] - ttfts[k]) / (n - 1) for k, n in enumerate([7, 7, 7, 3])]
    assert r["mean_tpot_ms"] == pytest.approx(1e3 * statistics.mean(tpots))
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p99"):
            assert isinstance(r[f"{stat}_{metric}_ms"], float), (stat, metric)
    assert (r["num_prompts"], r["output_len"], r["request_rate"], r["max_concurrency"]) == (7, 7, "inf", None)
    # what was sent: a warm-up, then one streaming request per prompt with the benchmark's fields
    sent = fake.bodies[1:]
    assert fake.bodies[0]["max_tokens"] == 4 and len(sent) == 7
    assert sorted(b["prompt"] for b in sent) == sorted(prompts)
    for b in sent:
        assert (b["model"], b["max_tokens"], b["stream"], b["ignore_eos"], b["temperature"]) == \
            ("fake-model", 7, True, True, 0.0)
        assert b["stream_options"] == {"include_usage": True}
    printed = capsys.readouterr()
    for word in ("successful requests", "TTFT", "TPOT", "ITL", "E2EL", "median", "p99"):
        assert word in printed.out
    assert "3 of 7 requests failed" in printed.err and "HTTP 500" in printed.err


def test_concurrency_limit_rate_and_chat_endpoint(fake):
    prompts = [f"prompt number {i}" for i in range(6)]
    r = run_serve_bench(fake.url, prompts, output_len=3, max_concurrency=2, endpoint="/v1/chat/completions",
                        model="named-model", num_warmups=0)
    assert (r["completed"], r["failed"], fake.max_in_flight) == (6, 0, 2)
    assert all(b["messages"] == [{"role": "user", "content": p}] for b, p in
               zip(sorted(fake.bodies, key=lambda b: b["messages"][0]["content"]), sorted(prompts)))
    assert {b["model"] for b in fake.bodies} == {"named-model"}
    # 6 requests two at a time: three rounds of a ~90 ms stream
    assert r["duration"] >= 3 * (FIRST_S + 2 * GAP_S)
    r = run_serve_bench(fake.url, prompts[:3], output_len=3, rate=20.0, seed=1, num_warmups=0)
    assert r["completed"] == 3 and r["request_rate"] == 20.0
    assert r["duration"] >= arrival_times(3, 20.0, seed=1)[-1] + FIRST_S + 2 * GAP_S


def test_arrival_times_are_seeded_poisson():
    assert arrival_times(4, math.inf, seed=0) == [0.0] * 4
    a = arrival_times(4000, 10.0, seed=3)
    assert a == arrival_times(4000, 10.0, seed=3) != arrival_times(4000, 10.0, seed=4)
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert a[0] == 0 and min(gaps) >= 0
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.1)  # exponential: mean = stdev = 1/rate
    assert statistics.stdev(gaps) == pytest.approx(0.1, rel=0.15)


def test_bad_values_and_unreachable_server_are_clear_errors(fake, tmp_path, monkeypatch, capsys):
    write_prompts(tmp_path, ["a b", "FAIL"])
    monkeypatch.setenv("LEANLM_DATA", str(tmp_path))
    for flag, value, msg in (("--request-rate", "-1", "positive number of requests/s or inf, got '-1'"),
                             ("--request-rate", "0", "got '0'"), ("--request-rate", "fast", "got 'fast'"),
                             ("--num-prompts", "0", "positive integer"),
                             ("--max-concurrency", "0", "positive integer"),
                             ("--timeout", "-5", "positive number of seconds, got '-5'")):
        with pytest.raises(SystemExit):
            main(["bench", "serve", "--base-url", fake.url, flag, value])
        assert msg in capsys.readouterr().err
    assert main(["bench", "serve", "--base-url", fake.url, "--num-prompts", "5"]) == 2
    assert "fewer than the 5" in capsys.readouterr().err
    # nothing listens on a port we just closed
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["bench", "serve", "--base-url", dead, "--num-prompts", "1"]) == 2
    assert f"cannot reach the server at {dead}" in capsys.readouterr().err
    # a setup error (here: every request is refused) stops the bench at the warm-up, naming the reason
    monkeypatch.setattr("leanlm.bench.serve_load.WARMUP_PROMPT", "FAIL on purpose")
    with pytest.raises(ValueError, match="warm-up request .* failed: HTTP 500"):
        run_serve_bench(fake.url, ["x"], output_len=2)
    with pytest.raises(ValueError, match="must start with http"):
        run_serve_bench("127.0.0.1:8000", ["x"])
