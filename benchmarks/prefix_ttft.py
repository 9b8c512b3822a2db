"""Prefix caching, measured: TTFT of a request that shares a long prefix with an earlier one,
against the first request's TTFT (and against the same pair with prefix caching off).

Each repeat takes a fresh 1,024-token prefix from WikiText-2 (so the first request is always
cold), sends `prefix + suffix A`, then `prefix + suffix B` (16-token suffixes), one at a time,
max_tokens=1. TTFT = first token time - arrival time, from the engine's request metrics.

Usage: python benchmarks/prefix_ttft.py [--model M] [--dtype bfloat16] [--prefix-len 1024]
       [--repeats 5] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from rich.console import Console
from rich.table import Table

from leanlm import LLM, SamplingParams
from leanlm.bench.data import find_data_file, read_text


def ttft(llm: LLM, ids: list[int]) -> float:
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1))[0]
    return out.metrics.first_token_time - out.metrics.arrival_time


def run(llm: LLM, corpus: list[int], prefix_len: int, suffix_len: int, repeats: int) -> dict:
    firsts, seconds = [], []
    stride = prefix_len + 2 * suffix_len
    for r in range(repeats + 1):  # repeat 0 warms up
        base = corpus[(r + 1) * stride:(r + 2) * stride]
        prefix = base[:prefix_len]
        a, b = base[prefix_len:prefix_len + suffix_len], base[prefix_len + suffix_len:]
        t1, t2 = ttft(llm, prefix + a), ttft(llm, prefix + b)
        if r:
            firsts.append(t1)
            seconds.append(t2)
    stats = llm.engine.stats()
    first, second = statistics.median(firsts), statistics.median(seconds)
    return {"first_ttft_ms": first * 1e3, "second_ttft_ms": second * 1e3, "ratio": second / first,
            "first_all_ms": [t * 1e3 for t in firsts], "second_all_ms": [t * 1e3 for t in seconds],
            "prefix_cache_hits": stats.prefix_cache_hits, "prefix_cache_queries": stats.prefix_cache_queries}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir, .gguf or alias (default: the embedded model)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.prefix_len < 16 or args.suffix_len < 1 or args.repeats < 1:
        p.error("--prefix-len >= 16, --suffix-len >= 1 and --repeats >= 1 are required")
    torch.set_num_threads(args.threads)
    results = {}
    for caching in (True, False):
        llm = LLM(model=args.model, dtype=args.dtype, enable_prefix_caching=caching)
        corpus = llm.get_tokenizer().encode(read_text(find_data_file("wikitext2_test_gptq_joined.txt")))
        need = (args.repeats + 2) * (args.prefix_len + 2 * args.suffix_len)
        if len(corpus) < need:
            p.error(f"WikiText-2 has {len(corpus)} tokens; these settings need {need}")
        results["prefix_caching" if caching else "no_prefix_caching"] = run(
            llm, corpus, args.prefix_len, args.suffix_len, args.repeats)
    table = Table(title=f"TTFT with a shared {args.prefix_len}-token prefix ({args.dtype}, median of {args.repeats})")
    for col in ("prefix caching", "1st request ms", "2nd request ms", "2nd / 1st", "tokens reused"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row("on" if name == "prefix_caching" else "off", f"{r['first_ttft_ms']:.1f}",
                      f"{r['second_ttft_ms']:.1f}", f"{r['ratio']:.3f}", str(r["prefix_cache_hits"]))
    Console().print(table)
    results["config"] = vars(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
