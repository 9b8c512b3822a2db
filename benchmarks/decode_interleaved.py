"""Decode steps of several (KV codec, batch) configurations, interleaved in one process: each
configuration gets its own engine with B sequences of --context prompt tokens, and the engines
then take decode steps in turn (A, B, C, A, B, C, ...). Medians of step time, of the time inside
the native whole-layer executor, and of the time outside it (LM head, sampling, scheduling).

Why interleaved: on a shared 2-core machine decode_step.py measured the same batch-4 step at
24.9 to 33.4 ms in runs minutes apart, which hides any difference under ~30%. Steps taken in
turn see the same machine state, so their ratio holds even when the absolute times drift.

    python benchmarks/decode_interleaved.py bf16@1 bf16@4 kivi:4:g64:v3:c32:s8:prerope:rotate@4 --context 600
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

from rich.console import Console
from rich.table import Table

from leanlm import LLM, SamplingParams
from leanlm.native import layers as native_layers


def parse_config(text: str) -> tuple[str, int]:
    """'KV@B' -> (KV, B)"""
    kv, sep, batch = text.rpartition("@")
    if not sep or not kv or not batch.isdigit() or int(batch) < 1:
        raise ValueError(f"configuration {text!r}: expected KV@B, a KV cache spec and a batch size >= 1 "
                         "(e.g. bf16@1 or kivi:4@4)")
    return kv, int(batch)


def prompts(batch: int, context: int, vocab: int) -> list[list[int]]:
    """The token ids of each configuration's B prompts (distinct per sequence, within the vocabulary)."""
    return [[(1000 + 7 * i + j) % vocab for j in range(context)] for i in range(batch)]


class _ExecutorClock:
    """Time inside NativeLayers.run during one engine step (0 when the executor did not run)."""

    def __init__(self):
        self.seconds = 0.0
        self._real = native_layers.NativeLayers.run

    def __enter__(self):
        clock, real = self, self._real

        def run(layers, *a):
            t = time.perf_counter()
            try:
                return real(layers, *a)
            finally:
                clock.seconds += time.perf_counter() - t

        native_layers.NativeLayers.run = run
        return self

    def __exit__(self, *exc):
        native_layers.NativeLayers.run = self._real


def measure(configs: list[tuple[str, int]], context: int, steps: int, model: str | None = None,
            device: str = "cpu") -> list[dict]:
    """Build one engine per (kv, batch), prefill each, then `steps` decode steps per engine taken
    in turn. Returns per configuration: kv, batch, medians (step_ms, executor_ms, outside_ms),
    tok_s, and the generated token ids of each sequence (greedy)."""
    if context < 1 or steps < 1:
        raise ValueError(f"context and steps must be >= 1, got {context} and {steps}")
    engines = []
    for kv, batch in configs:
        llm = LLM(model, dtype="float32", kv=kv, enable_prefix_caching=False, max_num_seqs=batch, device=device)
        params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
        ids = [llm.engine.add_request(None, p, params)
               for p in prompts(batch, context, llm.engine.runner.model.cfg.vocab_size)]
        engines.append({"kv": kv, "batch": batch, "llm": llm, "ids": ids, "outputs": {},
                        "step": [], "executor": []})
    for e in engines:  # prefill (a step per sequence or chunk) until every sequence has its first token
        while len(e["outputs"]) < e["batch"] or min(map(len, e["outputs"].values())) < 1:
            _collect(e, e["llm"].engine.step())
    for _ in range(steps):
        for e in engines:
            if not e["llm"].engine.has_unfinished():
                continue
            with _ExecutorClock() as clock:
                t = time.perf_counter()
                _collect(e, e["llm"].engine.step())
                e["step"].append(time.perf_counter() - t)
            e["executor"].append(clock.seconds)
    results = []
    for e in engines:
        step, ex = statistics.median(e["step"]) * 1e3, statistics.median(e["executor"]) * 1e3
        results.append({"kv": e["kv"], "batch": e["batch"], "steps": len(e["step"]), "step_ms": step,
                        "executor_ms": ex, "outside_ms": step - ex, "tok_s": e["batch"] / step * 1e3,
                        "token_ids": [e["outputs"][i] for i in e["ids"]]})
    # the engines hold reference cycles (and native descriptors): free them now, not at some later
    # collection inside whatever the caller times next
    del engines, e
    gc.collect()
    return results


def _collect(e: dict, outputs) -> None:
    for out in outputs:
        e["outputs"][out.request_id] = list(out.outputs[0].token_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", metavar="KV@B", help="a KV cache spec and a batch size, e.g. bf16@1")
    ap.add_argument("--context", type=int, default=600, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=100, help="decode steps per configuration")
    ap.add_argument("--model", default=None, help="HF checkpoint dir or .gguf (default: the embedded model)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (each step ends with the sampled tokens "
                    "on the host, so its time includes the GPU's work)")
    args = ap.parse_args()
    try:  # a bad KV@B, size or KV spec: a usage error naming the value
        results = measure([parse_config(c) for c in args.configs], args.context, args.steps, args.model,
                          args.device)
    except ValueError as e:
        ap.error(str(e))
    base = results[0]["tok_s"]
    table = Table(title=f"decode steps taken in turn, {args.context}-token prompts, {args.steps} steps "
                        "each, float32 (medians)")
    table.add_column("--kv", overflow="fold")
    for col in ("B", "step ms", "executor ms", "outside ms", "tok/s", "tok/s vs first"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["kv"], str(r["batch"]), f"{r['step_ms']:.2f}", f"{r['executor_ms']:.2f}",
                      f"{r['outside_ms']:.2f}", f"{r['tok_s']:.1f}", f"{r['tok_s'] / base:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
