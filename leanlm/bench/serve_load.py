"""`leanlm bench serve`: a load generator for an OpenAI-compatible server, as vLLM's
benchmark_serving: ShareGPT prompts sent as streaming requests at a Poisson rate (or all at
once), optionally at most C in flight; latency per request, throughput over the whole run.

Per request, timed on this client's clock from just before the request is sent:
- TTFT: until the first chunk that carries text;
- ITL: the gaps between successive chunks that carry text (each usually one token);
- E2EL: until `data: [DONE]`;
- TPOT: (E2EL - TTFT) / (output tokens - 1), for requests of more than one token;
- output tokens: the usage chunk's `completion_tokens` (`stream_options.include_usage`), else the
  number of text chunks.
A non-2xx reply, a broken or malformed stream, an error object in the stream, a stream without
text or without `[DONE]` make a request failed; its error is kept and it counts in no metric.
Duration runs from the first request's send to the last reply's end; throughputs divide by it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

from leanlm.bench.report import positive_int, print_table, write_json
from leanlm.bench.sharegpt import add_dataset_arg, load_prompts

WARMUP_PROMPT = "Hello, how are you today?"  # not a ShareGPT prompt: no prefix-cache hit for the run


@dataclass
class RequestResult:
    success: bool = False
    prompt_tokens: int = 0        # from the usage chunk; 0 when the server sent none
    output_tokens: int = 0
    usage_reported: bool = False
    ttft: float = 0.0             # seconds
    itl: list[float] = field(default_factory=list)
    e2el: float = 0.0
    error: str = ""


class StreamError(Exception):
    pass


def _positive_float(value: str, allow_inf: bool, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0 or math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise argparse.ArgumentTypeError(f"must be a positive number of {what}, got {value!r}")
    return number


def request_rate(value: str) -> float:
    """argparse type: requests per second > 0, or inf (every request at once)."""
    return _positive_float(value, True, "requests/s or inf")


def positive_seconds(value: str) -> float:
    """argparse type: a number of seconds > 0."""
    return _positive_float(value, False, "seconds")


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: a Poisson process of `rate` requests/s (exponential
    gaps, fixed by `seed`; the first request at 0), or all at 0 when the rate is infinite."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def _chunk_text(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def sse_lines(resp):
    """The lines of an SSE body, split as the SSE spec says (LF, CRLF): httpx's aiter_lines splits
    like str.splitlines, also on U+2028, U+0085 and friends, which JSON text may hold unescaped."""
    buffer = b""
    async for data in resp.aiter_bytes():
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:  # 0x0A never occurs inside a UTF-8 multi-byte character
            yield line.removesuffix(b"\r").decode("utf-8", "replace")
    if buffer:
        yield buffer.removesuffix(b"\r").decode("utf-8", "replace")


async def send_request(client, url: str, body: dict, headers: dict, chat: bool) -> RequestResult:
    """One streaming request; never raises (a failure is a result with its error)."""
    import httpx

    res = RequestResult()
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if not 200 <= resp.status_code < 300:
                text = (await resp.aread()).decode("utf-8", "replace").strip()
                raise StreamError(f"HTTP {resp.status_code}: {text[:300]}")
            last, chunks, done = None, 0, False
            async for line in sse_lines(resp):
                if not line or line.startswith(":"):  # event separator / SSE comment
                    continue
                if not line.startswith("data:"):
                    raise StreamError(f"not a server-sent event line: {line[:120]!r}")
                data = line[5:].strip()
                now = time.perf_counter()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    raise StreamError(f"malformed chunk (not JSON): {data[:120]!r}") from None
                if not isinstance(chunk, dict):
                    raise StreamError(f"malformed chunk (not an object): {data[:120]!r}")
                if chunk.get("error"):
                    raise StreamError(f"error in stream: {json.dumps(chunk['error'])[:300]}")
                if _chunk_text(chunk, chat):
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last, chunks = now, chunks + 1
                usage = chunk.get("usage")
                if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                    res.output_tokens = int(usage["completion_tokens"])
                    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    res.usage_reported = True
            if not done:
                raise StreamError(f"stream ended without data: [DONE] after {chunks} text chunks")
            if chunks == 0:
                raise StreamError("stream carried no text")
            res.e2el = now - t0
            if not res.usage_reported:
                res.output_tokens = chunks
            res.success = True
    except StreamError as e:
        res.error = str(e)
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except Exception as e:  # noqa: BLE001 - one bad request must not end the benchmark
        res.error = f"{type(e).__name__}: {e}"
    return res


def request_body(endpoint: str, model: str, prompt: str, output_len: int) -> dict:
    body = {"model": model, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if _is_chat(endpoint):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _is_chat(endpoint: str) -> bool:
    return endpoint.rstrip("/").endswith("chat/completions")


def _url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + "/" + path.lstrip("/")


async def served_model(client, base_url: str, headers: dict, model: str | None) -> str:
    """`model`, else the first id /v1/models lists; a ValueError when the server cannot be reached."""
    import httpx

    try:
        resp = await client.get(_url(base_url, "/v1/models"), headers=headers)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach the server at {base_url} ({type(e).__name__}: {e}); start one "
                         f"(leanlm serve) or pass --base-url") from None
    if model:
        return model
    try:
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"could not read a model name from {_url(base_url, '/v1/models')} "
                         f"(HTTP {resp.status_code}); pass --model") from None


async def benchmark(base_url: str, prompts: list[str], output_len: int = 128, model: str | None = None,
                    rate: float = math.inf, max_concurrency: int | None = None,
                    endpoint: str = "/v1/completions", seed: int = 0, api_key: str | None = None,
                    timeout: float = 600.0, num_warmups: int = 1) -> tuple[str, list[RequestResult], float]:
    """Run the load; return the model name, one result per prompt (in prompt order), and the duration."""
    import httpx
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = _url(base_url, endpoint)
    chat = _is_chat(endpoint)
    # no connection cap (the semaphore is the only limit), no proxies from the environment (a proxy
    # in the path would be measured too), and a generous timeout for each connect / read
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits, trust_env=False) as client:
        model = await served_model(client, base_url, headers, model)
        for _ in range(num_warmups):  # first-request costs stay out of the run; a bad setup fails here
            r = await send_request(client, url, request_body(endpoint, model, WARMUP_PROMPT, min(output_len, 4)),
                                   headers, chat)
            if not r.success:
                raise ValueError(f"the warm-up request to {url} (model {model!r}) failed: {r.error}")
        arrivals = arrival_times(len(prompts), rate, seed)
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(prompts), desc="requests", unit="req")

        async def one(i: int) -> RequestResult:
            delay = start + arrivals[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = request_body(endpoint, model, prompts[i], output_len)
            if sem is None:
                r = await send_request(client, url, body, headers, chat)
            else:
                async with sem:
                    r = await send_request(client, url, body, headers, chat)
            bar.update(1)
            return r

        start = time.perf_counter()
        try:
            results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        finally:
            bar.close()
        duration = time.perf_counter() - start
    return model, list(results), duration


def _summary(name: str, values_s: list[float]) -> dict:
    import numpy as np

    ms = np.asarray(values_s, dtype=float) * 1e3 if values_s else np.zeros(1)
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"std_{name}_ms": float(ms.std()), f"p99_{name}_ms": float(np.percentile(ms, 99))}


def compute_metrics(results: list[RequestResult], duration: float) -> dict:
    """vLLM benchmark_serving's fields; latencies in ms over successful requests (0 when none)."""
    ok = [r for r in results if r.success]
    n_in = sum(r.prompt_tokens for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    tpots = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    metrics = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "request_throughput": len(ok) / duration, "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
        "requests_without_usage": sum(not r.usage_reported for r in ok),
    }
    metrics |= _summary("ttft", [r.ttft for r in ok])
    metrics |= _summary("tpot", tpots)
    metrics |= _summary("itl", [g for r in ok for g in r.itl])
    metrics |= _summary("e2el", [r.e2el for r in ok])
    return metrics


