"""tg128 / pp512 of weight-quantized models as a ratio to the unquantized model, all in one
process run (the llama-bench rows of `leanlm bench latency`, one engine per quant spec, measured
round-robin so machine drift hits every row alike).

Usage: python benchmarks/quant_latency.py [--dtype float32] [--quant rtn:int8 bfloat16/rtn:int4:g32 ...]
(an item DTYPE/SPEC runs that spec with another compute dtype than the baseline's)
       [--repeats 3] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from rich.console import Console
from rich.table import Table

from leanlm import LLM
from leanlm.bench.latency import decode_weight_bytes, measure
from leanlm.bench.peers import LeanlmTarget


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quant", nargs="+", default=["rtn:int8", "rtn:int4:g32", "rtn:int4:g128"])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="compile every engine, the baseline too")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    targets = []
    for item in [None, *args.quant]:
        # an item may name its own compute dtype: "bfloat16/rtn:int4:g128"
        dtype, _, spec = (item or "").rpartition("/") if item and "/" in item else (args.dtype, "", item)
        # a small KV pool each: these runs hold one sequence of < 700 tokens, and 14 engines with
        # the serving default (up to 4 GiB each) would not fit in memory together
        t = LeanlmTarget(LLM(model=args.model, dtype=dtype or args.dtype, quant=spec or None,
                             kv_cache_memory="256MiB", enable_prefix_caching=False, compile=args.compile))
        t.name = item or args.dtype
        targets.append(t)
    vocab = targets[0].llm.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    pp_prompts = [torch.randint(100, vocab, (args.prompt_len,), generator=g).tolist()
                  for _ in range(args.repeats + 1)]
    tg_prompt = torch.randint(100, vocab, (16,), generator=g).tolist()
    runs = measure(targets, pp_prompts, tg_prompt, args.gen_len, args.repeats)
    base = targets[0].name
    rows = {}
    for t in targets:
        pp, tg = statistics.median(runs[t.name]["pp"]), statistics.median(runs[t.name]["tg"])
        wbytes = decode_weight_bytes(t.llm.engine.model)
        rows[t.name] = {"pp_tps": pp, "tg_tps": tg, "tg_runs": runs[t.name]["tg"], "weight_bytes": wbytes,
                        "bandwidth_gbs": wbytes * tg / 1e9}
    for r in rows.values():
        r["ratio_pp"] = r["pp_tps"] / rows[base]["pp_tps"]
        r["ratio_tg"] = r["tg_tps"] / rows[base]["tg_tps"]
    mode = "compiled" if args.compile else "eager"
    table = Table(title=f"quantized latency vs {base}, {mode} (same run, median of {args.repeats})")
    for col in ("quant", f"pp{args.prompt_len} t/s", "ratio", f"tg{args.gen_len} t/s", "ratio",
                "weights read MiB", "GB/s"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        table.add_row(name, f"{r['pp_tps']:.0f}", f"{r['ratio_pp']:.2f}x", f"{r['tg_tps']:.1f}",
                      f"{r['ratio_tg']:.2f}x", f"{r['weight_bytes'] / 2**20:.0f}", f"{r['bandwidth_gbs']:.1f}")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
