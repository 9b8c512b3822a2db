"""Robustness of `leanlm serve` under load, checked against real server processes.

Check A (load with disconnects): N streaming requests (/v1/completions and /v1/chat/completions
alternating, temperature 0.7 with a seed per request, usage chunk asked for) all sent at once
over unlimited connections. Every 5th client closes its stream after K chunks. Passes when no
reply has a status >= 500 and no stream carries an error object; every stream that was not
closed on purpose ends with `data: [DONE]`, carries a usage chunk and a finish_reason on its
last choice chunk, and completion_tokens == max_tokens (or finish_reason "stop" with
completion_tokens <= max_tokens, and no more text chunks than completion tokens); and within
--settle-timeout seconds the server's /metrics shows no running or waiting request and no KV
block in use. The server's abort count (request_success_total{finished_reason="abort"}) and the
most requests it ran at once (its running gauge, polled during the load) are reported.

Check B (preemption keeps outputs): M greedy, EOS-ignoring, non-streamed completions (token-id
prompts, so both servers see the same tokens) sent at once, first to an unconstrained server
(the reference, the Check A server) and then to a second server whose KV cache holds about a
quarter (--tight-fraction) of what the M requests need, so the scheduler must preempt and
recompute. Passes when every request succeeds on both, every text equals its reference, the
tight server counted num_preemptions_total > 0 (else the budget was not tight enough) and its
KV blocks are all free afterwards.

The KV budget is computed from the model's config.json (layers x 2 x KV heads x head dim x
bytes of the dtype per token, 16-token blocks), e.g. 46,080 bytes/token for the embedded
SmolLM2-135M in float32; --tight-kv-memory overrides it.

Each server is `python -m leanlm.cli serve MODEL --host 127.0.0.1 --port P ...` on a free port,
started by this script and terminated when it ends, on errors and on Ctrl-C too. Its log goes
to a file (--server-log-dir, default a temporary folder) whose tail is printed if it fails.

Examples:
  python benchmarks/serve_robustness.py                          # embedded model, full size
  python benchmarks/serve_robustness.py --model DIR --num-requests 20 --num-tight-requests 8
  python benchmarks/serve_robustness.py --checks preemption --dtype bfloat16 --json out.json

Exit status: 0 when every check passes, 1 when one fails, 2 on a setup error, 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable from a source checkout without installing leanlm
    sys.path.insert(0, str(REPO_ROOT))

from leanlm.bench.report import positive_int, print_table, write_json  # noqa: E402
from leanlm.bench.serve_load import sse_lines  # noqa: E402

BLOCK_SIZE = 16  # the engine's default KV block (EngineConfig.block_size; `leanlm serve` keeps it)
SERVER_MAX_NUM_SEQS = 64  # `leanlm serve --max-num-seqs` default

BUILTIN_PROMPTS = [
    "Explain how a hash map works and when its operations stop being constant time.",
    "Write a short poem about the sea at night.",
    "What are the main differences between TCP and UDP?",
    "Give me three ideas for a birthday party for a ten-year-old.",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How do I reverse a linked list in Python? Show the code.",
    "Why is the sky blue?",
    "Translate 'good morning, how are you?' into French, Spanish and German.",
    "List the planets of the solar system in order from the sun.",
    "What is the difference between a virus and a bacterium?",
    "Write a haiku about autumn leaves.",
    "Describe the water cycle to a child.",
    "What should I pack for a three-day hiking trip?",
    "Explain recursion with a simple example.",
    "Tell me a fun fact about octopuses.",
    "How does compound interest work?",
    "Draft a polite email asking my manager for a day off next Friday.",
    "What causes the seasons on Earth?",
    "Suggest a healthy breakfast that takes less than ten minutes to make.",
    "Explain what a large language model is in two paragraphs.",
    "hello world, the quick brown fox jumps over the lazy dog.",
    "Compare electric cars and petrol cars in cost, range and emissions.",
    "Why do cats purr?",
    "Write a limerick about a programmer who never sleeps.",
]


# -- servers -----------------------------------------------------------------------------------
class ServerError(RuntimeError):
    """A server did not start, or died."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m leanlm.cli serve` in its own session (Ctrl-C in this terminal reaches only this
    script, which then terminates the server), its output in a log file."""

    def __init__(self, name: str, model: str | None, server_args: list[str], log_dir: Path,
                 startup_timeout: float):
        self.name, self.model, self.server_args = name, model, server_args
        self.log_path = log_dir / f"server_{name}.log"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.url = ""

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "leanlm.cli", "serve"]
        if self.model:
            cmd.append(self.model)
        return cmd + ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                      *self.server_args]

    def start(self) -> "ServerProcess":
        import httpx

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        for attempt in range(3):  # the free port may be taken between our probe and its bind
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            log = open(self.log_path, "ab")
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            log.close()
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    if httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                self.stop()
                raise ServerError(f"server {self.name} did not answer /health within "
                                  f"{self.startup_timeout:.0f}s\n{self.log_tail()}")
            if "address already in use" in self.log_tail().lower() and attempt < 2:
                continue
            raise ServerError(f"server {self.name} exited with status {self.proc.returncode} while "
                              f"starting\n{self.log_tail()}")
        raise AssertionError("unreachable")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """Terminate (SIGTERM, then SIGKILL after 15 s); the exit status, None if never started."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text[-lines:])