def run_serve_bench(base_url: str, prompts: list[str], output_len: int = 128, model: str | None = None,
                    rate: float = math.inf, max_concurrency: int | None = None,
                    endpoint: str = "/v1/completions", seed: int = 0, api_key: str | None = None,
                    timeout: float = 600.0, num_warmups: int = 1) -> dict:
    """Run the benchmark and return the report dict (see `leanlm bench serve --help`)."""
    if not prompts:
        raise ValueError("no prompts to send (num_prompts must be >= 1)")
    if not isinstance(output_len, int) or output_len < 1:
        raise ValueError(f"output_len must be a positive integer, got {output_len!r}")
    if not rate > 0:
        raise ValueError(f"request rate must be a positive number of requests/s or inf, got {rate!r}")
    if max_concurrency is not None and (not isinstance(max_concurrency, int) or max_concurrency < 1):
        raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base url {base_url!r} must start with http:// or https://")
    model, results, duration = asyncio.run(benchmark(
        base_url, prompts, output_len, model, rate, max_concurrency, endpoint, seed, api_key, timeout,
        num_warmups))
    report = compute_metrics(results, duration)
    report.update({
        "model": model, "base_url": base_url, "endpoint": endpoint, "num_prompts": len(prompts),
        "output_len": output_len, "request_rate": "inf" if math.isinf(rate) else rate,
        "max_concurrency": max_concurrency, "seed": seed,
        "input_lens": [r.prompt_tokens for r in results], "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results], "e2els": [r.e2el for r in results],
        "errors": [r.error for r in results],
    })
    return report