# -- /metrics ------------------------------------------------------------------------------------
_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict, float]]:
    """Prometheus text format -> [(sample name, labels, value)]."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            samples.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return samples


def metric(samples, name: str, **labels) -> float | None:
    """The sum of the samples called `name` whose labels include `labels`; None if none is."""
    values = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    return sum(values) if values else None


async def scrape(client, url: str):
    resp = await client.get(url + "/metrics")
    resp.raise_for_status()
    return parse_metrics(resp.text)


LOAD_GAUGES = ("leanlm:num_requests_running", "leanlm:num_requests_waiting", "leanlm:kv_blocks_used")


async def wait_idle(client, url: str, timeout: float) -> tuple[bool, list, float]:
    """Poll /metrics until no request runs or waits and no KV block is used; (idle, last
    samples, seconds waited)."""
    t0 = time.perf_counter()
    samples = []
    while True:
        samples = await scrape(client, url)
        if all(metric(samples, g) == 0 for g in LOAD_GAUGES):
            return True, samples, time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            return False, samples, time.perf_counter() - t0
        await asyncio.sleep(0.1)


class GaugeWatcher:
    """Scrapes /metrics in the background and keeps the largest value of each load gauge."""

    def __init__(self, client, url: str, interval: float = 0.05):
        self.client, self.url, self.interval = client, url, interval
        self.max = {g: 0.0 for g in LOAD_GAUGES}
        self.scrapes = self.errors = 0
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            try:
                samples = await scrape(self.client, self.url)
                self.scrapes += 1
                for g in LOAD_GAUGES:
                    v = metric(samples, g)
                    if v is not None:
                        self.max[g] = max(self.max[g], v)
            except Exception:  # noqa: BLE001 - a slow scrape under load is not a finding
                self.errors += 1
            await asyncio.sleep(self.interval)

    def __enter__(self):
        self.task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc):
        self.task.cancel()


# -- helpers ---------------------------------------------------------------------------------------
def new_client(timeout: float):
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(timeout), trust_env=False,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def model_info(client, url: str) -> tuple[str, int]:
    resp = await client.get(url + "/v1/models")
    resp.raise_for_status()
    card = resp.json()["data"][0]
    return card["id"], int(card["max_model_len"])


async def tokenize(client, url: str, prompt: str, chat: bool) -> list[int]:
    body = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    resp = await client.post(url + "/tokenize", json=body)
    resp.raise_for_status()
    return resp.json()["tokens"]


async def fit_prompt(client, url: str, prompt: str, chat: bool, budget: int) -> tuple[str, int]:
    """`prompt`, cut (by characters, re-tokenized) until the request's prompt tokens are at most
    `budget`; the prompt and its token count."""
    for _ in range(30):
        n = len(await tokenize(client, url, prompt, chat))
        if n <= budget:
            return prompt, n
        keep = max(1, min(len(prompt) - 1, int(len(prompt) * budget / n * 0.95)))
        prompt = prompt[:keep]
    raise ValueError(f"could not fit a prompt into {budget} tokens")


def load_prompt_texts(n: int, dataset: str | None, builtin: bool) -> tuple[list[str], str]:
    """n prompts (cycled when the source holds fewer) and where they came from."""
    source = "built-in list"
    texts = BUILTIN_PROMPTS
    if not builtin:
        from leanlm.bench.sharegpt import load_prompts

        try:
            texts, path = load_prompts(n, dataset)
            source = str(path)
        except ValueError as e:
            if dataset is not None and "fewer than" not in str(e):
                raise
            if "fewer than" in str(e):  # a small file: take all it has (cycled below)
                m = re.search(r"holds (\d+) prompts", str(e))
                texts, path = load_prompts(int(m.group(1)), dataset)
                source = str(path)
            else:
                print(f"[robustness] no ShareGPT file ({e.args[0].splitlines()[0]}); using the built-in "
                      f"prompts", file=sys.stderr)
    return [texts[i % len(texts)] for i in range(n)], source


def first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


@dataclass
class CheckResult:
    name: str
    title: str
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows: list[tuple[str, object]] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def expect(self, ok: bool, message: str) -> bool:
        if not ok:
            self.failures.append(message)
        return ok

    def as_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "failures": self.failures, "notes": self.notes,
                **self.data}


# -- Check A ---------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    index: int
    endpoint: str
    planned_disconnect: bool
    status: int | None = None
    chunks: int = 0               # SSE data events (the role chunk of a chat stream included)
    text_chunks: int = 0          # chunks that carried text
    done: bool = False            # saw data: [DONE]
    disconnected: bool = False    # this client closed the stream before [DONE]
    saw_finish: bool = False      # a finish_reason arrived before the close
    finish_reason: str | None = None
    last_choice_finish: str | None = None
    usage: dict | None = None
    stream_error: str = ""        # an error object inside the stream
    error: str = ""               # transport / protocol problem
    seconds: float = 0.0


async def stream_one(client, url: str, index: int, body: dict, chat: bool, disconnect_after: int | None,
                     planned: bool) -> StreamResult:
    r = StreamResult(index, "chat" if chat else "completions", planned)
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                r.error = (await resp.aread()).decode("utf-8", "replace")[:300]
                return r
            async for line in sse_lines(resp):
                if not line or line.startswith(":"):
                    continue
                if not line.startswith("data:"):
                    r.error = f"not an SSE data line: {line[:120]!r}"
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    r.done = True
                    break
                r.chunks += 1
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    r.error = f"malformed chunk: {data[:120]!r}"
                    continue
                if isinstance(chunk, dict) and chunk.get("error"):
                    r.stream_error = json.dumps(chunk["error"])[:300]
                choices = chunk.get("choices") or []
                for c in choices:
                    text = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    if text:
                        r.text_chunks += 1
                    if c.get("finish_reason"):
                        r.finish_reason, r.saw_finish = c["finish_reason"], True
                if choices:
                    r.last_choice_finish = choices[-1].get("finish_reason")
                if isinstance(chunk.get("usage"), dict):
                    r.usage = chunk["usage"]
                if disconnect_after is not None and r.chunks >= disconnect_after:
                    r.disconnected = True
                    break  # leaving the `async with` closes the response mid-stream
    except Exception as e:  # noqa: BLE001 - one broken request must not end the check
        r.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    finally:
        r.seconds = time.perf_counter() - t0
    return r


def stream_problems(r: StreamResult, max_tokens: int) -> list[str]:
    """Why a stream that was not closed on purpose is not a complete reply (empty: it is)."""
    p = []
    if r.status != 200:
        return [f"HTTP {r.status}: {r.error}"] if r.status else [r.error or "no response"]
    if r.error:
        p.append(r.error)
    if r.stream_error:
        p.append(f"error in stream: {r.stream_error}")
    if not r.done:
        p.append("no data: [DONE]")
    if r.last_choice_finish is None:
        p.append("the last choice chunk has no finish_reason")
    if r.usage is None or not isinstance(r.usage.get("completion_tokens"), int):
        p.append("no usage chunk with completion_tokens")
    else:
        n = r.usage["completion_tokens"]
        if not (n == max_tokens or (r.finish_reason == "stop" and n <= max_tokens)):
            p.append(f"completion_tokens={n}, finish_reason={r.finish_reason!r} (max_tokens={max_tokens})")
        if r.finish_reason == "length" and n != max_tokens:
            p.append(f"finish_reason 'length' after {n} of {max_tokens} tokens")
        if r.text_chunks > n:
            p.append(f"{r.text_chunks} text chunks but completion_tokens={n}")
    return p


async def check_load(url: str, args, prompts: list[str]) -> CheckResult:
    res = CheckResult("load_disconnect", "Check A: concurrent streams with client disconnects")
    async with new_client(args.request_timeout) as client, new_client(30) as side:
        model, max_model_len = await model_info(side, url)
        budget = max_model_len - args.max_tokens - 1
        if args.max_prompt_tokens:
            budget = min(budget, args.max_prompt_tokens)
        if budget < 1:
            raise ValueError(f"max_tokens={args.max_tokens} leaves no room for a prompt in the "
                             f"server's context of {max_model_len} tokens")
        chat = [i % 2 == 1 for i in range(args.num_requests)]
        sem = asyncio.Semaphore(16)

        async def fit(i):
            async with sem:
                return await fit_prompt(side, url, prompts[i], chat[i], budget)

        fitted = await asyncio.gather(*(fit(i) for i in range(args.num_requests)))
        bodies = []
        for i, (prompt, _) in enumerate(fitted):
            body = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                    "seed": args.seed + i, "stream": True, "stream_options": {"include_usage": True}}
            if args.ignore_eos:
                body["ignore_eos"] = True
            body["messages" if chat[i] else "prompt"] = (
                [{"role": "user", "content": prompt}] if chat[i] else prompt)
            bodies.append(body)
        before = await scrape(side, url)
        aborts_before = metric(before, "leanlm:request_success_total", finished_reason="abort") or 0
        planned = [args.disconnect_every > 0 and i % args.disconnect_every == args.disconnect_every - 1
                   for i in range(args.num_requests)]
        print(f"[robustness] check A: {args.num_requests} streams at once to {url} "
              f"({sum(planned)} to be closed after {args.disconnect_after} chunks)", file=sys.stderr)
        t0 = time.perf_counter()
        with GaugeWatcher(side, url) as watcher:
            results = await asyncio.gather(*(
                stream_one(client, url + ("/v1/chat/completions" if chat[i] else "/v1/completions"), i,
                           bodies[i], chat[i], args.disconnect_after if planned[i] else None, planned[i])
                for i in range(args.num_requests)))
        wall = time.perf_counter() - t0
        idle, after, settle = await wait_idle(side, url, args.settle_timeout)
        health = (await side.get(url + "/health")).status_code

    statuses = collections.Counter(r.status for r in results)
    server_errors = [r for r in results if r.status is not None and r.status >= 500]
    stream_errors = [r for r in results if r.stream_error]
    disconnected = [r for r in results if r.disconnected]
    early = [r for r in disconnected if not r.saw_finish]  # closed before the client saw the end
    kept = [r for r in results if not r.disconnected]
    incomplete = {r.index: stream_problems(r, args.max_tokens) for r in kept}
    incomplete = {i: p for i, p in incomplete.items() if p}
    aborts = (metric(after, "leanlm:request_success_total", finished_reason="abort") or 0) - aborts_before
    running, waiting, used = (metric(after, g) for g in LOAD_GAUGES)
    tokens = sum((r.usage or {}).get("completion_tokens", 0) for r in kept)

    res.expect(not server_errors, f"{len(server_errors)} replies with status >= 500: "
                                  f"{[(r.index, r.status, r.error[:120]) for r in server_errors[:5]]}")
    res.expect(not stream_errors, f"{len(stream_errors)} streams carried an error object, e.g. "
                                  f"{stream_errors[0].stream_error if stream_errors else ''}")
    res.expect(not incomplete, f"{len(incomplete)} streams not closed on purpose are incomplete, e.g. "
                               f"{dict(list(incomplete.items())[:3])}")
    res.expect(idle, f"not idle {settle:.1f}s after the load: running={running}, waiting={waiting}, "
                     f"kv_blocks_used={used}")
    res.expect(health == 200, f"/health answered {health} after the load")
    if len(disconnected) != sum(planned):
        res.notes.append(f"{sum(planned) - len(disconnected)} planned disconnects did not happen (the "
                         f"stream ended before {args.disconnect_after} chunks)")
    if aborts < len(early):
        res.notes.append(f"server counted {aborts:g} aborts for {len(early)} streams closed before "
                         f"their finish_reason (some may have finished on the server before the close)")
    if watcher.errors:
        res.notes.append(f"{watcher.errors} background /metrics scrapes failed")

    res.data = {
        "requests": len(results), "completed": len(kept) - len(incomplete),
        "disconnected": len(disconnected), "disconnected_before_finish": len(early),
        "planned_disconnects": sum(planned), "server_abort_count": aborts,
        "status_counts": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
        "http_5xx": len(server_errors), "stream_errors": len(stream_errors),
        "incomplete_streams": len(incomplete), "incomplete_detail": {str(k): v for k, v in incomplete.items()},
        "max_running_seen": watcher.max["leanlm:num_requests_running"],
        "max_waiting_seen": watcher.max["leanlm:num_requests_waiting"],
        "max_kv_blocks_used_seen": watcher.max["leanlm:kv_blocks_used"], "metrics_scrapes": watcher.scrapes,
        "after": {"num_requests_running": running, "num_requests_waiting": waiting, "kv_blocks_used": used,
                  "settle_seconds": settle},
        "completion_tokens": tokens, "wall_seconds": wall,
        "prompt_tokens": [n for _, n in fitted], "max_tokens": args.max_tokens,
        "finish_reasons": dict(collections.Counter(r.finish_reason for r in kept)),
    }
    res.rows = [
        ("requests (completions / chat)", f"{len(results)} ({chat.count(False)} / {chat.count(True)})"),
        ("completed streams", res.data["completed"]),
        ("disconnected on purpose (before finish)", f"{len(disconnected)} ({len(early)})"),
        ("server abort count", f"{aborts:g}"),
        ("status codes", ", ".join(f"{k}: {v}" for k, v in res.data["status_counts"].items())),
        ("5xx replies / error objects in streams", f"{len(server_errors)} / {len(stream_errors)}"),
        ("incomplete streams", len(incomplete)),
        ("finish reasons (completed)", ", ".join(f"{k}: {v}" for k, v in res.data["finish_reasons"].items())),
        ("max running / waiting seen", f"{watcher.max['leanlm:num_requests_running']:g} / "
                                       f"{watcher.max['leanlm:num_requests_waiting']:g}"),
        ("max KV blocks used seen", f"{watcher.max['leanlm:kv_blocks_used']:g}"),
        ("after: running / waiting / KV blocks used", f"{running:g} / {waiting:g} / {used:g} "
                                                      f"(after {settle:.1f}s)"),
        ("completion tokens (completed)", tokens),
        ("wall time (s)", f"{wall:.2f}"),
    ]
    return res


# -- Check B ---------------------------------------------------------------------------------------
def bytes_per_token(model: str | None, dtype: str) -> tuple[int, dict]:
    """KV bytes per token of `model` at `dtype`, as the engine's plain codec stores them."""
    from leanlm.config import parse_dtype

    path = _model_dir(model)
    cfg = json.loads((path / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    torch_dtype = parse_dtype(dtype)
    size = torch_dtype.itemsize
    facts = {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim,
             "dtype": str(torch_dtype).removeprefix("torch."),
             "max_position_embeddings": int(cfg.get("max_position_embeddings", 2048))}
    return layers * 2 * kv_heads * head_dim * size, facts


def _model_dir(model: str | None) -> Path:
    if model is not None and Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    from leanlm.models.registry import resolve_model

    return resolve_model(model)


async def prepare_tight_prompts(url: str, args, prompts: list[str], context: int) -> list[list[int]]:
    """Token-id prompts for check B, each leaving room for max_tokens within `context`."""
    budget = context - args.tight_max_tokens
    if args.max_prompt_tokens:
        budget = min(budget, args.max_prompt_tokens)
    if budget < 1:
        raise ValueError(f"--tight-max-tokens {args.tight_max_tokens} leaves no room for a prompt in a "
                         f"context of {context} tokens")
    async with new_client(60) as client:
        ids = await asyncio.gather(*(tokenize(client, url, p, chat=False) for p in prompts))
    return [t[:budget] for t in ids]


async def send_greedy(url: str, args, prompts: list[list[int]]) -> tuple[list[dict], float]:
    async with new_client(args.request_timeout) as client:
        model, _ = await model_info(client, url)

        async def one(ids):
            body = {"model": model, "prompt": ids, "max_tokens": args.tight_max_tokens, "temperature": 0,
                    "ignore_eos": True}
            try:
                resp = await client.post(url + "/v1/completions", json=body)
            except Exception as e:  # noqa: BLE001
                return {"status": None, "error": f"{type(e).__name__}: {e}"}
            if resp.status_code != 200:
                return {"status": resp.status_code, "error": resp.text[:300]}
            out = resp.json()
            return {"status": 200, "text": out["choices"][0]["text"],
                    "finish_reason": out["choices"][0]["finish_reason"],
                    "completion_tokens": out["usage"]["completion_tokens"]}

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return list(results), time.perf_counter() - t0


async def metrics_once(url: str, settle: float | None = None):
    async with new_client(30) as client:
        if settle is not None:
            return await wait_idle(client, url, settle)
        return await scrape(client, url)


def tight_budget(args, bpt: int, prompts: list[list[int]], context: int) -> tuple[str, int, dict]:
    """(--kv-cache-memory, --max-model-len, facts) for the tight server."""
    need = [len(p) + args.tight_max_tokens for p in prompts]
    needed_blocks = sum(math.ceil(n / BLOCK_SIZE) for n in need)
    # only max_num_seqs of them run at once: size the pool from the largest that many
    seats = min(len(need), args.max_num_seqs or SERVER_MAX_NUM_SEQS)
    concurrent_blocks = sum(sorted((math.ceil(n / BLOCK_SIZE) for n in need), reverse=True)[:seats])
    target = max(1, math.ceil(concurrent_blocks * args.tight_fraction))
    # the engine wants room for one full context: keep the context no longer than the pool
    # (but long enough for the longest request), so the pool can stay tight
    max_len = context
    if math.ceil(max_len / BLOCK_SIZE) > target:
        max_len = max(max(need), target * BLOCK_SIZE)
    blocks = max(target, math.ceil(max_len / BLOCK_SIZE))
    memory = args.tight_kv_memory or str(blocks * BLOCK_SIZE * bpt)
    facts = {"needed_blocks": needed_blocks, "concurrent_blocks": concurrent_blocks,
             "planned_blocks": None if args.tight_kv_memory else blocks, "tight_max_model_len": max_len, "kv_cache_memory": memory, "bytes_per_token": bpt}
    return memory, max_len, facts


def check_preemption_results(args, ref: list[dict], tight: list[dict], before, after_idle, facts: dict,
                             ref_wall: float, tight_wall: float) -> CheckResult:
    res = CheckResult("preemption", "Check B: preemption keeps greedy outputs")
    idle, after, settle = after_idle
    preempt = (metric(after, "leanlm:num_preemptions_total") or 0) - (
        metric(before, "leanlm:num_preemptions_total") or 0)
    used, free = metric(after, "leanlm:kv_blocks_used"), metric(after, "leanlm:kv_blocks_free")
    total = (used or 0) + (free or 0)
    ref_bad = [(i, r["status"], r.get("error", "")[:120]) for i, r in enumerate(ref) if r["status"] != 200]
    tight_bad = [(i, r["status"], r.get("error", "")[:120]) for i, r in enumerate(tight) if r["status"] != 200]
    equal, different = 0, {}
    for i, (a, b) in enumerate(zip(ref, tight)):
        if a["status"] == 200 and b["status"] == 200:
            if a["text"] == b["text"]:
                equal += 1
            else:
                different[i] = {"first_difference": first_difference(a["text"], b["text"]),
                                "reference_chars": len(a["text"]), "tight_chars": len(b["text"])}
    short = [i for i, b in enumerate(tight) if b["status"] == 200 and b["completion_tokens"] != args.tight_max_tokens]

    res.expect(not ref_bad, f"{len(ref_bad)} reference requests failed: {ref_bad[:3]}")
    res.expect(not tight_bad, f"{len(tight_bad)} requests to the tight server failed: {tight_bad[:3]}")
    res.expect(not short, f"{len(short)} tight replies have completion_tokens != {args.tight_max_tokens} "
                          f"(ignore_eos): requests {short[:5]}")
    res.expect(not different, f"{len(different)} outputs differ from the reference (first differing "
                              f"character: {dict(list(different.items())[:5])})")
    res.expect(preempt > 0, f"the tight server preempted nothing (num_preemptions_total=0): its KV budget "
                            f"({facts['kv_cache_memory']} bytes, {total:g} blocks) was not tight enough; "
                            f"lower --tight-fraction or --tight-kv-memory")
    res.expect(idle, f"tight server not idle {settle:.1f}s after the requests: kv_blocks_used={used}, "
                     f"running={metric(after, 'leanlm:num_requests_running')}, "
                     f"waiting={metric(after, 'leanlm:num_requests_waiting')}")
    res.data = {"requests": len(tight), "preemptions": preempt, "kv_blocks_total": total,
                "kv_blocks_used_after": used, "equal": equal, "different": len(different),
                "different_detail": {str(k): v for k, v in different.items()},
                "reference_failed": len(ref_bad), "tight_failed": len(tight_bad),
                "max_tokens": args.tight_max_tokens, "reference_wall_seconds": ref_wall,
                "tight_wall_seconds": tight_wall, **facts}
    res.rows = [
        ("requests (greedy, ignore_eos)", f"{len(tight)} x {args.tight_max_tokens} tokens"),
        ("KV budget", f"{facts['kv_cache_memory']} bytes ({facts['bytes_per_token']} bytes/token)"),
        ("KV blocks: needed by all / by max_num_seqs at once / pool",
         f"{facts['needed_blocks']} / {facts['concurrent_blocks']} / {total:g}"),
        ("max_model_len (tight server)", facts["tight_max_model_len"]),
        ("preemptions", f"{preempt:g}"),
        ("succeeded: reference / tight", f"{len(ref) - len(ref_bad)} / {len(tight) - len(tight_bad)}"),
        ("outputs equal / different", f"{equal} / {len(different)}"),
        ("KV blocks used after", f"{used:g}" if used is not None else "?"),
        ("wall time: reference / tight (s)", f"{ref_wall:.2f} / {tight_wall:.2f}"),
    ]
    return res


# -- main ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve_robustness.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("servers")
    g.add_argument("--model", default=None, metavar="MODEL",
                   help="HF checkpoint dir, .gguf or alias given to `leanlm serve` (default: the embedded model)")
    g.add_argument("--dtype", default="auto", help="passed to the servers (default auto: float32)")
    g.add_argument("--device", default=None, help="passed to the servers (default: the server's, cpu)")
    g.add_argument("--max-num-seqs", type=positive_int, default=None,
                   help="passed to the servers (default: the server's, 64)")
    g.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for every server, repeatable (e.g. --server-arg=--seed=1)")
    g.add_argument("--startup-timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for a server's /health (default 600: a first run converts the "
                        "embedded model)")
    g.add_argument("--server-log-dir", default=None, metavar="DIR",
                   help="where the servers' logs go (default: a temporary folder, removed on success)")
    g.add_argument("--checks", default="load,preemption",
                   help="comma-separated checks to run: load (A), preemption (B) (default both)")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait to connect or for the next bytes of a reply (default 600)")
    g.add_argument("--settle-timeout", type=float, default=10.0, metavar="S",
                   help="seconds the server may take to be idle (no running request, no KV block used) "
                        "after the load (default 10)")

    g = p.add_argument_group("prompts")
    g.add_argument("--dataset", default=None, metavar="PATH",
                   help="ShareGPT prompts (default: the shared sharegpt_v3_filtered_500_prompts.jsonl; "
                        "the built-in list if it is missing)")
    g.add_argument("--builtin-prompts", action="store_true", help="use the built-in prompt list")
    g.add_argument("--max-prompt-tokens", type=positive_int, default=None, metavar="T",
                   help="cut prompts to at most T tokens (default: only the context limit cuts them)")

    g = p.add_argument_group("check A: load with disconnects")
    g.add_argument("--num-requests", "-n", type=positive_int, default=200, metavar="N",
                   help="concurrent streaming requests (default 200)")
    g.add_argument("--max-tokens", type=positive_int, default=64, help="max_tokens per request (default 64)")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    g.add_argument("--seed", type=int, default=0, help="request i is sent with seed SEED+i (default 0)")
    g.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (every reply is max_tokens long)")
    g.add_argument("--disconnect-every", type=int, default=5, metavar="E",
                   help="clients E-1, 2E-1, ... close their stream early (default 5; 0: none)")
    g.add_argument("--disconnect-after", type=positive_int, default=3, metavar="K",
                   help="... after receiving K chunks (default 3)")

    g = p.add_argument_group("check B: preemption keeps outputs")
    g.add_argument("--num-tight-requests", "-m", type=positive_int, default=32, metavar="M",
                   help="concurrent greedy requests (default 32)")
    g.add_argument("--tight-max-tokens", type=positive_int, default=96, help="max_tokens each (default 96)")
    g.add_argument("--tight-max-model-len", type=positive_int, default=1024, metavar="L",
                   help="context of the tight server, capped by the model's (default 1024; lowered to "
                        "the longest request when that keeps the pool tight)")
    g.add_argument("--tight-fraction", type=float, default=0.25, metavar="F",
                   help="KV pool = F x the blocks the M requests (at most --max-num-seqs of them) "
                        "need at once (default 0.25)")
    g.add_argument("--tight-kv-memory", default=None, metavar="SIZE",
                   help="the tight server's --kv-cache-memory, overriding the computed budget")

    p.add_argument("--json", default=None, metavar="PATH", help="write the results to PATH as JSON")
    return p


def server_args(args, extra: list[str] = ()) -> list[str]:
    out = ["--dtype", args.dtype]
    if args.device:
        out += ["--device", args.device]
    if args.max_num_seqs:
        out += ["--max-num-seqs", str(args.max_num_seqs)]
    return out + list(extra) + list(args.server_arg)


def print_results(checks: list[CheckResult]) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    for c in checks:
        print_table(c.title, ["", "value"], [list(r) for r in c.rows])
        verdict = "[bold green]PASS[/]" if c.passed else "[bold red]FAIL[/]"
        console.print(f"{verdict} {c.title}")
        for f in c.failures:
            console.print(f"  [red]- {escape(f)}[/]", highlight=False)
        for n in c.notes:
            console.print(f"  note: {escape(n)}", highlight=False)
    print_table("serve robustness", ["check", "verdict"],
                [[c.title, "PASS" if c.passed else "FAIL"] for c in checks])


def run(args, log_dir: Path) -> tuple[list[CheckResult], dict]:
    wanted = {c.strip() for c in args.checks.split(",") if c.strip()}
    unknown = wanted - {"load", "preemption"}
    if unknown or not wanted:
        raise ValueError(f"--checks takes load and/or preemption, got {args.checks!r}")
    if not 0 < args.tight_fraction < 1:
        raise ValueError(f"--tight-fraction must be in (0, 1), got {args.tight_fraction}")
    checks: list[CheckResult] = []
    info: dict = {}
    prompts, info["prompt_source"] = load_prompt_texts(
        max(args.num_requests if "load" in wanted else 0,
            args.num_tight_requests if "preemption" in wanted else 0),
        args.dataset, args.builtin_prompts)
    servers: list[ServerProcess] = []
    try:
        # server A: default KV memory; check A, then the reference outputs of check B
        a = ServerProcess("A", args.model, server_args(args), log_dir, args.startup_timeout)
        servers.append(a)
        t0 = time.perf_counter()
        a.start()
        info["server_a_start_seconds"] = time.perf_counter() - t0
        info["server_a_command"] = a.command()
        if "load" in wanted:
            checks.append(asyncio.run(check_load(a.url, args, prompts[:args.num_requests])))
            if not a.alive():
                checks[-1].failures.append(f"server A died (status {a.proc.returncode})\n{a.log_tail()}")
        if "preemption" in wanted:
            bpt, facts = bytes_per_token(args.model, args.dtype)
            info["model_kv"] = facts
            _, a_context = asyncio.run(_model_info(a.url))
            context = min(args.tight_max_model_len, facts["max_position_embeddings"], a_context)
            ids = asyncio.run(prepare_tight_prompts(a.url, args, prompts[:args.num_tight_requests], context))
            memory, max_len, budget = tight_budget(args, bpt, ids, context)
            print(f"[robustness] check B: reference outputs from server A", file=sys.stderr)
            ref, ref_wall = asyncio.run(send_greedy(a.url, args, ids))
            a.stop()  # free its memory and cores for the tight server
            b = ServerProcess("B", args.model, server_args(
                args, ["--kv-cache-memory", memory, "--max-model-len", str(max_len)]), log_dir,
                args.startup_timeout)
            servers.append(b)
            b.start()
            info["server_b_command"] = b.command()
            before = asyncio.run(metrics_once(b.url))
            print(f"[robustness] check B: {len(ids)} greedy requests to the tight server "
                  f"(--kv-cache-memory {memory}, --max-model-len {max_len})", file=sys.stderr)
            tight, tight_wall = asyncio.run(send_greedy(b.url, args, ids))
            after = asyncio.run(metrics_once(b.url, settle=args.settle_timeout))
            budget["prompt_tokens"] = [len(p) for p in ids]
            checks.append(check_preemption_results(args, ref, tight, before, after, budget, ref_wall,
                                                   tight_wall))
            if not b.alive():
                checks[-1].failures.append(f"server B died (status {b.proc.returncode})\n{b.log_tail()}")
    finally:
        for s in servers:
            s.stop()
    return checks, info


async def _model_info(url: str):
    async with new_client(30) as client:
        return await model_info(client, url)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    import httpx

    args = build_parser().parse_args(argv)
    log_dir = Path(args.server_log_dir or tempfile.mkdtemp(prefix="leanlm-robustness-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    old = signal.getsignal(signal.SIGTERM)
    try:  # SIGTERM ends us as Ctrl-C does, through the `finally` that stops the servers
        signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        old = None
    t0 = time.perf_counter()
    try:
        checks, info = run(args, log_dir)
    except KeyboardInterrupt:
        print("[robustness] interrupted; servers stopped", file=sys.stderr)
        return 130
    except (ServerError, ValueError, OSError, httpx.HTTPError) as e:
        print(f"[robustness] setup error: {type(e).__name__}: {e}\n(server logs in {log_dir})",
              file=sys.stderr)
        return 2
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    print_results(checks)
    passed = all(c.passed for c in checks)
    report = {"passed": passed, "wall_seconds": time.perf_counter() - t0,
              "config": {k: v for k, v in vars(args).items() if k != "json"}, **info,
              "checks": {c.name: c.as_dict() for c in checks}}
    if args.json:
        write_json(args.json, report)
        print(f"[robustness] wrote {args.json}", file=sys.stderr)
    if passed and args.server_log_dir is None:
        import shutil

        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        print(f"[robustness] server logs in {log_dir}", file=sys.stderr)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