def print_report(report: dict) -> None:
    rate = report["request_rate"]
    conc = report["max_concurrency"] or "unlimited"
    rows = [["model", report["model"]], ["url", report["base_url"].rstrip("/") + report["endpoint"]],
            ["requests × output tokens", f"{report['num_prompts']} × {report['output_len']}"],
            ["request rate (req/s)", rate], ["max concurrency", conc],
            ["successful requests", report["completed"]], ["failed requests", report["failed"]],
            ["duration (s)", f"{report['duration']:.2f}"],
            ["total input tokens", report["total_input_tokens"]],
            ["total output tokens", report["total_output_tokens"]],
            ["request throughput (req/s)", f"{report['request_throughput']:.2f}"],
            ["output token throughput (tok/s)", f"{report['output_throughput']:.2f}"],
            ["total token throughput (tok/s)", f"{report['total_token_throughput']:.2f}"]]
    print_table("leanlm bench serve", ["", "value"], rows)
    lat = [[name.upper() if name != "e2el" else "E2EL", *(f"{report[f'{s}_{name}_ms']:.2f}"
                                                          for s in ("mean", "median", "p99"))]
           for name in ("ttft", "tpot", "itl", "e2el")]
    print_table("latency (ms, successful requests)", ["", "mean", "median", "p99"], lat)
    if report["failed"]:
        distinct = list(dict.fromkeys(e for e in report["errors"] if e))  # each error once, in order
        shown = "\n  ".join(distinct[:5]) + (f"\n  ... and {len(distinct) - 5} more" if len(distinct) > 5 else "")
        print(f"warning: {report['failed']} of {report['num_prompts']} requests failed; errors:\n  {shown}",
              file=sys.stderr)
    if report["requests_without_usage"]:
        print(f"note: {report['requests_without_usage']} replies had no usage chunk: their output tokens are "
              f"text chunks counted, their prompt tokens are unknown (left out of total tokens)", file=sys.stderr)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="load-test a running OpenAI-compatible server (vLLM benchmark_serving style)",
        description="Send the first --num-prompts ShareGPT prompts to a running server as streaming "
                    "completions (greedy, EOS ignored, --output-len tokens each), arriving as a Poisson "
                    "process of --request-rate requests/s (inf: all at once), at most --max-concurrency "
                    "in flight; report TTFT, TPOT, ITL and E2E latency (mean, median, p99) and request / "
                    "output / total token throughput. Start a server first, e.g. `leanlm serve`.",
        epilog="Latencies are measured on this client, so they include the network and HTTP overhead.")
    add_dataset_arg(p)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address (default %(default)s)")
    p.add_argument("--endpoint", default="/v1/completions",
                   help="/v1/completions (default) or /v1/chat/completions (prompt as one user message)")
    p.add_argument("--model", default=None, help="served model name (default: the first one /v1/models lists)")
    p.add_argument("--num-prompts", type=positive_int, default=64, help="requests: the first N prompts (default 64)")
    p.add_argument("--output-len", type=positive_int, default=128, help="max_tokens per request (default 128)")
    p.add_argument("--request-rate", type=request_rate, default=math.inf, metavar="R",
                   help="mean requests/s of Poisson arrivals, or inf to send all at once (default inf)")
    p.add_argument("--max-concurrency", type=positive_int, default=None, metavar="C",
                   help="most requests in flight at once (default: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrival times (default 0)")
    p.add_argument("--num-warmups", type=int, default=1, choices=range(0, 11), metavar="N",
                   help="short requests sent before the timed run; a failing one stops the bench (default 1)")
    p.add_argument("--timeout", type=positive_seconds, default=600.0, metavar="S",
                   help="seconds to wait for a connection or for the next chunk (default 600)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as a Bearer token (default: $OPENAI_API_KEY, if set)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write completed, failed, duration, *_throughput, {mean,median,std,p99}_{ttft,tpot,"
                        "itl,e2el}_ms, per-request input_lens / output_lens / ttfts / e2els / errors and the "
                        "config to PATH")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    prompts, path = load_prompts(args.num_prompts, args.dataset)
    report = run_serve_bench(args.base_url, prompts, output_len=args.output_len, model=args.model,
                             rate=args.request_rate, max_concurrency=args.max_concurrency,
                             endpoint=args.endpoint, seed=args.seed, api_key=args.api_key,
                             timeout=args.timeout, num_warmups=args.num_warmups)
    report["dataset"] = str(path)
    print_report(report)
    if args.json:
        write_json(args.json, report)
        print(f"[leanlm] wrote {args.json}", file=sys.stderr)
    return 0
